"""The router's settings of its role rebalancer and of offline work (the flex tier's
admission and the Batch APIs' jobs): RouterConfig (config.py) inherits both, so each field is
one flag of the router and one key of the chart like the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.router.rebalance.factory import (
    available_rebalance_policies,
    create_rebalance_policy,
    parse_params,
)
from services.router.rebalance.governor import GovernorConfig

# Upper bounds of durations: a value of 1e300 passed the lower bounds and switched a check off
# or overflowed where it was used (int(), an etcd lease TTL, a date).
DAY_S = 86400
WEEK_S = 7 * DAY_S
YEAR_S = 365 * DAY_S


@dataclass
class RebalanceSettings:
    """How the leader router moves workers between roles (rebalance/)."""

    rebalance_policy: str = field(
        default="static",
        metadata={
            "help": "role rebalancing policy: " + ", ".join(available_rebalance_policies()),
            "choices": tuple(available_rebalance_policies()),
        },
    )
    rebalance_params: str = field(
        default="",
        metadata={"help": "parameters of the rebalancing policy, as k=v,k=v"},
    )
    rebalance_interval_s: float = field(
        default=2.0, metadata={"help": "seconds between two rebalancing rounds"}
    )
    rebalance_hysteresis_rounds: int = field(
        default=3, metadata={"help": "a flip must be proposed this many rounds in a row"}
    )
    rebalance_cooldown_s: float = field(
        default=30.0, metadata={"help": "no role flip sooner than this after the previous one"}
    )
    rebalance_max_flips: int = field(
        default=2, metadata={"help": "at most this many flips per --rebalance-flip-window-s"}
    )
    rebalance_flip_window_s: float = field(
        default=300.0, metadata={"help": "the window of --rebalance-max-flips, in seconds"}
    )

    def _check_rebalance(self) -> None:
        if not 0 < self.rebalance_interval_s <= DAY_S:
            raise ValueError(f"rebalance_interval_s must be in (0, {DAY_S}]")
        if max(self.rebalance_cooldown_s, self.rebalance_flip_window_s) > WEEK_S:
            raise ValueError(f"rebalance_cooldown_s and rebalance_flip_window_s must be <= "
                             f"{WEEK_S} (a week)")  # fmt: skip
        _ = self.governor_config  # validates hysteresis, cooldown and cap
        create_rebalance_policy(self.rebalance_policy, **self.rebalance_param_dict)

    @property
    def rebalance_param_dict(self) -> dict[str, str]:
        return parse_params(self.rebalance_params)

    @property
    def governor_config(self) -> GovernorConfig:
        return GovernorConfig(
            hysteresis_rounds=self.rebalance_hysteresis_rounds,
            cooldown_s=self.rebalance_cooldown_s,
            max_flips=self.rebalance_max_flips,
            flip_window_s=self.rebalance_flip_window_s,
        )


@dataclass
class OfflineSettings:
    """How the router admits offline (service tier flex) work (offline.py) and runs batch
    jobs (batches/)."""

    offline_max_queued_tokens: int = field(default=1048576, metadata={
        "help": "prompt tokens of offline requests the router holds, waiting or running; "
        "more: 429"})  # fmt: skip
    offline_max_waiting: int = field(default=4096, metadata={
        "help": "offline requests waiting for headroom at most; more: 429"})  # fmt: skip
    offline_max_running: int = field(default=32, metadata={
        "help": "offline requests the router runs at once at most"})  # fmt: skip
    offline_queue_timeout_s: float = field(default=600.0, metadata={
        "help": "an offline request waiting this long for headroom gets 503"})  # fmt: skip
    offline_headroom_tokens: int = field(default=2048, metadata={
        "help": "a worker with more queued prompt tokens takes no offline work"})  # fmt: skip
    offline_headroom_kv: float = field(default=0.9, metadata={
        "help": "a worker with a higher KV use (0-1) takes no offline work"})  # fmt: skip
    slo_ttft_ms: float = field(default=2000.0, metadata={
        "help": "online time-to-first-token SLO: a worker whose recent online mean is above "
        "it takes no offline work (0: off)"})  # fmt: skip
    slo_tpot_ms: float = field(default=200.0, metadata={
        "help": "online time-per-output-token SLO: a worker whose recent online mean is "
        "above it takes no offline work (0: off)"})  # fmt: skip
    batch_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of the Batch APIs' files and results, and of large stored "
            "Responses API responses; every router of a cluster must see the same one "
            "(default: <tmp>/epdserve-batches-<cluster>)"
        },
    )
    batch_retention_s: float = field(default=30 * 86400.0, metadata={
        "help": "ended batches (records, output files) and files no running batch reads are "
        "deleted this long after they ended or were made (0: kept for ever)"})  # fmt: skip
    batch_max_file_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"help": "largest batch input file (or message batch body) accepted (else 400)"},
    )
    batch_max_lines: int = field(
        default=50000, metadata={"help": "most requests in one batch (else 400)"}
    )
    batch_concurrency: int = field(
        default=8, metadata={"help": "lines of one batch the leader router runs at a time"}
    )

    def _check_offline(self) -> None:
        for name in (
            "batch_max_file_bytes", "batch_max_lines", "batch_concurrency",
            "offline_max_queued_tokens", "offline_max_waiting", "offline_max_running",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.batch_retention_s <= 10 * YEAR_S:  # NOTE: also false for NaN
            raise ValueError(f"batch_retention_s must be in [0, {10 * YEAR_S}] (ten years), "
                             f"got {self.batch_retention_s}")  # fmt: skip
        if not (
            0 < self.offline_queue_timeout_s <= DAY_S
            and 0 <= self.offline_headroom_kv <= 1
            and self.offline_headroom_tokens >= 0
        ):
            raise ValueError(f"offline_queue_timeout_s must be in (0, {DAY_S}], "
                             "offline_headroom_kv in [0, 1], offline_headroom_tokens >= 0")  # fmt: skip
        for slo in ("slo_ttft_ms", "slo_tpot_ms"):
            if not 0 <= getattr(self, slo) <= DAY_S * 1000:
                raise ValueError(f"{slo} must be in [0, {DAY_S * 1000}] (0: off)")
