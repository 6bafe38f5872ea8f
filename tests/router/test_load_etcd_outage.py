"""A model load whose wait sees etcd go away (router/api/admin_models.py): the restarting
worker's key runs out by itself when etcd is away longer than its lease, so a key gone then is
no sign that the process died. The load waits for it to put its key back (or register) once
etcd answers again and says etcd was away; a key gone for GONE_FOR_S with etcd answering (after
an outage: from BACK_GRACE_S after etcd is back) ends the load as worker_lost. A key that says
"starting" (the hand-over failed: the new image announced itself) is a worker still there.

Real etcd (stopped with SIGSTOP, continued), a fake pool (the key's coming and going)."""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest

from services.common import event_loop
from services.common.etcd_server import EtcdServer
from services.common.membership import InstanceInfo
from services.router.api import admin_models
from services.router.api.admin import AdminError
from services.router.api.admin_models import EtcdOutages, _restarted
from services.router.routing.starting import StartingWorkers


class Handle:
    def __init__(self, incarnation: str, state: str = "serving") -> None:
        self.info = SimpleNamespace(incarnation=incarnation)
        self.state = state

    def reachable(self) -> bool:
        return True


async def _load(etcd: EtcdServer, stop_etcd: bool, comes_back: bool = True,
                starts: bool = False) -> object:  # fmt: skip
    """The worker's key is gone from 0.2 s (lease ran out), and a new incarnation serves at
    4.5 s (``comes_back``; else never); with ``stop_etcd``, etcd is stopped from 0 to 3.5 s;
    ``starts``: from 0.2 s the key says "starting" (no handle) instead of being gone."""
    starting = StartingWorkers()
    gw = SimpleNamespace(pool=SimpleNamespace(handles={"w0": Handle("old", "loading")},
                                              starting=starting))  # fmt: skip
    outages = EtcdOutages([etcd.endpoint]).start()
    assert etcd.proc is not None
    pid = etcd.proc.pid

    async def script() -> None:
        if stop_etcd:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(0.2)
        gw.pool.handles.pop("w0")
        if starts:
            starting.update({"w0": InstanceInfo("w0", "", "mixed", 0, "m", "s", 1, "h",
                                                state="starting")})  # fmt: skip
        await asyncio.sleep(3.3)
        if stop_etcd:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(1.0)
        if comes_back:
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


def test_a_worker_dead_during_an_etcd_outage_is_lost_once_etcd_answers(monkeypatch) -> None:
    """Its key went while etcd was stopped and never came back: the old wait went on for
    the whole LOAD_WAIT_S (600 s; here 30 s) once any ping had been slow, with nothing
    logged. Now a key still gone BACK_GRACE_S + GONE_FOR_S after etcd answers again (a live
    restarting worker puts its key back: worker/lease_handover.py) is worker_lost."""
    monkeypatch.setattr(admin_models, "GONE_FOR_S", 2.5)
    monkeypatch.setattr(admin_models, "ETCD_PING_S", 0.2)
    monkeypatch.setattr(admin_models, "ETCD_SLOW_S", 1.0)
    monkeypatch.setattr(admin_models, "LOAD_WAIT_S", 30.0)
    monkeypatch.setattr(admin_models, "BACK_GRACE_S", 2.0)
    with EtcdServer() as etcd:
        lost = event_loop.run(_load(etcd, stop_etcd=True, comes_back=False))
    assert isinstance(lost, AdminError) and lost.code == "worker_lost", lost
    assert "etcd" in lost.message, lost.message


def test_a_key_that_says_starting_is_a_worker_still_there(monkeypatch) -> None:
    """The hand-over failed (etcd slow at that moment), so the new image announced itself
    "starting": the router keeps no handle for it, and the old wait took it for gone and
    answered worker_lost after GONE_FOR_S though the worker came back."""
    monkeypatch.setattr(admin_models, "GONE_FOR_S", 2.5)
    monkeypatch.setattr(admin_models, "ETCD_PING_S", 0.2)
    with EtcdServer() as etcd:
        got = event_loop.run(_load(etcd, stop_etcd=False, starts=True))
    assert isinstance(got, Handle) and got.info.incarnation == "new", got


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
