"""Service tiers at the gateway: what each API's ``service_tier`` asks for, what an API key
allows, and the name each API gives the tier that served a request.

The engine's tiers (services/engine/service_tiers.py) are ``priority`` > ``default``
(online) > ``flex`` (offline). OpenAI's request values are the same names plus ``auto``;
Anthropic's are ``auto`` and ``standard_only`` (plus ``flex``, an epdserve extension the
message-batch runner uses), and its responses say ``standard``, ``priority`` or ``batch``.
``auto`` takes the API key's default tier. A key may also carry a highest tier: asking for
more is a 403 (an offline-only key cannot send ``priority`` or ``default``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.service_tiers import DEFAULT, FLEX, PRIORITY, SERVICE_TIERS
from services.router.errors import APIError, bad_request

AUTO = "auto"
OPENAI_REQUEST_TIERS = (AUTO, DEFAULT, FLEX, PRIORITY)
STANDARD_ONLY = "standard_only"
ANTHROPIC_REQUEST_TIERS = (AUTO, STANDARD_ONLY, FLEX)
# The engine's tier -> Anthropic's usage.service_tier.
ANTHROPIC_SERVED = {PRIORITY: "priority", DEFAULT: "standard", FLEX: "batch"}


def _above(tier: str, limit: str) -> bool:
    """Whether ``tier`` is scheduled ahead of ``limit``."""
    return SERVICE_TIERS[tier] < SERVICE_TIERS[limit]


@dataclass(frozen=True)
class KeyTiers:
    """The tiers one API key may use: ``default`` for ``auto``, at most ``max``."""

    default: str = DEFAULT
    max: str = PRIORITY

    def __post_init__(self) -> None:
        for name, tier in (("default_tier", self.default), ("max_tier", self.max)):
            if tier not in SERVICE_TIERS:
                raise ValueError(f"{name} must be one of {', '.join(SERVICE_TIERS)}, got {tier!r}")
        if _above(self.default, self.max):
            raise ValueError(f"default_tier {self.default!r} is above max_tier {self.max!r}")

    @classmethod
    def parse(cls, options: list[str]) -> KeyTiers:
        """From ``default_tier=T`` / ``max_tier=T`` words; without a default, the key's
        default is ``default`` capped at its ``max``."""
        given: dict[str, str] = {}
        for opt in options:
            name, sep, value = opt.partition("=")
            if not sep or name not in ("default_tier", "max_tier"):
                raise ValueError(f"unknown API key option {opt!r} (default_tier=, max_tier=)")
            given[name] = value
        top = given.get("max_tier", PRIORITY)
        fallback = FLEX if top == FLEX else DEFAULT
        return cls(given.get("default_tier", fallback), top)

    def allow(self, tier: str) -> str:
        """``tier`` if this key may use it, else a 403."""
        if _above(tier, self.max):
            raise APIError(
                403, f"this API key may use service tiers up to '{self.max}'; "
                f"'{tier}' was asked for", param="service_tier", code="service_tier_not_allowed",
            )  # fmt: skip
        return tier


OPEN = KeyTiers()  # no API keys configured, or a request from inside the router (batches)


def openai_tier(asked: str | None, key: KeyTiers | None) -> str:
    """The engine tier of an OpenAI ``service_tier`` (None: ``auto``)."""
    key = key or OPEN
    if asked is None or asked == AUTO:
        return key.default
    if asked not in SERVICE_TIERS:
        raise bad_request(
            f"'service_tier' must be one of {', '.join(OPENAI_REQUEST_TIERS)}, got {asked!r}",
            param="service_tier",
        )
    return key.allow(asked)


def anthropic_tier(asked: str | None, key: KeyTiers | None) -> str:
    """The engine tier of an Anthropic ``service_tier`` (None: ``auto``)."""
    key = key or OPEN
    if asked is None or asked == AUTO:
        return key.default
    if asked == STANDARD_ONLY:
        return DEFAULT if key.default == PRIORITY else key.default
    if asked == FLEX:
        return FLEX
    raise bad_request(
        f"service_tier: must be one of {', '.join(ANTHROPIC_REQUEST_TIERS)}, got {asked!r}"
    )
