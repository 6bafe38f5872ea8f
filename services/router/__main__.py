"""`python -m services.router ...`"""

from __future__ import annotations

import sys

from services.router.main import main

sys.exit(main())
