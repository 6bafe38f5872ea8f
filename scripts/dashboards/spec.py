"""What the dashboard modules are written in: boards, rows and panels as plain data, and the
PromQL pieces they share (label filters, P50/P90/P99 of a histogram)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Label filters: worker series and the router's pool series (epdserve:workers,
# router_worker_*) carry model_name; the router's cluster-wide series do not.
W = '{namespace=~"$namespace", model_name=~"$model"}'
R = '{namespace=~"$namespace"}'
RM = '{namespace=~"$namespace", model_name=~"$model"}'
RI = "[$__rate_interval]"
R_SERVING = '{namespace=~"$namespace", model_name=~"$model", state="serving"}'
R_FAILED = '{namespace=~"$namespace", outcome!="success"}'
R_PREFILL = '{namespace=~"$namespace", model_name=~"$model", role="prefill"}'
R_DECODE = '{namespace=~"$namespace", model_name=~"$model", role="decode"}'
R_ENCODE = '{namespace=~"$namespace", model_name=~"$model", role="encode"}'
QUANTILES = (("P50", 0.5), ("P90", 0.9), ("P99", 0.99))


def quantiles(metric: str, filters: str, by: str = "") -> list[tuple[str, str]]:
    """P50/P90/P99 of a histogram, summed over the selected series (``by``: kept labels)."""
    keep = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [
        (
            prefix + name,
            f"histogram_quantile({q}, sum by ({keep}) (rate({metric}_bucket{filters}{RI})))",
        )
        for name, q in QUANTILES
    ]


# The P90 of time to first token (prefill-bound) and of time per output token (decode-bound)
# over the selected workers: the PD dashboard's balance, the slo rebalancing policy's signals.
TTFT_TPOT_P90 = [
    (
        "TTFT P90",
        "histogram_quantile(0.9, sum by (le) (rate("
        f"epdserve:time_to_first_token_seconds_bucket{W}{RI})))",
    ),
    (
        "TPOT P90",
        "histogram_quantile(0.9, sum by (le) (rate("
        f"epdserve:time_per_output_token_seconds_bucket{W}{RI})))",
    ),
]


@dataclass(frozen=True)
class Row:
    """A row header: the panels after it, up to the next row, sit under it."""

    title: str


@dataclass(frozen=True)
class Panel:
    """One panel: queries are (legend, PromQL expr); laid out left to right, w of 24 wide."""

    title: str
    description: str
    queries: list[tuple[str, str]]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    w: int = 12
    h: int = 8
    stack: bool = False


@dataclass(frozen=True)
class Board:
    """One dashboard, written to ``<uid>.json``."""

    uid: str
    title: str
    description: str
    panels: list[Row | Panel] = field(default_factory=list)
