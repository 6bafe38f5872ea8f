"""`python -m services.worker --role mixed|prefill|decode ...`"""

from __future__ import annotations

import sys

from services.worker.main import main

sys.exit(main())
