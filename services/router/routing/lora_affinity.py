"""LoRA-aware routing, as llm-d's LoRA affinity filter: before the routing policy chooses,
the candidates for a request that names an adapter are narrowed to the workers where it is
cheapest to run.

- Workers that hold the adapter in an engine slot now (``LoadReport.lora_resident``) run it
  without copying its factors in and without evicting another adapter that a running batch
  may want back. They are preferred while their load stays within ``slack`` (in requests,
  ``least_load.load_score``) of the least-loaded candidate; past that, load says otherwise
  and every candidate is open again.
- For an adapter resident nowhere, the workers with a free slot are preferred the same way
  (loading it there evicts nothing); else every candidate, and the policy's least-loaded
  choice loads it into a slot (the engine does, from the adapter it registered).

A worker the router sent an adapter's request to counts as holding it for ROUTED_S
(``note_routed``) whatever its reports say: a report taken before that request filled the
slot can arrive after it, and requests faster than the report interval then rotated over
every worker (seen by tests/cluster/test_lora_affinity_cluster.py on a quiet machine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, TypeVar

from services.router.routing.policies.least_load import load_score

# The load (requests) a worker holding the adapter may carry beyond the least-loaded one and
# still be preferred: a swap costs a copy of the factors (and maybe a later one back), a
# request queued behind this many others costs more. RouterConfig.lora_affinity_slack.
DEFAULT_SLACK = 4.0
ROUTED_S = 2.0  # a worker holds an adapter this long after a request for it was sent there


class LoRAWorker(Protocol):
    """What the filter reads of a worker (the router's WorkerHandle)."""

    @property
    def id(self) -> str: ...

    lora_resident: frozenset[str]  # adapters in its engine slots (its latest report)
    lora_slots: int  # its engine's adapter slots; 0: unknown or LoRA off
    lora_routed: dict[str, float]  # adapter -> time.monotonic() a request for it went there


W = TypeVar("W", bound=LoRAWorker)


def prefer_resident(candidates: Sequence[W], lora: str, slack: float = DEFAULT_SLACK) -> list[W]:
    """The candidates the policy should choose among for a request with adapter ``lora``
    ("": the base model, every candidate): see the module's docstring. Order is kept."""
    if not lora or len(candidates) < 2:
        return list(candidates)
    now = time.monotonic()
    loads = [load_score(w) for w in candidates]  # type: ignore[arg-type]
    bound = min(loads) + slack
    near = [w for w, load in zip(candidates, loads, strict=True) if load <= bound]
    holders = [w for w in near if lora in _held(w, now)]
    if holders:
        return holders
    if any(lora in _held(w, now) for w in candidates):
        return list(candidates)  # its holders are too busy: open to all
    free = [w for w in near if len(_held(w, now)) < w.lora_slots]
    return free or list(candidates)


def _held(w: LoRAWorker, now: float) -> set[str]:
    """Adapters ``w`` holds in a slot: reported, or sent there in the last ROUTED_S."""
    return set(w.lora_resident) | {a for a, t in w.lora_routed.items() if now - t < ROUTED_S}


def note_routed(worker: LoRAWorker, lora: str) -> None:
    """``worker`` will hold ``lora`` in a slot once the request sent there runs."""
    if lora:
        worker.lora_routed[lora] = time.monotonic()
