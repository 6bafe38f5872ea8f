"""`python -m services.worker --role mixed|prefill|decode ...`"""

from __future__ import annotations

from services.worker import lease_handover

# Restarted by a model load: keep the key's lease alive before the heavy imports below.
handover = lease_handover.keep_from_env()

from services.common.fast_exit import exit_now  # noqa: E402
from services.worker.main import main  # noqa: E402

# No interpreter teardown once the worker stopped itself (common/fast_exit.py).
exit_now(main(handover=handover))
