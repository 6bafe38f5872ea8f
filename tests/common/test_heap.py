"""freeze_startup_objects: start-up's objects leave the collector's passes; later garbage does not."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from services.common.heap import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture()
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the session collects as before


def test_freeze_takes_live_objects_out_of_passes(unfrozen: None) -> None:
    live = _Node()
    freeze_startup_objects()
    assert gc.get_freeze_count() > 0
    assert not any(o is live for o in gc.get_objects())  # frozen: no pass walks it
    # Garbage made after the freeze is still found by a pass.
    _Node()
    assert gc.collect() >= 1
    assert not any(isinstance(o, _Node) and o is not live for o in gc.get_objects())
