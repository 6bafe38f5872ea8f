"""The cluster overview dashboard: traffic, outcomes, workers, batch, KV cache and online /
offline co-location."""

from __future__ import annotations

from .spec import R_FAILED, R_SERVING, RI, RM, Board, Panel, R, Row, W, quantiles

BOARD = Board(
    "epdserve-overview",
    "epdserve / cluster overview",
    "Traffic, outcomes, workers, batch and KV cache of an epdserve cluster.",
    [
        Row("Traffic"),
        Panel(
            "Serving workers",
            "Workers the routers can use now (reachable, not draining), "
            "all roles; the routers' view of etcd membership and load streams.",
            [("serving", f"sum(max by (model_name, role) (epdserve:workers{R_SERVING}))")],
            kind="stat",
            w=6,
        ),
        Panel(
            "Requests running (routers)",
            "Requests the routers are generating now.",
            [("running", f"sum(epdserve:router_num_requests_running{R})")],
            kind="stat",
            w=6,
        ),
        Panel(
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
        ),
        Panel(
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
        ),
        Panel(
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
        ),
        Panel(
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
        ),
        Panel(
            "Token throughput",
            "Prompt and generated tokens per second over all workers.",
            [
                ("prompt", f"sum(rate(epdserve:prompt_tokens_total{W}{RI}))"),
                ("generation", f"sum(rate(epdserve:generation_tokens_total{W}{RI}))"),
            ],
            unit="short",
        ),
        Panel(
            "Workers by role and state",
            "Workers the routers know, by role and state (serving, draining, unreachable).",
            [
                (
                    "{{role}} {{state}}",
                    f"sum by (role, state) (max by (model_name, role, state) (epdserve:workers{RM}))",
                )
            ],
            stack=True,
        ),
        Row("Batch and KV cache"),
        Panel(
            "Running sequences per worker",
            "Sequences in each worker's running batch.",
            [("{{instance}}", f"sum by (instance) (epdserve:num_requests_running{W})")],
        ),
        Panel(
            "Waiting sequences per worker",
            "Sequences queued in each worker's scheduler, not yet running.",
            [("{{instance}}", f"sum by (instance) (epdserve:num_requests_waiting{W})")],
        ),
        Panel(
            "Queued prompt tokens per worker",
            "Prompt tokens still to compute for the "
            "waiting sequences of each worker (its prefill backlog).",
            [("{{instance}}", f"sum by (instance) (epdserve:num_waiting_prompt_tokens{W})")],
        ),
        Panel(
            "KV-cache usage per worker",
            "Fraction of each worker's KV-cache blocks in use.",
            [("{{instance}}", f"max by (instance) (epdserve:kv_cache_usage_perc{W})")],
            unit="percentunit",
        ),
        Panel(
            "Preemptions",
            "Sequences preempted per second (KV blocks taken back, the "
            "sequence recomputed later): a sign of a KV cache too small for the load.",
            [("{{instance}}", f"sum by (instance) (rate(epdserve:num_preemptions_total{W}{RI}))")],
        ),
        Panel(
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
        ),
        Panel(
            "Speculative decoding acceptance per worker",
            "Draft tokens accepted / draft tokens verified (workers with --speculative-config); "
            "the mean accepted length of a verification is 1 + accepted / verifications.",
            [
                (
                    "{{instance}}",
                    f"sum by (instance) (rate(epdserve:spec_decode_num_accepted_tokens_total{W}{RI}))"
                    f" / clamp_min(sum by (instance) (rate("
                    f"epdserve:spec_decode_num_draft_tokens_total{W}{RI})), 1e-9)",
                ),
                (
                    "position {{position}}",
                    f"sum by (position) (rate(epdserve:spec_decode_num_accepted_tokens_per_pos_total"
                    f"{W}{RI})) / clamp_min(sum by (position) (rate("
                    f"epdserve:spec_decode_num_draft_tokens_per_pos_total{W}{RI})), 1e-9)",
                ),
            ],
            unit="percentunit",
        ),
        Panel(
            "KV blocks fetched from lower tiers",
            "Prompt KV blocks per second copied into device caches from the host pool or "
            "Mooncake Store instead of being recomputed (--kv-host-pool-bytes, --kv-store).",
            [("{{tier}}", f"sum by (tier) (rate(epdserve:kv_tier_hit_blocks_total{W}{RI}))")],
        ),
        Panel(
            "Prompt tokens computed",
            "Prompt tokens per second run through the model, against all prompt tokens served: "
            "the gap is what the prefix cache and the KV tiers saved.",
            [
                ("computed", f"sum(rate(epdserve:prompt_tokens_computed_total{W}{RI}))"),
                ("all prompt tokens", f"sum(rate(epdserve:prompt_tokens_total{W}{RI}))"),
            ],
        ),
        Row("Online / offline co-location"),
        Panel(
            "Requests by service tier",
            "Completed requests per second by service tier: priority and default are online, "
            "flex is offline (OpenAI service_tier flex, batches).",
            [
                (
                    "{{service_tier}}",
                    f"sum by (service_tier) (rate(epdserve:router_tier_requests_total{R}{RI}))",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Generated tokens by service tier",
            "Output tokens per second of completed requests, by tier: what offline work gets "
            "of the capacity online work leaves.",
            [
                (
                    "{{service_tier}}",
                    "sum by (service_tier) (rate(epdserve:router_tier_tokens_total"
                    f'{{namespace=~"$namespace", kind="generation"}}{RI}))',
                )
            ],
        ),
        Panel(
            "Offline queue",
            "Offline requests waiting in the routers for headroom (queued prompt tokens, KV "
            "use, online TTFT/TPOT against the SLOs) and running.",
            [("{{state}}", f"sum by (state) (epdserve:router_offline_requests{R})")],
        ),
        Panel(
            "Engine sequences by class",
            "Sequences waiting and running in the engines, online (priority and default tiers) "
            "and offline (flex): the rebalancer decides roles on the online ones only.",
            [
                (
                    "{{service_class}} {{state}}",
                    f"sum by (service_class, state) (epdserve:num_requests_by_class{W})",
                )
            ],
        ),
        Panel(
            "Offline queue time",
            "Seconds offline requests waited in the routers' offline queue.",
            quantiles("epdserve:router_offline_queue_seconds", R),
            unit="s",
        ),
        Panel(
            "Preemptions by service tier",
            "Sequences preempted per second in the engines, by the preempted sequence's tier: "
            "offline work is preempted first when online work needs blocks or slots.",
            [
                (
                    "{{service_tier}}",
                    "sum by (service_tier) "
                    f"(rate(epdserve:preemptions_by_service_tier_total{W}{RI}))",
                )
            ],
        ),
    ],
)
