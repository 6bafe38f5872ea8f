"""`python -m services.worker --role mixed|prefill|decode ...`"""

from __future__ import annotations

import sys

from services.worker import lease_handover

# Restarted by a model load: keep the key's lease alive before the heavy imports below.
handover = lease_handover.keep_from_env()

from services.worker.main import main  # noqa: E402

sys.exit(main(handover=handover))
