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
    # In the same interpreter, first `epdserve --help`: it lists the commands without up's
    # imports or admin's gRPC modules (~1 s of imports at a load of 20, for a help text).
    code = (
        "import contextlib, io, json, sys\n"
        "from services.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert ' up ' in text.getvalue() and ' status ' in text.getvalue(), text.getvalue()\n"
        "help_imports = sorted({'services.cli.up', 'services.cli.admin', 'grpc'} & set(sys.modules))\n"
        "import services.cli.launcher, services.cli.up\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps([help_imports, heavy]))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=root, check=True)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]
