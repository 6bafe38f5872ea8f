"""EPDSERVE_DELIVERY_LOG (services/common/delivery_log.py): one ``HOP RID TIME`` line a
message a hop, in a file of each process's own; off unless set; a path that cannot be
written turns it off instead of failing the stream."""

from __future__ import annotations

import os

from services.common import delivery_log


def test_marks_go_to_the_process_file_in_order(tmp_path, monkeypatch):
    prefix = tmp_path / "hops"
    monkeypatch.setenv(delivery_log.ENV, str(prefix))
    monkeypatch.setattr(delivery_log, "_on", True)
    monkeypatch.setattr(delivery_log, "_file", None)
    for hop in ("w", "wd", "r", "s"):
        delivery_log.mark(hop, "req-1")
    delivery_log._file.close()
    lines = [ln.split() for ln in (tmp_path / f"hops.{os.getpid()}").read_text().splitlines()]
    assert [h for h, _, _ in lines] == ["w", "wd", "r", "s"]
    assert {rid for _, rid, _ in lines} == {"req-1"}
    times = [float(t) for _, _, t in lines]
    assert times == sorted(times)


def test_off_writes_nothing_and_a_bad_path_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery_log, "_file", None)
    monkeypatch.setattr(delivery_log, "_on", False)
    monkeypatch.setenv(delivery_log.ENV, str(tmp_path / "hops"))
    delivery_log.mark("w", "a")
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(delivery_log.ENV, str(tmp_path / "no" / "such" / "dir" / "hops"))
    monkeypatch.setattr(delivery_log, "_on", True)
    delivery_log.mark("w", "a")  # must not raise
    assert delivery_log._on is False
