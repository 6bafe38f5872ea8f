"""A model load whose wait sees etcd go away (router/api/admin_models.py): the restarting
worker's key runs out by itself when etcd is away longer than its lease, so a key gone then is
no sign that the process died. The load waits for it to register again and says etcd was away;
only with etcd answering does a key gone for GONE_FOR_S end the load as worker_lost.

Real etcd (stopped with SIGSTOP, continued), a fake pool (the key's coming and going)."""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest

from services.common import event_loop
from services.common.etcd_server import EtcdServer
from services.router.api import admin_models
from services.router.api.admin import AdminError
from services.router.api.admin_models import EtcdOutages, _restarted


class Handle:
    def __init__(self, incarnation: str, state: str = "serving") -> None:
        self.info = SimpleNamespace(incarnation=incarnation)
        self.state = state

    def reachable(self) -> bool:
        return True


async def _load(etcd: EtcdServer, stop_etcd: bool) -> object:
    """The worker's key is gone from 0.2 s (lease ran out), and a new incarnation serves at
    4.5 s; with ``stop_etcd``, etcd is stopped from 0 to 3.5 s."""
    gw = SimpleNamespace(pool=SimpleNamespace(handles={"w0": Handle("old", "loading")}))
    outages = EtcdOutages([etcd.endpoint]).start()
    assert etcd.proc is not None
    pid = etcd.proc.pid

    async def script() -> None:
        if stop_etcd:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(0.2)
        gw.pool.handles.pop("w0")
        await asyncio.sleep(3.3)
        if stop_etcd:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(1.0)
        gw.pool.handles["w0"] = Handle("new")

    task = asyncio.create_task(script())
    try:
        return await _restarted(gw, "w0", "old", outages)  # type: ignore[arg-type]
    except AdminError as exc:
        return exc
    finally:
        os.kill(pid, signal.SIGCONT)
        await task
        await outages.stop()


def test_a_worker_back_after_an_etcd_outage_is_not_reported_dead(monkeypatch) -> None:
    """The old wait answered 503 'the process died' 2.5 s after the key went (here GONE_FOR_S)
    although the worker registered again once etcd answered."""
    monkeypatch.setattr(admin_models, "GONE_FOR_S", 2.5)
    monkeypatch.setattr(admin_models, "ETCD_PING_S", 0.2)
    monkeypatch.setattr(admin_models, "ETCD_SLOW_S", 1.0)
    with EtcdServer() as etcd:
        got = event_loop.run(_load(etcd, stop_etcd=True))
        assert isinstance(got, Handle) and got.info.incarnation == "new", got
        # etcd answering all along: the key gone for GONE_FOR_S means the process died.
        lost = event_loop.run(_load(etcd, stop_etcd=False))
    assert isinstance(lost, AdminError) and lost.code == "worker_lost", lost


@pytest.mark.parametrize("stopped", [True, False])
def test_etcd_outages_are_measured(stopped: bool, monkeypatch) -> None:
    """Stopped 1.5 s: seen while a ping hangs, and counted once etcd answers again."""
    monkeypatch.setattr(admin_models, "ETCD_PING_S", 0.2)
    monkeypatch.setattr(admin_models, "ETCD_SLOW_S", 1.0)

    async def run(etcd: EtcdServer) -> tuple[bool, float]:
        assert etcd.proc is not None
        outages = EtcdOutages([etcd.endpoint]).start()
        try:
            await asyncio.sleep(0.3)
            if stopped:
                os.kill(etcd.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(1.5)
            seen = outages.seen
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        try:
            await asyncio.sleep(1.0)
        finally:
            await outages.stop()
        return seen, outages.unreachable_s

    with EtcdServer() as etcd:
        seen, unreachable_s = event_loop.run(run(etcd))
    assert seen is stopped
    assert (unreachable_s >= 1.0) if stopped else unreachable_s == 0.0, unreachable_s
