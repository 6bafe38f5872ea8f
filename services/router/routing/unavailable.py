"""The 503 for a model none of whose workers can take a request now, and whether that is
for a moment: its workers going to sleep (a swap, ``epdserve models sleep``) or changing
role, or asleep, make a retry worth it, so the 503 says when (Retry-After)."""

from __future__ import annotations

from services.router.errors import APIError
from services.router.routing.workers import WorkerPool

# A request for a model whose workers sleep or are on their way there: retry after this long.
ASLEEP_RETRY_AFTER_S = 10


def in_transition(pool: WorkerPool, model: str) -> bool:
    """No path to ``model`` is serving, and some worker of it is draining to sleep or to
    another role (advertised "flipping") or asleep: one will likely serve again soon."""
    base = pool.base_model(model)
    workers = [h for h in pool.handles.values() if h.info.model == base]
    return not pool.may_serve(model) and any(h.state in ("flipping", "sleeping") for h in workers)


def no_worker_error(
    pool: WorkerPool, model: str, message: str, restart_wait_s: float = 0.0
) -> APIError:
    """The 503 of a request for ``model`` with no worker left to try: ``model_asleep`` (its
    workers sleep) or ``model_unavailable`` (going to sleep or changing role) with
    Retry-After, else ``no_workers`` with ``message``, its Retry-After what is left of the
    ``restart_wait_s`` of a worker of it that died (restarts.py; the request's timeout ended
    its wait first) or of the start budget of one that is starting (starting.py), or the
    default. NOTE: a request routed just before its model's worker
    began to drain for sleep is refused by it; that is this retry case."""
    if not in_transition(pool, model):
        base = pool.base_model(model)
        left = pool.lost.wait_left(model, restart_wait_s) or pool.starting.wait_left(
            base, restart_wait_s
        )
        headers = {"Retry-After": str(left)} if left else None
        return APIError(503, message, code="no_workers", headers=headers)
    asleep = pool.asleep(model)
    return APIError(
        503, f"model '{model}' is {'asleep' if asleep else 'going to sleep or changing role'}; "
        f"retry after {ASLEEP_RETRY_AFTER_S} s",
        code="model_asleep" if asleep else "model_unavailable",
        headers={"Retry-After": str(ASLEEP_RETRY_AFTER_S)},
    )  # fmt: skip
