"""`python -m services.router ...`"""

from __future__ import annotations

import sys

from services.common.grpc_io import use_poller_io

use_poller_io()  # before anything imports grpc (common/grpc_io.py)

from services.router.main import main  # noqa: E402

sys.exit(main())
