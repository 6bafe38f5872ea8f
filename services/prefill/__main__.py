"""`python -m services.prefill ...`: a worker started in role ``prefill``."""

from __future__ import annotations

import sys

from services.worker.main import main

sys.exit(main(["--role", "prefill", *sys.argv[1:]], prog="python -m services.prefill"))
