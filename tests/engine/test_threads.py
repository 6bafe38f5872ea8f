"""The engine's threads carry names the OS shows (top -H, ps -L, py-spy)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from services.engine.threads import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _comm_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_gets_its_os_name_cut_to_fifteen_bytes():
    seen: dict[str, str] = {}

    def run() -> None:
        name_os_thread("engine-step-and-more")
        seen["comm"] = _comm_of(threading.get_native_id())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["comm"] == "engine-step-and"
    assert _comm_of(threading.get_native_id()) != "engine-step-and"  # only that thread
