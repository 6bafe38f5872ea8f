"""Service tiers: the classes of requests the scheduler orders and preempts by (torch-free).

A request's tier says how it shares the engine: ``priority`` runs before ``default``
(online: chat, agents, with latency goals), which runs before ``flex`` (offline: bulk work
that fills the capacity online work leaves). Inside a tier, the integer ``priority`` orders
requests (lower first, as in vLLM), then arrival. The names are OpenAI's ``service_tier``
values; the gateways map each API's own values onto them.
"""

from __future__ import annotations

PRIORITY = "priority"
DEFAULT = "default"
FLEX = "flex"
# Scheduling rank of each tier: lower runs first and is never preempted for a higher one.
SERVICE_TIERS: dict[str, int] = {PRIORITY: 0, DEFAULT: 1, FLEX: 2}
ONLINE_TIERS = (PRIORITY, DEFAULT)
# The integer priority travels as the wire's int32.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
# A flex request that no step ran for this long (seconds) goes before the other offline work,
# and one left that long again takes the default (online) rank, so neither a stream of later
# online requests nor other offline work can starve it (EngineConfig.offline_aging_s;
# tier_policy.py).
DEFAULT_OFFLINE_AGING_S = 60.0


def check_service_tier(tier: object) -> str:
    """``tier`` if it names a tier; ValueError otherwise."""
    if not isinstance(tier, str) or tier not in SERVICE_TIERS:
        raise ValueError(f"service_tier must be one of {', '.join(SERVICE_TIERS)}, got {tier!r}")
    return tier


def check_priority(priority: object) -> int:
    """``priority`` if it is an integer the wire carries; ValueError otherwise."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {priority}")
    return priority
