"""`python -m services.kvstore ...`"""

from __future__ import annotations

import sys

from services.kvstore.main import main

sys.exit(main())
