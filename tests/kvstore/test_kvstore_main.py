"""The kvstore process refuses bad settings with one clear line, before starting anything."""

from __future__ import annotations

import pytest

from services.kvstore.config import KVStoreConfig
from services.kvstore.main import main
from services.kvstore.master import MasterPorts, master_argv


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--capacity-blocks", "0"], "capacity_blocks must be >= 1"),
        (["--master-rpc-port", "70000"], "master_rpc_port must be in [0, 65535]"),
        (["--lease-ttl", "1"], "lease_ttl must be >= 2"),
        (["--etcd", ""], "--etcd needs at least one host:port"),
    ],
)
def test_bad_settings_exit_2(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_master_binary_is_named(capsys) -> None:
    assert main(["--no-register", "--master-binary", "no-such-mooncake-master"]) == 1
    err = capsys.readouterr().err
    assert "kvstore failed to start" in err and "no-such-mooncake-master not found" in err


def test_master_argv_binds_the_given_host_and_takes_bare_flags() -> None:
    ports = MasterPorts("10.0.0.7", 1, 2, 3)
    argv = master_argv("mm", ports, 5000, ["v=1", "--eviction_ratio=0.1"])
    assert "--rpc_address=10.0.0.7" in argv and "--http_metadata_server_host=10.0.0.7" in argv
    assert "--metrics_host=10.0.0.7" in argv
    assert argv[-2:] == ["--v=1", "--eviction_ratio=0.1"]
    assert ports.metadata_url == "http://10.0.0.7:2/metadata"
    assert KVStoreConfig(register=False).instance_id
