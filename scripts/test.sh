#!/usr/bin/env bash
# The project's test command (CI runs exactly this): install, lint, then the whole pytest suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow and not e2e" for the fast suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAMORA_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
