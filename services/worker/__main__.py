"""`python -m services.worker --role mixed|prefill|decode ...`"""

from __future__ import annotations

import sys

from services.common.grpc_io import use_poller_io

use_poller_io()  # before anything imports grpc (common/grpc_io.py)

from services.worker import lease_handover, starting  # noqa: E402

# Before the heavy imports below: keep the key a model load's restart handed over alive, or
# advertise this worker as starting (worker/starting.py).
handover = lease_handover.keep_from_env() or starting.announce(sys.argv[1:])

from services.common.fast_exit import exit_now  # noqa: E402
from services.worker.main import main  # noqa: E402

# No interpreter teardown once the worker stopped itself (common/fast_exit.py).
exit_now(main(handover=handover))
