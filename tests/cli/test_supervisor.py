"""`epdserve up`'s restart policy (backoff, crash-loop detection) and the supervisor that
applies it, on fake children and a fake clock: no processes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, Future

import pytest

from services.cli.supervisor import RestartHistory, RestartPolicy, Supervisor, describe_exit

POLICY = RestartPolicy(
    restart_backoff_s=1.0, restart_backoff_max_s=30.0, restart_reset_s=60.0,
    max_restarts=5, restart_window_s=300.0,
)  # fmt: skip


def delays(history: RestartHistory, uptimes: list[float], start: float = 0.0) -> list:
    """Feed exits after these uptimes (restarting at once); the delays granted."""
    out, now = [], start
    for up in uptimes:
        now += up
        out.append(history.on_exit(now - up, now))
    return out


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(max_restarts=100, restart_window_s=1.0)  # no loop: exits far apart
    history = RestartHistory(policy)
    assert delays(history, [2.0] * 7) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert history.restarts == 7


def test_backoff_starts_over_after_a_healthy_run() -> None:
    history = RestartHistory(POLICY)
    assert delays(history, [5.0, 5.0, 5.0]) == [1.0, 2.0, 4.0]
    assert delays(history, [60.0], start=15.0) == [1.0]  # up 60 s: healthy again
    assert delays(history, [5.0], start=75.0) == [2.0]


def test_a_crash_loop_gives_up_after_max_restarts_within_the_window() -> None:
    history = RestartHistory(POLICY)
    assert delays(history, [3.0] * 6) == [1.0, 2.0, 4.0, 8.0, 16.0, None]
    assert history.recent_exits == 6 and history.restarts == 5


def test_exits_spread_beyond_the_window_never_give_up() -> None:
    history = RestartHistory(POLICY)
    got = delays(history, [100.0] * 20)  # one exit per 100 s: at most 3 in any 300 s
    assert None not in got and set(got) == {1.0}


def test_max_restarts_zero_gives_up_on_the_first_exit() -> None:
    assert RestartHistory(RestartPolicy(max_restarts=0)).on_exit(0.0, 1000.0) is None


@pytest.mark.parametrize(
    "bad",
    [{"restart_backoff_s": 0}, {"restart_backoff_s": 5, "restart_backoff_max_s": 1},
     {"max_restarts": -1}, {"restart_window_s": 0}, {"restart_reset_s": -1},
     {"liveness_period_s": -1}, {"liveness_period_s": float("nan")},
     {"liveness_timeout_s": 0}, {"liveness_failures": 0},
     # Each of these passed: 1e-300 s failed every probe (every router and worker killed in
     # turn, then the crash loop stopped the cluster), inf meant no probes at all.
     {"liveness_timeout_s": 1e-300}, {"liveness_timeout_s": float("inf")},
     {"liveness_period_s": float("inf")}, {"liveness_period_s": 1e-300},
     {"liveness_failures": 10**20}],
)  # fmt: skip
def test_policy_refuses_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**bad)


def test_describe_exit() -> None:
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "did not start"


class FakeChild:
    def __init__(self, name: str, fail_restarts: int = 0) -> None:
        self.name = self.label = name
        self.running = True
        self.rc: int | None = None
        self.starts = 0
        self.fail_restarts = fail_restarts  # this many restarts raise
        self.loaded = True  # said it is ready
        self.ready_line: str | None = None
        self.answers: bool | None = None  # what its liveness probe says (None: not probed)
        self.probes = 0

    def alive(self) -> bool:
        return self.running

    def is_ready(self) -> bool:
        return self.running and self.loaded

    def returncode(self) -> int | None:
        return self.rc

    def restart(self) -> None:
        self.starts += 1
        if self.starts <= self.fail_restarts:
            raise RuntimeError("port taken")
        self.running, self.rc, self.loaded = True, None, False

    def last_output(self, lines: int = 40) -> str:
        return f"{self.name}'s last words"

    def kill(self, rc: int = -9) -> None:
        self.running, self.rc = False, rc

    def probe(self, timeout: float) -> bool | None:
        self.probes += 1
        return self.answers if self.loaded else None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Inline(Executor):
    """Runs each probe in the caller, at once: the tests judge probes on the poll they run."""

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN202
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def supervised(*children: FakeChild, policy: RestartPolicy = POLICY):
    clock, said = Clock(), []
    return Supervisor(children, policy, said.append, clock, Inline()), clock, said


def test_a_dead_child_is_restarted_after_its_backoff_and_the_others_are_left_alone() -> None:
    worker, router = FakeChild("worker-1 (decode)"), FakeChild("router")
    sup, clock, said = supervised(worker, router)
    assert sup.poll() is None and said == []
    worker.kill()
    assert sup.poll() is None
    assert said == ["worker-1 (decode) exited (signal 9); restarting in 1.0 s (restart 1)"]
    clock.now += 0.5
    assert sup.poll() is None and worker.starts == 0  # still backing off
    clock.now += 0.5
    assert sup.poll() is None and worker.starts == 1 and worker.alive()
    assert router.starts == 0 and len(said) == 1
    clock.now += 10
    sup.poll()
    assert len(said) == 1  # still loading
    worker.loaded = True
    sup.poll()
    assert said[-1] == "worker-1 (decode) is back (10 s after its restart)"
    sup.poll()
    assert len(said) == 2  # said once
    worker.kill(rc=1)
    sup.poll()
    assert said[-1] == "worker-1 (decode) exited (exit code 1); restarting in 2.0 s (restart 2)"


def test_a_crash_loop_stops_with_the_process_its_exit_and_its_output() -> None:
    policy = RestartPolicy(max_restarts=2, restart_window_s=60.0)
    worker = FakeChild("worker-0 (mixed)")
    sup, clock, said = supervised(worker, policy=policy)
    for _ in range(2):
        worker.kill(rc=1)
        assert sup.poll() is None
        clock.now += 10
        assert sup.poll() is None and worker.alive()
    worker.kill(rc=1)
    failure = sup.poll()
    assert failure is not None
    assert failure.startswith("worker-0 (mixed) exited (exit code 1) 3 times within 60 s")
    assert "crash loop" in failure and "worker-0 (mixed)'s last words" in failure
    assert len(said) == 2


def test_a_restart_that_raises_counts_as_an_exit() -> None:
    etcd = FakeChild("etcd", fail_restarts=1)
    sup, clock, said = supervised(etcd)
    etcd.kill()
    sup.poll()
    clock.now += 1.0
    assert sup.poll() is None and said[-1] == "etcd did not restart: port taken"
    sup.poll()  # the failed start is seen as an exit: backoff goes on
    assert said[-1].endswith("restarting in 2.0 s (restart 2)")
    clock.now += 2.0
    sup.poll()
    assert etcd.alive() and etcd.starts == 2


def test_a_child_that_stops_answering_its_probe_is_killed_and_restarted() -> None:
    """A liveness probe every period; a child alive but not answering (SIGSTOP) is killed
    after ``liveness_failures`` failures in a row and restarted like a dead one. A probe that
    passes starts the count over, and a child is not probed while it starts."""
    policy = RestartPolicy(liveness_period_s=5.0, liveness_failures=3)
    router = FakeChild("router")
    router.answers = True
    sup, clock, said = supervised(router, policy=policy)
    sup.poll()
    clock.now += 1
    sup.poll()
    assert router.probes == 1  # once per period
    router.answers = False
    for answers in (False, False, True, False, False):  # never 3 failures in a row
        clock.now += 5
        router.answers = answers
        assert sup.poll() is None
    assert router.alive() and said == []
    clock.now += 5
    sup.poll()  # the third in a row
    assert not router.alive()
    assert said == ["router did not answer 3 liveness probes in a row (5 s apart, 2 s each): "
                    "killing it"]  # fmt: skip
    sup.poll()
    assert said[-1] == "router exited (signal 9); restarting in 1.0 s (restart 1)"
    clock.now += 1
    sup.poll()
    assert router.alive() and not router.loaded
    probes = router.probes
    for _ in range(5):  # starting again (no ready line yet): the probe says None, not False
        clock.now += 5
        sup.poll()
    assert router.alive() and router.probes == probes + 5 and len(said) == 2


def test_no_probes_with_a_period_of_zero() -> None:
    router = FakeChild("router")
    router.answers = False
    sup, clock, _ = supervised(router, policy=RestartPolicy(liveness_period_s=0))
    for _ in range(20):
        clock.now += 10
        sup.poll()
    assert router.alive() and router.probes == 0


class StuckChild(FakeChild):
    """Accepts a probe and never answers it (a stopped router: its TCP backlog accepts)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = threading.Event()

    def probe(self, timeout: float) -> bool | None:
        self.probes += 1
        self.release.wait(30)  # bounded: the test releases it
        return False


def test_a_probe_that_never_answers_does_not_stall_the_loop() -> None:
    """The probe of a stopped child takes its whole timeout; poll() must still return at once
    and see another child's exit meanwhile. On the old code poll() ran the probe itself and
    returned only when it did (here: never, until the test released it)."""
    stuck, worker = StuckChild("router"), FakeChild("worker-0 (mixed)")
    clock, said = Clock(), []
    policy = RestartPolicy(liveness_period_s=5.0, liveness_failures=1)
    sup = Supervisor([stuck, worker], policy, said.append, clock)
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (sup.poll(), done.set()), daemon=True).start()
        assert done.wait(10), "poll() blocked on a probe"
        worker.kill()
        clock.now += 1
        assert sup.poll() is None
        assert said == ["worker-0 (mixed) exited (signal 9); restarting in 1.0 s (restart 1)"]
        assert stuck.probes == 1 and stuck.alive()  # still in flight: not judged yet
        stuck.release.set()
        deadline = time.monotonic() + 10
        while stuck.alive() and time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.01)
        assert not stuck.alive() and "router did not answer 1 liveness probes" in said[-1]
    finally:
        stuck.release.set()
        sup.close()
