"""The latency dashboard: P50/P90/P99 of TTFT, TPOT, ITL and E2E from the workers and the
routers, and where a request's time before its first token goes."""

from __future__ import annotations

from .spec import RI, RM, Board, Panel, Row, W, quantiles

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


BOARD = Board(
    "epdserve-latency",
    "epdserve / latency",
    "P50/P90/P99 of TTFT, TPOT, inter-token latency and end-to-end latency, as the "
    "workers measure them and as the routers' clients see them.",
    [
        Row("Workers (engine side)"),
        Panel(
            "Time to first token",
            "Seconds from a request's arrival at a worker to its first "
            "output token, over all selected workers.",
            quantiles("epdserve:time_to_first_token_seconds", W),
            unit="s",
        ),
        Panel(
            "Time per output token",
            "Per finished request: seconds after the first token "
            "divided by the tokens after it (TPOT).",
            quantiles("epdserve:time_per_output_token_seconds", W),
            unit="s",
        ),
        Panel(
            "Inter-token latency",
            "Seconds between two consecutive outputs of one request.",
            quantiles("epdserve:inter_token_latency_seconds", W),
            unit="s",
        ),
        Panel(
            "End-to-end request latency",
            "Seconds from a request's arrival at a worker to its last output.",
            quantiles("epdserve:e2e_request_latency_seconds", W),
            unit="s",
        ),
        Panel(
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
        ),
        Panel(
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
        ),
        Row("Where TTFT goes"),
        Panel(
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
        ),
        Row("Routers (client side)"),
        Panel(
            "Time to first token (routers)",
            "Seconds from a request's arrival at a router to "
            "its first output: the worker's TTFT plus tokenization, routing and gRPC.",
            quantiles("epdserve:router_time_to_first_token_seconds", RM),
            unit="s",
        ),
        Panel(
            "End-to-end latency (routers)",
            "Seconds from a request's arrival at a router to its last output, by quantile.",
            quantiles("epdserve:router_e2e_request_latency_seconds", RM),
            unit="s",
        ),
        Panel(
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
        ),
        Panel(
            "Completed requests (routers)",
            "Requests per second whose last output the routers sent, by API.",
            [
                (
                    "{{api}}",
                    f"sum by (api) (rate(epdserve:router_e2e_request_latency_seconds_count{RM}{RI}))",
                )
            ],
            unit="reqps",
        ),
    ],
)
