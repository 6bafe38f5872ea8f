"""The PD dashboard: workers per role, their queues and KV use, and the KV transfer from
prefill to decode workers."""

from __future__ import annotations

from .spec import R_SERVING, RI, RM, TTFT_TPOT_P90, Board, Panel, Row, W, quantiles

BOARD = Board(
    "epdserve-pd",
    "epdserve / PD and KV transfer",
    "Prefill/decode disaggregation: workers per role, their queues and KV use, and "
    "the KV cache transferred from prefill to decode workers.",
    [
        Row("Roles"),
        Panel(
            "Serving workers by role",
            "Workers the routers can use now, per role.",
            [
                (
                    "{{role}}",
                    f"sum by (role) (max by (model_name, role) (epdserve:workers{R_SERVING}))",
                )
            ],
            stack=True,
        ),
        Panel(
            "Queued prompt tokens by role",
            "Prompt tokens waiting for prefill, summed per "
            "role, from the workers' load reports to the routers: the prefill backlog.",
            [
                (
                    "{{role}}",
                    "sum by (role) (max by (role, instance) "
                    f"(epdserve:router_worker_num_waiting_prompt_tokens{RM}))",
                )
            ],
        ),
        Panel(
            "KV-cache usage by role",
            "Mean KV-cache use of the workers of each role, from "
            "their load reports: decode workers fill up with long answers.",
            [
                (
                    "{{role}}",
                    "avg by (role) (max by (role, instance) "
                    f"(epdserve:router_worker_kv_cache_usage_perc{RM}))",
                )
            ],
            unit="percentunit",
        ),
        Panel(
            "Waiting requests by role",
            "Requests queued on the workers of each role.",
            [
                (
                    "{{role}}",
                    "sum by (role) (max by (role, instance) "
                    f"(epdserve:router_worker_num_requests_waiting{RM}))",
                )
            ],
        ),
        Row("KV transfer"),
        Panel(
            "KV transfer throughput",
            "Bytes per second of KV cache each prefill worker pushed into decode workers.",
            [
                (
                    "{{instance}}",
                    f"sum by (instance) (rate(epdserve:kv_transfer_bytes_total{W}{RI}))",
                )
            ],
            unit="Bps",
        ),
        Panel(
            "KV transfer time",
            "Seconds one request's KV transfer took (first write to last write), by quantile.",
            quantiles("epdserve:kv_transfer_seconds", W),
            unit="s",
        ),
        Panel(
            "KV transfers per second",
            "Requests whose KV a prefill worker transferred, per second.",
            [
                (
                    "{{instance}}",
                    f"sum by (instance) (rate(epdserve:kv_transfer_seconds_count{W}{RI}))",
                )
            ],
            unit="ops",
        ),
        Panel(
            "KV transfer failures",
            "Failed or timed-out KV transfers and decode reservations that expired unused, per second.",
            [
                (
                    "{{instance}}",
                    f"sum by (instance) (rate(epdserve:kv_transfer_failures_total{W}{RI}))",
                )
            ],
            unit="ops",
        ),
        Panel(
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
        ),
        Panel(
            "TTFT and TPOT (P90)",
            "90th percentile of time to first token (prefill-bound) "
            "and time per output token (decode-bound) over the selected workers.",
            TTFT_TPOT_P90,
            unit="s",
        ),
    ],
)
