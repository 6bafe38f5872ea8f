"""`epdserve up --speculative-config JSON` reaches every worker's engine: the flag becomes the
workers' --speculative-config, which their own parser turns back into the same setting; a bad
config is refused before anything starts (no process is started here)."""

from __future__ import annotations

import argparse
import json

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.cli.up import add_arguments, engine_overrides
from services.common.dataclass_cli import from_args
from services.engine.config import EngineConfig
from services.worker.main import build_parser as worker_parser

SPEC = json.dumps({"method": "suffix", "num_speculative_tokens": 8})


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_speculative_config_reaches_every_worker() -> None:
    overrides = engine_overrides(parse("--speculative-config", SPEC, "--prefill", "1",
                                       "--decode", "1"))  # fmt: skip
    assert overrides["speculative_config"] == SPEC
    cluster = LocalCluster(ClusterSpec(prefill=1, decode=1, mixed=0, engine_overrides=overrides))
    try:
        for index, role in enumerate(("prefill", "decode")):
            argv = cluster.worker_argv(index, role)
            assert argv[1:3] == ["-m", "services.worker"]
            engine = from_args(EngineConfig, worker_parser().parse_args(argv[3:]))
            assert engine.speculative_config == SPEC, role
            assert engine.speculative is not None and engine.speculative.method == "suffix"
            assert engine.speculative.num_speculative_tokens == 8
    finally:
        cluster.stop()
    assert "speculative_config" not in engine_overrides(parse())


@pytest.mark.parametrize("bad", ['{"method": "nope"}', "not json", '{"method": "ngram", '
                                 '"num_speculative_tokens": 0}'])  # fmt: skip
def test_bad_speculative_config_fails_before_anything_starts(bad: str) -> None:
    with pytest.raises(ValueError):
        engine_overrides(parse("--speculative-config", bad))
