"""The chart's Grafana dashboards: generated, fresh, and built the same way (data source,
variables, a description on every panel, quantile panels)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "helm" / "epdserve" / "dashboards"
DOC = ROOT / "docs" / "metrics.md"
NAME = re.compile(r"\bepdserve:[A-Za-z0-9_:]+")


def _gen() -> Any:
    path = ROOT / "scripts" / "gen_dashboards.py"
    spec = importlib.util.spec_from_file_location("gen_dashboards", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def test_dashboards_are_fresh() -> None:
    fresh = _gen().render()
    committed = {f.name: f.read_text() for f in DASHBOARDS.glob("*.json")}
    assert committed == fresh, "dashboards are stale: run python scripts/gen_dashboards.py"


@pytest.mark.parametrize("name", sorted(_gen().BOARDS))
def test_dashboard_shape(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert {"namespace", "model"} <= set(variables)
    panels = _panels(board)
    assert len(panels) >= 6
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p.get("description"), f"{name}: panel {p['title']!r} has no description"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert NAME.search(t["expr"]), t["expr"]
            assert 'namespace=~"$namespace"' in t["expr"], t["expr"]


@pytest.mark.parametrize("name", sorted(_gen().BOARDS))
def test_time_series_show_their_legend(name: str) -> None:
    # NOTE: grafana-foundation-sdk's default is a hidden legend; the generator turns it on.
    board = json.loads((DASHBOARDS / name).read_text())
    for p in _panels(board):
        if p["type"] == "timeseries":
            assert p["options"]["legend"]["showLegend"] is True, p["title"]


def test_latency_dashboard_has_p50_p90_p99() -> None:
    board = json.loads((DASHBOARDS / "epdserve-latency.json").read_text())
    for title in ("Time to first token", "Time per output token", "Inter-token latency",
                  "End-to-end request latency"):  # fmt: skip
        (panel,) = [p for p in _panels(board) if p["title"] == title]
        assert [t["legendFormat"] for t in panel["targets"]] == ["P50", "P90", "P99"]
        assert all(t["expr"].startswith("histogram_quantile(0.") for t in panel["targets"])


def test_dashboard_metrics_are_documented() -> None:
    documented = set(re.findall(r"`(epdserve:[a-z0-9_:]+)`", DOC.read_text()))
    used = set()
    for f in DASHBOARDS.glob("*.json"):
        for p in _panels(json.loads(f.read_text())):
            for t in p["targets"]:
                used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in NAME.findall(t["expr"])}
    assert used and not used - documented, used - documented


def test_speculation_panel_reads_what_workers_export() -> None:
    """Issue 20's dashboard panel: acceptance per worker and per draft position, from counters
    a speculating worker exports under those names (a rename on either side fails here)."""
    from types import SimpleNamespace

    from services.engine.speculative.stats import SpecStats
    from services.worker.metrics import WorkerMetrics
    from services.worker.state import WorkerState

    board = json.loads((DASHBOARDS / "epdserve-overview.json").read_text())
    (panel,) = [p for p in _panels(board) if "Speculative" in p["title"]]
    used = {n for t in panel["targets"] for n in NAME.findall(t["expr"])}
    assert {"epdserve:spec_decode_num_accepted_tokens_total",
            "epdserve:spec_decode_num_draft_tokens_total",
            "epdserve:spec_decode_num_accepted_tokens_per_pos_total",
            "epdserve:spec_decode_num_draft_tokens_per_pos_total"} <= used  # fmt: skip
    engine = SimpleNamespace(model_name="m", stats=lambda: SimpleNamespace(
        num_waiting=0, num_running=0, num_waiting_prompt_tokens=0, kv_utilization=0.0,
        spec=SpecStats(1, 2, 1, [1, 1], [1, 0])))  # fmt: skip
    registry = WorkerMetrics(engine, WorkerState("w", "inc", "mixed")).registry
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    assert used <= exported, used - exported
