"""Generate the chart's Grafana dashboards (deploy/helm/epdserve/dashboards/*.json).

Usage: python scripts/gen_dashboards.py [--out DIR]

One function per dashboard, panels as (title, description, queries) so that every panel has
a description and every query the same label filters; tests/deploy/test_dashboards.py fails
when the committed JSON is stale, and tests/cluster/test_metrics.py checks that every metric
a query names is exported by a live cluster. The metrics are documented in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "deploy" / "helm" / "epdserve" / "dashboards"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Label filters: worker series carry model_name; the router's cluster-wide series do not.
W = '{namespace=~"$namespace", model_name=~"$model"}'
R = '{namespace=~"$namespace"}'
RM = '{namespace=~"$namespace", model_name=~"$model"}'
RI = "[$__rate_interval]"
R_SERVING = '{namespace=~"$namespace", state="serving"}'
R_FAILED = '{namespace=~"$namespace", outcome!="success"}'
R_PREFILL = '{namespace=~"$namespace", role="prefill"}'
R_DECODE = '{namespace=~"$namespace", role="decode"}'
R_ENCODE = '{namespace=~"$namespace", role="encode"}'
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


# Phases of a request before its first token: (legend, metric, extra label filter). Router
# phases are the router's view, worker phases the workers' (docs/metrics.md).
TTFT_PHASES = (
    ("router queue", "epdserve:router_request_phase_seconds", 'phase="queue"'),
    ("encode", "epdserve:router_request_phase_seconds", 'phase="encode"'),
    ("reserve", "epdserve:router_request_phase_seconds", 'phase="reserve"'),
    ("prefill compute", "epdserve:request_phase_seconds", 'phase="prefill"'),
    ("KV transfer", "epdserve:request_phase_seconds", 'phase="kv_transfer"'),
    ("decode queue", "epdserve:request_phase_seconds", 'phase="decode_queue"'),
    ("first token (mixed)", "epdserve:time_to_first_token_seconds", 'role="mixed"'),
)


def ttft_breakdown() -> list[tuple[str, str]]:
    """Each TTFT phase's mean seconds per request (the routers' requests with a first token)."""
    requests = (
        f"scalar(clamp_min(sum(rate(epdserve:router_time_to_first_token_seconds_count{RM}{RI})),"
        " 1e-9))"
    )
    out = []
    for legend, metric, extra in TTFT_PHASES:
        filters = RM[:-1] + f", {extra}}}"
        out.append((legend, f"sum(rate({metric}_sum{filters}{RI})) / {requests}"))
    return out


class Board:
    """A dashboard under construction: panels laid out two per row (or as wide as asked)."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0

    def panel(
        self,
        title: str,
        description: str,
        queries: list[tuple[str, str]],
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 12,
        h: int = 8,
        stack: bool = False,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        targets = [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (legend, expr) in enumerate(queries)
        ]
        defaults: dict[str, Any] = {"unit": unit}
        if kind == "timeseries":
            defaults["custom"] = {
                "fillOpacity": 10,
                "showPoints": "never",
                "stacking": {"mode": "normal" if stack else "none"},
            }
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": targets,
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom"},
                "tooltip": {"mode": "multi"},
            }
            if kind == "timeseries"
            else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        }
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def to_json(self) -> dict[str, Any]:
        return {
            "__inputs": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Prometheus",
                    "type": "datasource",
                    "pluginId": "prometheus",
                    "pluginName": "Prometheus",
                }
            ],
            "title": self.title,
            "uid": self.uid,
            "description": self.description,
            "tags": ["epdserve"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "templating": {"list": _variables()},
            "annotations": {"list": []},
            "links": [
                {
                    "title": "epdserve dashboards",
                    "type": "dashboards",
                    "tags": ["epdserve"],
                    "asDropdown": True,
                }
            ],
            "panels": self.panels,
        }


def _variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": {"query": expr, "refId": name},
            "definition": expr,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {},
            "hide": 0,
            "sort": 1,
        }

    return [
        {
            "name": "DS_PROMETHEUS",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        query("namespace", "Namespace", "label_values(epdserve:workers, namespace)"),
        query(
            "model",
            "Model",
            'label_values(epdserve:worker_role{namespace=~"$namespace"}, model_name)',
        ),
    ]


def overview() -> Board:
    b = Board(
        "epdserve-overview",
        "epdserve / cluster overview",
        "Traffic, outcomes, workers, batch and KV cache of an epdserve cluster.",
    )
    b.row("Traffic")
    b.panel(
        "Serving workers",
        "Workers the routers can use now (reachable, not draining), "
        "all roles; the routers' view of etcd membership and load streams.",
        [("serving", f"sum(max by (role) (epdserve:workers{R_SERVING}))")],
        kind="stat",
        w=6,
    )
    b.panel(
        "Requests running (routers)",
        "Requests the routers are generating now.",
        [("running", f"sum(epdserve:router_num_requests_running{R})")],
        kind="stat",
        w=6,
    )
    b.panel(
        "Error ratio",
        "Share of API requests over the range that did not succeed "
        "(any outcome but success: invalid, unavailable, timeout, cancelled, error).",
        [
            (
                "errors",
                f"sum(rate(epdserve:router_requests_total{R_FAILED}{RI})) / "
                f"clamp_min(sum(rate(epdserve:router_requests_total{R}{RI})), 1e-9)",
            )
        ],
        unit="percentunit",
        kind="stat",
        w=6,
    )
    b.panel(
        "Prefix-cache hit rate",
        "Prompt tokens found in the workers' prefix caches / "
        "prompt tokens looked up, over the range.",
        [
            (
                "hit rate",
                f"sum(rate(epdserve:prefix_cache_hits_total{W}{RI})) / "
                f"clamp_min(sum(rate(epdserve:prefix_cache_queries_total{W}{RI})), 1e-9)",
            )
        ],
        unit="percentunit",
        kind="stat",
        w=6,
    )
    b.panel(
        "API requests by outcome",
        "Requests per second the routers answered, by API and "
        "outcome (success, invalid, unavailable, timeout, cancelled, error).",
        [
            (
                "{{api}} {{outcome}}",
                f"sum by (api, outcome) (rate(epdserve:router_requests_total{R}{RI}))",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Finished requests by reason",
        "Requests per second the workers finished, by "
        "finish reason (stop, length, abort: the caller went away, error).",
        [
            (
                "{{finished_reason}}",
                f"sum by (finished_reason) (rate(epdserve:request_success_total{W}{RI}))",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Token throughput",
        "Prompt and generated tokens per second over all workers.",
        [
            ("prompt", f"sum(rate(epdserve:prompt_tokens_total{W}{RI}))"),
            ("generation", f"sum(rate(epdserve:generation_tokens_total{W}{RI}))"),
        ],
        unit="short",
    )
    b.panel(
        "Workers by role and state",
        "Workers the routers know, by role and state (serving, draining, unreachable).",
        [("{{role}} {{state}}", f"max by (role, state) (epdserve:workers{R})")],
        stack=True,
    )
    b.row("Batch and KV cache")
    b.panel(
        "Running sequences per worker",
        "Sequences in each worker's running batch.",
        [("{{instance}}", f"sum by (instance) (epdserve:num_requests_running{W})")],
    )
    b.panel(
        "Waiting sequences per worker",
        "Sequences queued in each worker's scheduler, not yet running.",
        [("{{instance}}", f"sum by (instance) (epdserve:num_requests_waiting{W})")],
    )
    b.panel(
        "Queued prompt tokens per worker",
        "Prompt tokens still to compute for the "
        "waiting sequences of each worker (its prefill backlog).",
        [("{{instance}}", f"sum by (instance) (epdserve:num_waiting_prompt_tokens{W})")],
    )
    b.panel(
        "KV-cache usage per worker",
        "Fraction of each worker's KV-cache blocks in use.",
        [("{{instance}}", f"max by (instance) (epdserve:kv_cache_usage_perc{W})")],
        unit="percentunit",
    )
    b.panel(
        "Preemptions",
        "Sequences preempted per second (KV blocks taken back, the "
        "sequence recomputed later): a sign of a KV cache too small for the load.",
        [("{{instance}}", f"sum by (instance) (rate(epdserve:num_preemptions_total{W}{RI}))")],
    )
    b.panel(
        "Prefix-cache hit rate per worker",
        "Prompt tokens found in each worker's prefix cache / prompt tokens it looked up.",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(epdserve:prefix_cache_hits_total{W}{RI}))"
                f" / clamp_min(sum by (instance) (rate(epdserve:prefix_cache_queries_total{W}{RI}"
                ")), 1e-9)",
            )
        ],
        unit="percentunit",
    )
    b.panel(
        "KV blocks fetched from lower tiers",
        "Prompt KV blocks per second copied into device caches from the host pool or "
        "Mooncake Store instead of being recomputed (--kv-host-pool-bytes, --kv-store).",
        [("{{tier}}", f"sum by (tier) (rate(epdserve:kv_tier_hit_blocks_total{W}{RI}))")],
    )
    b.panel(
        "Prompt tokens computed",
        "Prompt tokens per second run through the model, against all prompt tokens served: "
        "the gap is what the prefix cache and the KV tiers saved.",
        [
            ("computed", f"sum(rate(epdserve:prompt_tokens_computed_total{W}{RI}))"),
            ("all prompt tokens", f"sum(rate(epdserve:prompt_tokens_total{W}{RI}))"),
        ],
    )
    return b


def latency() -> Board:
    b = Board(
        "epdserve-latency",
        "epdserve / latency",
        "P50/P90/P99 of TTFT, TPOT, inter-token latency and end-to-end latency, as the "
        "workers measure them and as the routers' clients see them.",
    )
    b.row("Workers (engine side)")
    b.panel(
        "Time to first token",
        "Seconds from a request's arrival at a worker to its first "
        "output token, over all selected workers.",
        quantiles("epdserve:time_to_first_token_seconds", W),
        unit="s",
    )
    b.panel(
        "Time per output token",
        "Per finished request: seconds after the first token "
        "divided by the tokens after it (TPOT).",
        quantiles("epdserve:time_per_output_token_seconds", W),
        unit="s",
    )
    b.panel(
        "Inter-token latency",
        "Seconds between two consecutive outputs of one request.",
        quantiles("epdserve:inter_token_latency_seconds", W),
        unit="s",
    )
    b.panel(
        "End-to-end request latency",
        "Seconds from a request's arrival at a worker to its last output.",
        quantiles("epdserve:e2e_request_latency_seconds", W),
        unit="s",
    )
    b.panel(
        "Mean TTFT per worker",
        "Mean time to first token of each worker over the range.",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(epdserve:time_to_first_token_seconds_sum"
                f"{W}{RI})) / clamp_min(sum by (instance) (rate("
                f"epdserve:time_to_first_token_seconds_count{W}{RI})), 1e-9)",
            )
        ],
        unit="s",
    )
    b.panel(
        "Mean TPOT per worker",
        "Mean time per output token of each worker over the range.",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(epdserve:time_per_output_token_seconds_sum"
                f"{W}{RI})) / clamp_min(sum by (instance) (rate("
                f"epdserve:time_per_output_token_seconds_count{W}{RI})), 1e-9)",
            )
        ],
        unit="s",
    )
    b.row("Where TTFT goes")
    b.panel(
        "Where TTFT goes",
        "Mean seconds per request spent in each phase before its first token, stacked: the "
        "router's queue (parsing, tokenization, routing), encode, reserve on the decode "
        "worker, prefill compute, the KV transfer's tail, the decode queue (PD), or the "
        "first token on a mixed worker. Each phase's time over the range divided by the "
        "requests that got a first token; the stack is close to the mean TTFT, the rest is "
        "gRPC and network.",
        ttft_breakdown(),
        unit="s",
        w=24,
        stack=True,
    )
    b.row("Routers (client side)")
    b.panel(
        "Time to first token (routers)",
        "Seconds from a request's arrival at a router to "
        "its first output: the worker's TTFT plus tokenization, routing and gRPC.",
        quantiles("epdserve:router_time_to_first_token_seconds", RM),
        unit="s",
    )
    b.panel(
        "End-to-end latency (routers)",
        "Seconds from a request's arrival at a router to its last output, by quantile.",
        quantiles("epdserve:router_e2e_request_latency_seconds", RM),
        unit="s",
    )
    b.panel(
        "P90 TTFT by API (routers)",
        "90th percentile of the routers' time to first "
        "token, per API (chat, completions, messages).",
        [
            (
                "{{api}}",
                "histogram_quantile(0.9, sum by (le, api) (rate("
                f"epdserve:router_time_to_first_token_seconds_bucket{RM}{RI})))",
            )
        ],
        unit="s",
    )
    b.panel(
        "Completed requests (routers)",
        "Requests per second whose last output the routers sent, by API.",
        [
            (
                "{{api}}",
                f"sum by (api) (rate(epdserve:router_e2e_request_latency_seconds_count{RM}{RI}))",
            )
        ],
        unit="reqps",
    )
    return b


def pd() -> Board:
    b = Board(
        "epdserve-pd",
        "epdserve / PD and KV transfer",
        "Prefill/decode disaggregation: workers per role, their queues and KV use, and "
        "the KV cache transferred from prefill to decode workers.",
    )
    b.row("Roles")
    b.panel(
        "Serving workers by role",
        "Workers the routers can use now, per role.",
        [("{{role}}", f"max by (role) (epdserve:workers{R_SERVING})")],
        stack=True,
    )
    b.panel(
        "Queued prompt tokens by role",
        "Prompt tokens waiting for prefill, summed per "
        "role, from the workers' load reports to the routers: the prefill backlog.",
        [
            (
                "{{role}}",
                "sum by (role) (max by (role, instance) "
                f"(epdserve:router_worker_num_waiting_prompt_tokens{R}))",
            )
        ],
    )
    b.panel(
        "KV-cache usage by role",
        "Mean KV-cache use of the workers of each role, from "
        "their load reports: decode workers fill up with long answers.",
        [
            (
                "{{role}}",
                "avg by (role) (max by (role, instance) "
                f"(epdserve:router_worker_kv_cache_usage_perc{R}))",
            )
        ],
        unit="percentunit",
    )
    b.panel(
        "Waiting requests by role",
        "Requests queued on the workers of each role.",
        [
            (
                "{{role}}",
                "sum by (role) (max by (role, instance) "
                f"(epdserve:router_worker_num_requests_waiting{R}))",
            )
        ],
    )
    b.row("KV transfer")
    b.panel(
        "KV transfer throughput",
        "Bytes per second of KV cache each prefill worker pushed into decode workers.",
        [("{{instance}}", f"sum by (instance) (rate(epdserve:kv_transfer_bytes_total{W}{RI}))")],
        unit="Bps",
    )
    b.panel(
        "KV transfer time",
        "Seconds one request's KV transfer took (first write to last write), by quantile.",
        quantiles("epdserve:kv_transfer_seconds", W),
        unit="s",
    )
    b.panel(
        "KV transfers per second",
        "Requests whose KV a prefill worker transferred, per second.",
        [("{{instance}}", f"sum by (instance) (rate(epdserve:kv_transfer_seconds_count{W}{RI}))")],
        unit="ops",
    )
    b.panel(
        "KV transfer failures",
        "Failed or timed-out KV transfers and decode reservations that expired unused, per second.",
        [("{{instance}}", f"sum by (instance) (rate(epdserve:kv_transfer_failures_total{W}{RI}))")],
        unit="ops",
    )
    b.panel(
        "Mean KV bytes per request",
        "KV-cache bytes moved per transferred request.",
        [
            (
                "bytes",
                f"sum(rate(epdserve:kv_transfer_bytes_total{W}{RI})) / clamp_min(sum("
                f"rate(epdserve:kv_transfer_seconds_count{W}{RI})), 1e-9)",
            )
        ],
        unit="bytes",
    )
    b.panel(
        "TTFT and TPOT (P90)",
        "90th percentile of time to first token (prefill-bound) "
        "and time per output token (decode-bound) over the selected workers.",
        [
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
        ],
        unit="s",
    )
    return b


def rebalancer() -> Board:
    b = Board(
        "epdserve-rebalancer",
        "epdserve / rebalancer",
        "The router's role rebalancer: its decisions, the role flips they caused, and "
        "the load signals its policies read.",
    )
    b.row("Decisions")
    b.panel(
        "Rebalance decisions",
        "Decisions per interval by policy and action "
        "(flip_to_prefill, flip_to_decode, flip_to_encode, flip_from_encode, hold, "
        "suppressed by cooldown, caps or the minimum per role).",
        [
            (
                "{{policy}} {{action}}",
                f"sum by (policy, action) (increase(epdserve:rebalance_decisions_total{R}{RI}))",
            )
        ],
        kind="timeseries",
        stack=True,
    )
    b.panel(
        "Role flips per worker",
        "Role changes of each worker per interval (its role epoch moving up).",
        [("{{instance}}", f"sum by (instance) (increase(epdserve:role_flips_total{W}{RI}))")],
    )
    b.panel(
        "Current role per worker",
        "The role each worker reports now (1 = current).",
        [("{{instance}} {{role}}", f"max by (instance, role) (epdserve:worker_role{W}) == 1")],
        w=24,
    )
    b.row("Policy inputs")
    b.panel(
        "Workers by role and state",
        "Workers per role and state (serving, draining, "
        "unreachable): a flip drains a worker first.",
        [("{{role}} {{state}}", f"max by (role, state) (epdserve:workers{R})")],
        stack=True,
    )
    b.panel(
        "Prefill backlog vs decode KV use",
        "The queue policy's two signals: prompt "
        "tokens queued on prefill workers, and the decode workers' mean KV-cache use.",
        [
            (
                "prefill queued tokens",
                "sum(max by (instance) ("
                f"epdserve:router_worker_num_waiting_prompt_tokens{R_PREFILL}))",
            ),
            (
                "decode KV use",
                f"avg(max by (instance) (epdserve:router_worker_kv_cache_usage_perc{R_DECODE}))",
            ),
        ],
    )
    b.panel(
        "Encoder backlog",
        "The encode rule's signal (queue and slo policies): images held per encoder, "
        "waiting or in the vision tower, from the encoders' load reports.",
        [
            (
                "images per encoder",
                "sum(max by (instance) (epdserve:router_worker_images_pending"
                f"{R_ENCODE})) / count(max by (instance) ("
                f"epdserve:router_worker_images_pending{R_ENCODE}))",
            ),
        ],
    )
    b.panel(
        "TTFT P90 vs TPOT P90",
        "The slo policy's two signals: 90th-percentile time to "
        "first token and time per output token over the selected workers.",
        [
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
        ],
        unit="s",
    )
    b.panel(
        "Decisions by action (range)",
        "Decisions over the dashboard's time range, by action.",
        [
            (
                "{{action}}",
                f"sum by (action) (increase(epdserve:rebalance_decisions_total{R}[$__range]))",
            )
        ],
        kind="stat",
    )
    return b


BOARDS = {
    "epdserve-overview.json": overview,
    "epdserve-latency.json": latency,
    "epdserve-pd.json": pd,
    "epdserve-rebalancer.json": rebalancer,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(fn().to_json(), indent=2) + "\n" for name, fn in BOARDS.items()}


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
