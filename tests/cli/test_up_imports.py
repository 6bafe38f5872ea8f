"""`epdserve up` is a supervisor: it starts and watches the cluster's processes and lives as
long as they do, so it must not load the engine (torch, transformers) it never runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "mooncake")


def test_the_launcher_does_not_import_the_engine() -> None:
    # The launcher took the worker's ready line from worker/main.py, which imports the whole
    # engine: `epdserve up --prefill 1` (a usage error) spent ~3 s of CPU importing torch
    # before it said so, and the supervisor of every `epdserve up` held torch's memory.
    code = (
        "import json, sys\n"
        "import services.cli.launcher, services.cli.up\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=root, check=True)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
