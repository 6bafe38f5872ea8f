"""The local cluster's workers sleep their OpenMP threads between regions unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = "from services.cli.launcher import WORKER_ENV_DEFAULTS as d; print(d.get('OMP_WAIT_POLICY'))"


def _defaults(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return out.stdout.strip()


def test_workers_get_passive_openmp_unless_the_user_chose_a_policy():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _defaults(env) == "PASSIVE"
    assert _defaults({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "None"  # theirs is inherited
