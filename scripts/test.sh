#!/usr/bin/env bash
# The test command of the README and of CI: lint, then the whole pytest suite (GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check services tests benchmarks scripts
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
