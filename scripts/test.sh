#!/usr/bin/env bash
# The test command of the README and of CI: lint, then the whole pytest suite (GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check services tests benchmarks scripts
# --durations: CI logs show where the suite's time goes (budget: 35 min on 2 cores).
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=60 "$@"
