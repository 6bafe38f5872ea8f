"""The admin token a local cluster generates can be passed as `--admin-token TOKEN`."""

from __future__ import annotations

import re

from services.cli.launcher import ClusterSpec, LocalCluster


def test_generated_admin_tokens_never_look_like_an_option(tmp_path):
    # token_urlsafe gave "-..." one time in 64: `epdserve status --admin-token -x...` then
    # failed with "expected one argument" (3 cluster tests, 1 CI run).
    for _ in range(200):
        token = LocalCluster(ClusterSpec(admin_dir=str(tmp_path))).admin_token
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
