"""The rebalancer dashboard: its decisions, the role flips they caused, and the load signals
its policies read."""

from __future__ import annotations

from .spec import R_DECODE, R_ENCODE, R_PREFILL, RI, RM, TTFT_TPOT_P90, Board, Panel, R, Row, W

BOARD = Board(
    "epdserve-rebalancer",
    "epdserve / rebalancer",
    "The router's role rebalancer: its decisions, the role flips they caused, and "
    "the load signals its policies read.",
    [
        Row("Decisions"),
        Panel(
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
            stack=True,
        ),
        Panel(
            "Role flips per worker",
            "Role changes of each worker per interval (its role epoch moving up).",
            [("{{instance}}", f"sum by (instance) (increase(epdserve:role_flips_total{W}{RI}))")],
        ),
        Panel(
            "Current role per worker",
            "The role each worker reports now (1 = current).",
            [("{{instance}} {{role}}", f"max by (instance, role) (epdserve:worker_role{W}) == 1")],
            w=24,
        ),
        Row("Policy inputs"),
        Panel(
            "Workers by role and state",
            "Workers per role and state (serving, draining, "
            "unreachable): a flip drains a worker first.",
            [
                (
                    "{{role}} {{state}}",
                    f"sum by (role, state) (max by (model_name, role, state) (epdserve:workers{RM}))",
                )
            ],
            stack=True,
        ),
        Panel(
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
        ),
        Panel(
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
        ),
        Panel(
            "TTFT P90 vs TPOT P90",
            "The slo policy's two signals: 90th-percentile time to "
            "first token and time per output token over the selected workers.",
            TTFT_TPOT_P90,
            unit="s",
        ),
        Panel(
            "Decisions by action (range)",
            "Decisions over the dashboard's time range, by action.",
            [
                (
                    "{{action}}",
                    f"sum by (action) (increase(epdserve:rebalance_decisions_total{R}[$__range]))",
                )
            ],
            kind="stat",
        ),
    ],
)
