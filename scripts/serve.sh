#!/usr/bin/env bash
# The main job: start the SAMora MONAI Label server.
# Without --studies it generates the demo datastore in sample-data/studies (synthetic phantoms made by this
# project) and serves it, with the phantoms' 5 labels, on 127.0.0.1:8000. Every argument goes to
# `monailabel start_server` (e.g. --conf threads 2, or --studies DIR --conf labels liver=1,spleen=2).
# Environment: SAMORA_VENV (the venv, default .venv), SAMORA_STUDIES (the demo datastore's folder),
# SAMORA_HOST / SAMORA_PORT (default 127.0.0.1 / 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAMORA_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # SAMORA_VENV may be absolute or relative to the project
export PATH="$VENV/bin:$PATH"
STUDIES="${SAMORA_STUDIES:-sample-data/studies}"
has_studies=0
for arg in "$@"; do
  case "$arg" in --studies|--studies=*|-s) has_studies=1 ;; esac
done
if [ "$has_studies" -eq 0 ]; then
  python -m samora.cli make-sample-data --out "$STUDIES"
  # the demo's labels first: a --conf labels among the arguments comes later and wins
  set -- --studies "$STUDIES" --conf labels liver=1,spleen=2,kidney_left=3,kidney_right=4,spine=5 "$@"
fi
exec monailabel start_server --app apps/samora --host "${SAMORA_HOST:-127.0.0.1}" --port "${SAMORA_PORT:-8000}" "$@"
