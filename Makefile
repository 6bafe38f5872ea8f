# The two entry points of the README. Both set up a fresh machine first (scripts/setup.sh).
.PHONY: setup run test lint

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/epdserve up

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check services tests benchmarks scripts
