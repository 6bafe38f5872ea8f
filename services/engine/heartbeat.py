"""When a thread running a model last finished a layer: how a watcher tells a slow step from a
stuck one.

A step's wall time says nothing on a loaded host: at load ~20 on 2 cores, one step with a
wave's prompts (16 x 128 tokens) took up to 50 s while every layer moved, and the engine's
old rule (a pass over ``engine_stall_s``, 30 s, is a stall) took such workers out of routing
and failed their requests as 503 ``no_workers`` (benchmarks/RESULTS.md, session 18). So the
engine's stall check (``AsyncLLMEngine.stalled_s``) asks how long since the step thread last
finished a model layer (or began a pass). A thread stuck in one call does not beat: rank 0 in
a collective with a stopped tensor-parallel rank, a device sync on a kernel that does not
return, a deadlock. NOTE: progress, not CPU time: on a GPU the host thread may spin in that
sync (CUDA's default), burning CPU while nothing moves; and on a CPU a starved step thread
gets little CPU while it is not stuck.

The models' layer loops call ``beat()`` once a layer: one clock read and a dict store, well
under a microsecond against a layer's tens of microseconds at the least.
"""

from __future__ import annotations

import threading
import time

# Thread ident -> monotonic time of its latest beat. Idents of ended threads may be reused by
# new ones; their first beat overwrites the stale time.
_last_beat: dict[int, float] = {}


def beat() -> None:
    """The calling thread finished a unit of model work (a layer)."""
    _last_beat[threading.get_ident()] = time.monotonic()


def last_beat(ident: int | None) -> float:
    """Monotonic time of thread ``ident``'s latest beat; 0.0 when it never beat."""
    return _last_beat.get(ident, 0.0) if ident is not None else 0.0
