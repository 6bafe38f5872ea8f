"""Flags built from config dataclasses round-trip through argv."""

from __future__ import annotations

import argparse

import pytest

from services.common.dataclass_cli import add_dataclass_args, from_args, to_argv
from services.engine.config import EngineConfig
from services.router.config import RouterConfig
from services.worker.config import WorkerConfig


@pytest.mark.parametrize(
    "cfg",
    [
        WorkerConfig(role="decode", port=1234, instance_id="w1", register=False, lease_ttl=3),
        RouterConfig(port=9000, policy="round_robin", model="/m", request_timeout_s=5.5),
        EngineConfig(model="/x", max_num_seqs=8, enable_prefix_caching=False, max_model_len=256),
        # None where the default is not: the off switches (a model load's restart rebuilds
        # its command line with to_argv; None was left out, so the pace came back on)
        EngineConfig(offline_step_share=None, offline_tpot_quantile=None),
        EngineConfig(offline_tpot_quantile=0.8),  # the pace opted into (off by default)
    ],
)
def test_round_trip(cfg: object) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, type(cfg))
    back = from_args(type(cfg), parser.parse_args(to_argv(cfg)))
    assert back == cfg


def test_none_turns_an_optional_setting_off() -> None:
    """README: "--offline-tpot-quantile none turns the pace off" (argparse refused "none")."""
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    args = ["--offline-tpot-quantile", "none", "--offline-step-share", "None"]
    cfg = from_args(EngineConfig, parser.parse_args(args))
    assert cfg.offline_tpot_quantile is None and cfg.offline_step_share is None
    default = from_args(EngineConfig, parser.parse_args([]))
    assert (default.offline_step_share, default.offline_tpot_quantile) == (0.08, None)


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="role"):
        WorkerConfig(role="boss")
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="nope")
    with pytest.raises(ValueError, match="lease_ttl"):
        WorkerConfig(lease_ttl=1)
    with pytest.raises(ValueError, match="kv_push_min_write_bytes must be >= 1"):
        WorkerConfig(kv_push_min_write_bytes=0)
    assert WorkerConfig(kv_push_min_write_bytes=1).kv_push_min_write_bytes == 1


def test_kv_push_min_write_bytes_default_is_the_senders() -> None:
    from services.prefill.kv_sender import DEFAULT_MIN_WRITE_BYTES

    assert WorkerConfig().kv_push_min_write_bytes == DEFAULT_MIN_WRITE_BYTES


def test_parse_assignments_converts_to_the_field_types():
    from services.common.dataclass_cli import parse_assignments
    from services.engine.config import EngineConfig

    got = parse_assignments(
        EngineConfig,
        ["dtype=bfloat16", "kv-cache-bytes=4096", "enforce_eager=true", "max_model_len=none",
         "gpu_memory_utilization=0.5"],
    )  # fmt: skip
    assert got == {"dtype": "bfloat16", "kv_cache_bytes": 4096, "enforce_eager": True,
                   "max_model_len": None, "gpu_memory_utilization": 0.5}  # fmt: skip
    for bad, match in (
        ("nosuch=1", "field of EngineConfig"),
        ("dtype", "KEY=VALUE"),
        ("block_size=x", "expected int"),
        ("enforce_eager=maybe", "boolean"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_assignments(EngineConfig, [bad])


@pytest.mark.parametrize(
    "cls, name",
    [
        (WorkerConfig, "engine_stall_s"),  # 'stalled <= nan' never held: no load report again
        (WorkerConfig, "kv_write_grace_s"),  # a quarantine that ends at NaN leaked its blocks
        (WorkerConfig, "drain_timeout_s"),
        (RouterConfig, "stall_timeout_s"),  # asyncio.wait_for(..., nan) times out at once
        (RouterConfig, "request_timeout_s"),
        (RouterConfig, "slo_ttft_ms"),
    ],
)
def test_a_nan_setting_is_refused(cls, name: str) -> None:
    """``--x nan`` parses, and NaN passes every bound check (each comparison is false)."""
    with pytest.raises(ValueError, match=f"{name} must be a (finite )?number, got nan"):
        cls(**{name: float("nan")})
    cls(**{name: 1.0})


def test_none_is_text_for_a_str_field() -> None:
    """--model none names a path "none" (it was read as None for every optional field, so a
    str field could never be set to "none"); optional numbers still take "none" as None, on
    the command line and in KEY=VALUE alike."""
    from services.common.dataclass_cli import parse_assignments

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, RouterConfig)
    cfg = from_args(RouterConfig, parser.parse_args(["--model", "none", "--batch-dir", "None",
                                                     "--max-tokens-limit", "none"]))  # fmt: skip
    assert (cfg.model, cfg.batch_dir, cfg.max_tokens_limit) == ("none", "None", None)
    items = ["model=none", "served_model_name=", "max_model_len=none"]
    want = {"model": "none", "served_model_name": None, "max_model_len": None}
    assert parse_assignments(EngineConfig, items) == want


def test_every_optional_str_field_defaults_to_none() -> None:
    """A str | None field has no "none" off switch, so only its default can be None: to_argv
    refuses to write None for one whose default is not (it would come back as "none")."""
    import dataclasses
    import typing

    from services.bench.config import BenchConfig
    from services.cli.up import RestartPolicy
    from services.common.dataclass_cli import _base_type
    from services.kvstore.config import KVStoreConfig

    for cls in (
        EngineConfig,
        RouterConfig,
        WorkerConfig,
        KVStoreConfig,
        BenchConfig,
        RestartPolicy,
    ):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, optional = _base_type(hints[f.name])
            if optional and tp is str:
                assert f.default is None, f"{cls.__name__}.{f.name}"

    @dataclasses.dataclass
    class Odd:
        name: str | None = "x"

    with pytest.raises(ValueError, match="name: None cannot be written"):
        to_argv(Odd(name=None))
