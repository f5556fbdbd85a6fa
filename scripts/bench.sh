#!/usr/bin/env bash
# The benchmark suite: install, then bench/run_all.py (default set ~45 min on 2 CPU cores; --quick ~2 min).
# Extra arguments go to run_all.py, e.g. scripts/bench.sh --quick, or --checkpoint sam_vit_b_01ec64.pth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAMORA_VENV:-.venv}"
"$VENV/bin/python" bench/run_all.py "$@"
