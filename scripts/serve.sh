#!/usr/bin/env bash
# The main job: start the SAMora MONAI Label server.
# Without arguments it generates the demo datastore in sample-data/studies (synthetic phantoms made by this
# project) and serves it on 127.0.0.1:8000 with the CPU-sized preset. Any extra arguments go to
# `monailabel start_server` (e.g. --studies DIR --conf preset vit_b --conf checkpoint /path/sam_vit_b_01ec64.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAMORA_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # SAMORA_VENV may be absolute or relative to the project
export PATH="$VENV/bin:$PATH"
STUDIES="${SAMORA_STUDIES:-sample-data/studies}"
if [ "$#" -eq 0 ]; then
  python -m samora.cli make-sample-data --out "$STUDIES"
  set -- --studies "$STUDIES" --conf labels liver=1,spleen=2,kidney_left=3,kidney_right=4,spine=5
fi
exec monailabel start_server --app apps/samora --host "${SAMORA_HOST:-127.0.0.1}" --port "${SAMORA_PORT:-8000}" "$@"
