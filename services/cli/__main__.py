"""`python -m services.cli up|worker|router|...` (the same as the `epdserve` script)."""

from __future__ import annotations

import sys

from services.cli.main import main

sys.exit(main())
