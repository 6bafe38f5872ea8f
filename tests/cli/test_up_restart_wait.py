"""`epdserve up --worker-restart-wait-s S` and `--worker-mux` reach every router's argv, and a
bad wait is refused before anything starts (no process is started here)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.cli.supervisor import RestartPolicy
from services.cli.up import add_arguments, router_overrides
from services.common.dataclass_cli import add_dataclass_args, from_args
from services.router.config import RouterConfig
from services.router.routing.restarts import RESTART_WAIT_S


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_the_wait_reaches_the_routers() -> None:
    overrides = router_overrides(parse("--worker-restart-wait-s", "5"))
    cluster = LocalCluster(ClusterSpec(router_overrides=overrides))
    try:
        argv = cluster.router_argv()
        assert argv[argv.index("--worker-restart-wait-s") + 1] == "5.0"
    finally:
        cluster.stop()


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "1e300"])
def test_a_bad_wait_is_refused_before_anything_starts(value: str) -> None:
    with pytest.raises(ValueError, match="worker_restart_wait_s"):
        router_overrides(parse("--worker-restart-wait-s", value))


@pytest.mark.parametrize(("flag", "want"), [("--worker-mux", True), ("--no-worker-mux", False)])
def test_worker_mux_reaches_the_routers(flag: str, want: bool) -> None:
    """`epdserve up --worker-mux` (and --no-worker-mux) is the routers' RouterConfig.worker_mux."""
    cluster = LocalCluster(ClusterSpec(router_overrides=router_overrides(parse(flag))))
    try:
        argv = cluster.router_argv()
    finally:
        cluster.stop()
    p = argparse.ArgumentParser()
    add_dataclass_args(p, RouterConfig)
    assert (
        from_args(RouterConfig, p.parse_args(argv[argv.index("services.router") + 1 :])).worker_mux
        is want
    )
    assert "worker_mux" not in router_overrides(parse())  # no flag: the router's default


def test_the_default_wait_counts_from_when_up_kills_a_hung_worker() -> None:
    """A SIGSTOPped worker lives until its liveness probes kill it (6 probes, 5 s apart, 2 s
    each), then waits its backoff before it starts again: the routers' wait covers that and
    RESTART_WAIT_S more for the start. The bare 60 s ended under load (503 no_workers after
    54.5 s at load 40) while the worker was on its way back."""
    policy = RestartPolicy()
    assert policy.detection_s >= policy.liveness_failures * (
        policy.liveness_period_s + policy.liveness_timeout_s
    )
    want = RESTART_WAIT_S + policy.detection_s + policy.restart_backoff_s
    assert router_overrides(parse())["worker_restart_wait_s"] == want > 100
    slow = parse("--liveness-period-s", "10", "--liveness-failures", "3")
    assert router_overrides(slow)["worker_restart_wait_s"] == RESTART_WAIT_S + 3 * 12.5 + 1
    assert router_overrides(parse("--liveness-period-s", "0"))["worker_restart_wait_s"] == 61
    huge = parse("--liveness-period-s", "86400", "--liveness-failures", "1000")
    RouterConfig(worker_restart_wait_s=router_overrides(huge)["worker_restart_wait_s"])
    assert router_overrides(parse("--worker-restart-wait-s", "0"))["worker_restart_wait_s"] == 0
