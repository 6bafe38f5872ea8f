"""RouterConfig refuses values that would make the router useless while looking valid."""

from __future__ import annotations

import pytest

from services.router.config import RouterConfig


@pytest.mark.parametrize("field", ["http_head_timeout_s", "http_body_timeout_s"])
@pytest.mark.parametrize("value", [1e-300, 0.05, 0.0, -1.0, float("nan"), 86401.0])
def test_http_read_timeouts_are_bounded(field: str, value: float) -> None:
    """A head timeout of 1e-300 s was accepted ('> 0'): every request then got a 408."""
    with pytest.raises(ValueError):
        RouterConfig(etcd="127.0.0.1:1", **{field: value})


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 1e300])
def test_worker_restart_wait_is_bounded(value: float) -> None:
    with pytest.raises(ValueError):
        RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=value)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 1e300])
def test_shutdown_grace_is_bounded(value: float) -> None:
    """1e300 s would reach uvicorn as a graceful-shutdown limit no parent waits out."""
    with pytest.raises(ValueError):
        RouterConfig(etcd="127.0.0.1:1", shutdown_grace_s=value)


@pytest.mark.parametrize("value", [0, 2**31, 2**32])
def test_max_tokens_limit_is_bounded_by_the_wire(value: int) -> None:
    """A limit past the wire's int32 (an operator's 'unlimited', 2**32) was accepted: every
    chat request without max_tokens then takes it as its max_tokens, and got a 400 about
    'max_tokens and min_tokens' it never sent."""
    with pytest.raises(ValueError):
        RouterConfig(etcd="127.0.0.1:1", max_tokens_limit=value)
    assert RouterConfig(etcd="127.0.0.1:1", max_tokens_limit=2**31 - 1).max_tokens_limit


def test_sane_values_are_accepted() -> None:
    cfg = RouterConfig(etcd="127.0.0.1:1", http_head_timeout_s=0.1, http_body_timeout_s=86400.0,
                       worker_restart_wait_s=0.0, shutdown_grace_s=0.0)  # fmt: skip
    assert cfg.http_limits.head_timeout_s == 0.1 and cfg.worker_restart_wait_s == 0.0
    assert cfg.shutdown_grace_s == 0.0


@pytest.mark.parametrize("field", ["load_stale_s", "stall_timeout_s", "request_timeout_s"])
@pytest.mark.parametrize("value", [float("inf"), 1e300, 86401.0])
def test_liveness_timeouts_are_bounded(field: str, value: float) -> None:
    """1e300 s was accepted ('> 0'): a hung worker never left routing (load_stale_s), a hung
    stream (stall_timeout_s) or generation (request_timeout_s) never ended."""
    with pytest.raises(ValueError, match=field):
        RouterConfig(etcd="127.0.0.1:1", **{field: value})


@pytest.mark.parametrize(
    "field",
    [
        "image_fetch_timeout_s", "response_ttl_s", "rebalance_interval_s", "rebalance_cooldown_s",
        "rebalance_flip_window_s", "offline_queue_timeout_s", "batch_retention_s", "slo_ttft_ms",
        "slo_tpot_ms", "lora_affinity_slack",
    ],
)  # fmt: skip
@pytest.mark.parametrize("value", [float("inf"), 1e300])
def test_every_other_float_setting_is_bounded(field: str, value: float) -> None:
    """These took 1e300 and inf: a response's etcd lease TTL (response_ttl_s) or a batch's
    expiry (batch_retention_s) overflowed where it was used, a rebalancing round or an image
    fetch never came or never ended."""
    with pytest.raises(ValueError, match=field):
        RouterConfig(etcd="127.0.0.1:1", **{field: value})


@pytest.mark.parametrize(("field", "value"), [("max_n", 2.5), ("port", "8000"),
                                              ("worker_mux", "no"), ("cluster", None)])  # fmt: skip
def test_a_setting_of_the_wrong_type_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RouterConfig(etcd="127.0.0.1:1", **{field: value})
