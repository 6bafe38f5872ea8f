"""`python -m services.encoder ...`: a worker started in role ``encode``."""

from __future__ import annotations

import sys

from services.worker.main import main

sys.exit(main(["--role", "encode", *sys.argv[1:]], prog="python -m services.encoder"))
