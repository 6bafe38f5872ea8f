"""A local cluster or etcd server built and never started leaves nothing in the temporary
folder: test_launcher_token builds 200 clusters for their admin tokens, and each left an
empty epdserve-etcd-* folder (and, without an admin_dir, an epdserve-admin-* one) in /tmp."""

from __future__ import annotations

import tempfile

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.common.etcd_server import EtcdServer


def test_unstarted_cluster_and_etcd_leave_no_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for _ in range(3):
        LocalCluster(ClusterSpec()).stop()
        LocalCluster(ClusterSpec(admin_dir=str(tmp_path / "admin")))
        EtcdServer().cleanup()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_started_server_keeps_its_folder_until_cleanup(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = EtcdServer()
    server.start()
    try:
        folder = server.data_dir
        assert folder.startswith(str(tmp_path)) and server.log_path.startswith(folder)
        server.restart()  # the same folder (and data) across a restart
        assert server.data_dir == folder and server.healthy()
    finally:
        server.cleanup()
    assert list(tmp_path.iterdir()) == []
