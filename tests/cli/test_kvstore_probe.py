"""`epdserve up` probes its kvstore at the gRPC level, as it probes workers, so a stopped
kvstore (SIGSTOP: the kernel still accepts its connections) is killed and restarted; on
mutual TLS (the probe speaks plain gRPC) it is not probed. No process is started here."""

from __future__ import annotations

import pytest

from services.cli import launcher
from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster


class Recorded:
    """Stands in for ManagedProcess: records how the launcher would start the child."""

    def __init__(self, name, argv, ready, echo, env=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.name, self.kwargs = name, kwargs


@pytest.mark.parametrize("tls", [False, True])
def test_the_kvstore_is_probed_unless_on_mutual_tls(monkeypatch, tls: bool) -> None:
    monkeypatch.setattr(launcher, "ManagedProcess", Recorded)
    files = {"grpc_tls_ca": "/ca", "grpc_tls_cert": "/c", "grpc_tls_key": "/k"} if tls else {}
    cluster = LocalCluster(ClusterSpec(kvstore=True, kvstore_overrides=files))
    try:
        kvstore = cluster.start_kvstore()
        assert kvstore.kwargs.get("probe_grpc") is (not tls)
    finally:
        cluster.kvstore = None
        cluster.stop()
