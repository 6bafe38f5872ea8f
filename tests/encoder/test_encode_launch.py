"""`epdserve up --encode N`: encoder workers in the local cluster's layout and argv."""

from __future__ import annotations

import argparse

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.cli.up import add_arguments


def test_encoder_workers_in_the_layout():
    spec = ClusterSpec(model="/m", mixed=0, prefill=1, decode=1, encode=2)
    cluster = LocalCluster(spec)
    assert cluster.worker_roles() == ["prefill", "decode", "encode", "encode"]
    argv = cluster.worker_argv(2, "encode")
    assert argv[argv.index("--role") + 1] == "encode"
    with pytest.raises(ValueError, match=">= 0"):
        ClusterSpec(encode=-1)


def test_up_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--encode", "2", "--prefill", "1", "--decode", "1"])
    assert args.encode == 2
