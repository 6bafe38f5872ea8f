"""A sleep and a role change of one worker are serialised: a role change that arrives while
the engine is being put to sleep must not end the sleep's refusal of new work (the worker
would advertise "serving" and take requests for an engine whose weights are being freed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.engine.sleep import SleepReport
from services.worker.config import WorkerConfig
from services.worker.role_controller import RoleController
from services.worker.sleep import WorkerSleep
from services.worker.state import WorkerState

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


class _Engine:
    """An engine whose ``call`` runs ``fn`` on a thread (as the step thread does)."""

    async def call(self, fn):
        return await asyncio.to_thread(fn, None)


class _EngineSleep:
    """Blocks inside ``sleep`` until told to finish (writing the weights out takes seconds)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.finish = threading.Event()

    def sleep(self, engine) -> SleepReport:
        self.entered.set()
        assert self.finish.wait(10)
        return SleepReport(1, 1, 0.0)


async def test_a_role_change_during_a_sleep_waits_for_it(monkeypatch) -> None:
    monkeypatch.setattr("services.worker.sleep.EngineSleep.supported", lambda engine: None)
    state = WorkerState("w1", "inc", "mixed")
    phases: list[str] = []
    state.on_change = lambda: phases.append(state.phase)
    roles = RoleController(state, drain_timeout_s=5.0, held=lambda: 0, evict=_noop)
    sleeper = WorkerSleep(state, _Engine(), roles)
    fake = _EngineSleep()
    sleeper.engine_sleep = fake  # type: ignore[assignment]

    sleeping = asyncio.create_task(sleeper.set(True))
    assert await asyncio.to_thread(fake.entered.wait, 10)
    changing = asyncio.create_task(roles.change("decode"))
    await asyncio.sleep(0.3)  # the change's drain (nothing held) is long over by now
    # While the engine is going to sleep the worker takes no new work.
    assert state.refusal(("mixed", "decode"), 0) is not None
    fake.finish.set()
    await asyncio.wait_for(sleeping, 10)
    assert await asyncio.wait_for(changing, 10) == ("decode", 2)
    assert state.asleep and state.phase == "sleeping"
    assert "serving" not in phases, phases


async def _noop(msg: str) -> None:
    return None


def test_a_sleep_dir_that_is_not_a_folder_is_refused(tmp_path) -> None:
    assert WorkerConfig(sleep_dir=str(tmp_path), register=False).sleep_dir == str(tmp_path)
    with pytest.raises(ValueError, match="--sleep-dir"):
        WorkerConfig(sleep_dir=str(tmp_path / "missing"), register=False)


async def test_a_sleep_asked_only_if_idle_refuses_while_a_request_is_in_flight(
    monkeypatch,
) -> None:
    """A router's swap asks for sleep only if idle: with a request in flight the worker
    refuses (Busy, nothing drained, still serving); idle, it sleeps. A plain sleep (the
    operator's) drains as before. Before, a swap drained a worker whose request the load
    report it judged from did not show yet."""
    from services.worker.sleep import Busy

    monkeypatch.setattr("services.worker.sleep.EngineSleep.supported", lambda engine: None)
    state = WorkerState("w1", "inc", "mixed")
    roles = RoleController(state, drain_timeout_s=5.0, held=lambda: 0, evict=_noop)
    sleeper = WorkerSleep(state, _Engine(), roles)
    fake = _EngineSleep()
    fake.finish.set()
    sleeper.engine_sleep = fake  # type: ignore[assignment]
    state.inflight.add("r1")
    with pytest.raises(Busy, match="1 requests in flight"):
        await sleeper.set(True, if_idle=True)
    assert state.phase == "serving" and not fake.entered.is_set()
    state.inflight.clear()
    await sleeper.set(True, if_idle=True)
    assert state.asleep and state.phase == "sleeping"
