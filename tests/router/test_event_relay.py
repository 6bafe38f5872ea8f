"""A streamed background response's events reach its client through a bounded relay: a
client that stops reading is cut off with an error event while the run goes on to its
stored end; a client that left gets nothing more queued (review9, finding 3)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from services.router.api import responses
from services.router.api.event_relay import EventRelay

pytestmark = [pytest.mark.timeout(30)]


def _cut(behind: int) -> str:
    return f"cut {behind}"


async def _read_all(relay: EventRelay) -> list[str]:
    return [e async for e in relay.events()]


@pytest.mark.asyncio
async def test_a_client_that_keeps_up_gets_every_event() -> None:
    relay = EventRelay(_cut, limit=4)
    reader = asyncio.ensure_future(_read_all(relay))
    for i in range(100):
        relay.put(f"e{i}")
        await asyncio.sleep(0)  # the client reads as they come
    relay.end()
    assert await reader == [f"e{i}" for i in range(100)] and not relay.cut


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_is_cut_off_and_nothing_piles_up() -> None:
    relay = EventRelay(_cut, limit=8)
    for i in range(10_000):  # the run never waits for the client
        relay.put(f"e{i}")
        assert relay.behind <= 8 + 2
    relay.end()
    assert relay.cut
    assert await _read_all(relay) == [*(f"e{i}" for i in range(8)), "cut 8"]


@pytest.mark.asyncio
async def test_nothing_is_queued_for_a_client_that_left() -> None:
    relay = EventRelay(_cut, limit=8)
    relay.put("e0")
    stream = relay.events()
    assert await anext(stream) == "e0"
    await stream.aclose()  # the HTTP client went away
    for i in range(1, 100):
        relay.put(f"e{i}")
    relay.end()
    assert relay.behind == 0 and not relay.cut


@pytest.mark.parametrize("limit", [0, -1])
def test_a_relay_needs_room(limit: int) -> None:
    with pytest.raises(ValueError):
        EventRelay(_cut, limit=limit)


class _Store:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    async def put(self, rid: str, record: dict[str, Any]) -> None:
        self.records[rid] = record

    async def get(self, rid: str) -> dict[str, Any] | None:
        return self.records.get(rid)


class _Out:
    def skeleton(self, status: str, error: Any = None) -> dict[str, Any]:
        return {"status": status}

    def record(self, response: dict[str, Any]) -> dict[str, Any]:
        return {"response": response}


@pytest.mark.asyncio
async def test_a_background_run_goes_on_past_a_client_it_cut_off(monkeypatch) -> None:
    """Through the Responses API's background task: 10,000 events for a client that reads
    none leave at most the bound queued, and the run reaches its end."""
    ran: list[int] = []

    async def run_detached(gw, req, out, sink, admitted):
        for i in range(10_000):
            sink(f"data: {json.dumps({'i': i})}\n\n")
        ran.append(1)
        return {}

    monkeypatch.setattr(responses, "run_detached", run_detached)
    gw = SimpleNamespace(responses=_Store(), background={})
    req = SimpleNamespace(rid="resp_1")
    relay = EventRelay(_cut, limit=64)
    gw.background["resp_1"] = task = asyncio.ensure_future(
        responses._background(gw, req, _Out(), relay)
    )
    await asyncio.wait_for(task, 10)
    assert ran == [1] and relay.cut and relay.behind == 64 + 2
    assert "resp_1" not in gw.background
    events = await _read_all(relay)
    assert len(events) == 65 and events[-1] == "cut 64"
