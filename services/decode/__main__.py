"""`python -m services.decode ...`: a worker started in role ``decode``."""

from __future__ import annotations

import sys

from services.worker.main import main

sys.exit(main(["--role", "decode", *sys.argv[1:]], prog="python -m services.decode"))
