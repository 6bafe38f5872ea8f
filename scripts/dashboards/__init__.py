"""The chart's Grafana dashboards as data, one module per dashboard; scripts/gen_dashboards.py
renders them to JSON."""

from __future__ import annotations

from . import latency, overview, pd, rebalancer
from .spec import Board

# File name -> dashboard.
BOARDS: dict[str, Board] = {
    f"{m.BOARD.uid}.json": m.BOARD for m in (overview, latency, pd, rebalancer)
}
