"""Worker messages folded into a response's choices, and the wait for them that a client gone
cancels (services/router/accumulate.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.common.proto import worker_pb2 as pb
from services.router.accumulate import Choice, Usage, apply_step, until_disconnect
from services.router.errors import ClientDisconnected
from services.router.http_protocol import CLIENT_GONE, ClientGone


def message(*deltas: pb.CompletionDelta) -> pb.GenerateResponse:
    return pb.GenerateResponse(outputs=list(deltas), prompt_tokens=3)


def test_a_finished_choice_is_touched_once() -> None:
    # With n = 3 the worker repeats a finished choice in its later messages (no text, the
    # same finish_reason): a streamed chat sent choice 0's finish chunk twice.
    choices: dict[int, Choice] = {}
    usage = Usage()
    first = apply_step(choices, usage, 0, 3, message(
        pb.CompletionDelta(index=0, text=" How", finish_reason="length", completion_tokens=3),
        pb.CompletionDelta(index=1, text="!", completion_tokens=2),
    ))  # fmt: skip
    assert [(c.index, d.finish_reason) for c, d in first] == [(0, "length"), (1, "")]
    later = apply_step(choices, usage, 0, 3, message(
        pb.CompletionDelta(index=0, finish_reason="length", completion_tokens=3),
        pb.CompletionDelta(index=1, text=" What", finish_reason="length", completion_tokens=3),
    ))  # fmt: skip
    assert [(c.index, d.finish_reason) for c, d in later] == [(1, "length")]
    assert [choices[i].full_text for i in (0, 1)] == [" How", "! What"]
    assert usage.completion == 6


async def _waits(gone: ClientGone, client_leaves: bool) -> dict[str, object]:
    """``until_disconnect`` of a request whose server tells of a lost connection (``gone``)."""
    request = SimpleNamespace(scope={"extensions": {CLIENT_GONE: gone}})
    out: dict[str, object] = {}

    async def work() -> str:
        out["task"] = asyncio.current_task()
        await asyncio.sleep(0 if not client_leaves else 30)
        return "done"

    async def request_task() -> None:
        me = asyncio.current_task()
        try:
            out["result"] = await until_disconnect(request, work())
        except ClientDisconnected:
            out["result"] = "disconnected"
        out["same_task"] = out["task"] is me
        out["cancelling"] = me.cancelling()
        await asyncio.sleep(0)  # not cancelled again: the cancel was the wait's own

    task = asyncio.create_task(request_task())
    while "task" not in out:
        await asyncio.sleep(0)
    out["watched"] = len(gone)
    if client_leaves:
        gone.connection_lost()
    await asyncio.wait_for(task, 10)
    out["left_watched"] = len(gone)
    return out


@pytest.mark.parametrize("client_leaves", [False, True])
def test_the_wait_runs_in_the_request_task_and_a_lost_client_cancels_it(client_leaves) -> None:
    # No task for the work nor a watcher (two tasks and an asyncio.wait a request before).
    out = asyncio.run(_waits(ClientGone(), client_leaves))
    assert out["result"] == ("disconnected" if client_leaves else "done")
    assert out["same_task"] and out["watched"] == 1 and out["left_watched"] == 0
    assert out["cancelling"] == 0


def test_a_client_gone_before_the_wait_starts_no_work() -> None:
    """A client that left while its request was read, tokenized or waited for its model:
    the wait ends at once and the work (the generation) never starts. The callbacks were
    called only for requests waiting when the connection was lost: the generation ran to
    its end for nobody."""
    gone = ClientGone()
    gone.connection_lost()
    request = SimpleNamespace(scope={"extensions": {CLIENT_GONE: gone}})
    started = []

    async def work() -> str:
        started.append(True)
        return "done"

    async def request_task() -> int:
        with pytest.raises(ClientDisconnected):
            await until_disconnect(request, work())
        return asyncio.current_task().cancelling()

    assert asyncio.run(request_task()) == 0
    assert started == [] and len(gone) == 0
