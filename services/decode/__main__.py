"""`python -m services.decode ...`: a worker process started in role ``decode``."""

from __future__ import annotations

import sys

from services.common.grpc_io import use_poller_io

use_poller_io()  # before anything imports grpc (common/grpc_io.py)

from services.common.fast_exit import exit_now  # noqa: E402

# NOTE: the one import of services.worker in this package, and the only one allowed: this
# module is the top of a process, and that process is a worker, which drives the role
# through services.common.role.Role. The role's own modules never import the worker.
from services.worker.main import main  # noqa: E402

exit_now(main(["--role", "decode", *sys.argv[1:]], prog="python -m services.decode"))
