"""Generate the chart's Grafana dashboards (deploy/helm/epdserve/dashboards/*.json).

Usage: python scripts/gen_dashboards.py [--out DIR]

What each dashboard shows is data in scripts/dashboards/ (one module per dashboard, panels as
title, description and (legend, PromQL) queries); this script renders it with the Grafana
Foundation SDK. tests/deploy/test_dashboards.py fails when the committed JSON is stale, and
tests/cluster/test_metrics_cluster.py checks that every metric a query names is exported by a
live cluster. The metrics are documented in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    StackingMode,
    TooltipDisplayMode,
    VisibilityMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboards import BOARDS  # noqa: E402
from dashboards.spec import Board, Panel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "deploy" / "helm" / "epdserve" / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
# The data source Grafana's import dialog asks for (the SDK has no builder for __inputs).
INPUTS = [
    {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "type": "datasource",
        "pluginId": "prometheus",
        "pluginName": "Prometheus",
    }
]
# NOTE: the SDK's SortOrder lacks Grafana's "none" (series in query order, Grafana's default).
TOOLTIP_UNSORTED = cast(SortOrder, "none")


def query_variable(name: str, label: str, expr: str) -> dashboard.QueryVariable:
    """A multi-value label filter with "All" (matching ``.*``)."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query({"query": expr, "refId": name})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .multi(True)
        .all_value(".*")
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


VARIABLES = [
    dashboard.DatasourceVariable("DS_PROMETHEUS").label("Data source").type("prometheus"),
    query_variable("namespace", "Namespace", "label_values(epdserve:workers, namespace)"),
    query_variable(
        "model", "Model", 'label_values(epdserve:worker_role{namespace=~"$namespace"}, model_name)'
    ),
]


def panel(p: Panel) -> timeseries.Panel | stat.Panel:
    """The SDK builder of one panel (a time series, or a stat of each query's last value)."""
    builder: timeseries.Panel | stat.Panel
    if p.kind == "stat":
        builder = stat.Panel().reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
    else:
        # NOTE: the SDK's default show_legend (False) hides the legend.
        legend = (
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
        )
        builder = (
            timeseries.Panel()
            .fill_opacity(10)
            .show_points(VisibilityMode.NEVER)
            .stacking(
                common.StackingConfig().mode(StackingMode.NORMAL if p.stack else StackingMode.NONE)
            )
            .legend(legend)
            .tooltip(
                common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(TOOLTIP_UNSORTED)
            )
        )
    targets = [
        prometheus.Dataquery()
        .ref_id(chr(ord("A") + i))
        .expr(expr)
        .legend_format(legend)
        .datasource(DS)
        for i, (legend, expr) in enumerate(p.queries)
    ]
    return (
        builder.title(p.title)
        .description(p.description)
        .datasource(DS)
        .unit(p.unit)
        .span(p.w)
        .height(p.h)
        .targets(targets)
    )


def to_json(board: Board) -> dict[str, Any]:
    """The dashboard's JSON model: the SDK lays the panels out left to right, rows across."""
    builder = (
        dashboard.Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags(["epdserve"])
        .version(1)
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .variables(VARIABLES)
        .link(
            dashboard.DashboardLink("epdserve dashboards")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(["epdserve"])
            .as_dropdown(True)
        )
    )
    for panel_id, p in enumerate(board.panels, start=1):
        if isinstance(p, Panel):
            builder.with_panel(panel(p).id(panel_id))
        else:
            builder.with_row(dashboard.Row(p.title).id(panel_id))
    model = builder.build()
    # The panels use Grafana 10.3's schema; the SDK's default (36) would migrate them on load.
    model.schema_version = 39
    # The SDK sets "browser"; an empty timezone keeps each user's or org's preference.
    model.timezone = ""
    return {"__inputs": INPUTS, **model.to_json()}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        name: json.dumps(to_json(board), indent=2, cls=JSONEncoder) + "\n"
        for name, board in BOARDS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
