"""Service tiers at the gateway: what each API's ``service_tier`` asks for, what an API key
allows, and the name each API gives the tier that served a request.

The engine's tiers (services/engine/service_tiers.py) are ``priority`` > ``default``
(online) > ``flex`` (offline). OpenAI's request values are the same names plus ``auto``;
Anthropic's are ``auto`` and ``standard_only`` (plus ``flex``, an epdserve extension the
message-batch runner uses), and its responses say ``standard``, ``priority`` or ``batch``.
``auto`` takes the API key's default tier. A key may also carry a highest tier: asking for
more is a 403 (an offline-only key cannot send ``priority`` or ``default``), and the most
urgent integer ``priority`` it may send (``min_priority=N``: lower is a 403).

On the Anthropic API, ``auto`` means what Anthropic's does: the priority tier where the key
has it (a key whose default tier is ``priority``, like an organisation with Priority Tier
capacity), else standard; ``standard_only`` never priority. Anthropic has no request value
that asks for the priority tier itself; epdserve takes ``priority`` as an extension (as it
takes ``flex``), allowed up to the key's highest tier like OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.engine.sampling_params import SamplingParams
from services.engine.service_tiers import DEFAULT, FLEX, PRIORITY, SERVICE_TIERS, check_priority
from services.router.errors import APIError, bad_request

AUTO = "auto"
OPENAI_REQUEST_TIERS = (AUTO, DEFAULT, FLEX, PRIORITY)
STANDARD_ONLY = "standard_only"
ANTHROPIC_REQUEST_TIERS = (AUTO, STANDARD_ONLY, PRIORITY, FLEX)
# The engine's tier -> Anthropic's usage.service_tier.
ANTHROPIC_SERVED = {PRIORITY: "priority", DEFAULT: "standard", FLEX: "batch"}


def _above(tier: str, limit: str) -> bool:
    """Whether ``tier`` is scheduled ahead of ``limit``."""
    return SERVICE_TIERS[tier] < SERVICE_TIERS[limit]


@dataclass(frozen=True)
class KeyTiers:
    """The tiers one API key may use: ``default`` for ``auto``, at most ``max``; and the
    lowest (most urgent) integer priority it may send, None: any."""

    default: str = DEFAULT
    max: str = PRIORITY
    min_priority: int | None = None

    def __post_init__(self) -> None:
        for name, tier in (("default_tier", self.default), ("max_tier", self.max)):
            if tier not in SERVICE_TIERS:
                raise ValueError(f"{name} must be one of {', '.join(SERVICE_TIERS)}, got {tier!r}")
        if _above(self.default, self.max):
            raise ValueError(f"default_tier {self.default!r} is above max_tier {self.max!r}")

    @classmethod
    def parse(cls, options: list[str]) -> KeyTiers:
        """From ``default_tier=T`` / ``max_tier=T`` / ``min_priority=N`` words; without a
        default, the key's default is ``default`` capped at its ``max``."""
        given: dict[str, str] = {}
        for opt in options:
            name, sep, value = opt.partition("=")
            if not sep or name not in ("default_tier", "max_tier", "min_priority"):
                raise ValueError(
                    f"unknown API key option {opt!r} (default_tier=, max_tier=, min_priority=)"
                )
            given[name] = value
        top = given.get("max_tier", PRIORITY)
        fallback = FLEX if top == FLEX else DEFAULT
        floor = given.get("min_priority")
        if floor is not None:
            try:
                check_priority(int(floor))
            except ValueError:
                raise ValueError(f"min_priority must be a 32-bit integer, got {floor!r}") from None
        return cls(given.get("default_tier", fallback), top, None if floor is None else int(floor))

    def allow(self, tier: str) -> str:
        """``tier`` if this key may use it, else a 403."""
        if _above(tier, self.max):
            raise APIError(
                403, f"this API key may use service tiers up to '{self.max}'; "
                f"'{tier}' was asked for", param="service_tier", code="service_tier_not_allowed",
            )  # fmt: skip
        return tier

    def allow_priority(self, priority: int) -> int:
        """``priority`` if this key may send it, else a 403."""
        if self.min_priority is not None and priority < self.min_priority:
            raise APIError(
                403, f"this API key may send priority {self.min_priority} or higher (lower "
                f"runs first); {priority} was sent", param="priority",
                code="priority_not_allowed",
            )  # fmt: skip
        return priority


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


def openai_params(
    params: SamplingParams, asked: str | None, key: KeyTiers | None
) -> SamplingParams:
    """``params`` with the engine tier of an OpenAI ``service_tier`` and the integer priority
    checked against the key (403s). NOTE: ``params`` itself when neither changes: a new one is
    checked again in its ``__post_init__`` (~10 us a request)."""
    tier = openai_tier(asked, key)
    priority = (key or OPEN).allow_priority(params.priority)
    if tier == params.service_tier and priority == params.priority:
        return params
    return replace(params, service_tier=tier, priority=priority)


def anthropic_tier(asked: str | None, key: KeyTiers | None) -> str:
    """The engine tier of an Anthropic ``service_tier`` (None: ``auto``)."""
    key = key or OPEN
    if asked is None or asked == AUTO:
        return key.default
    if asked == STANDARD_ONLY:
        return DEFAULT if key.default == PRIORITY else key.default
    if asked in (PRIORITY, FLEX):
        return key.allow(asked)
    raise bad_request(
        f"service_tier: must be one of {', '.join(ANTHROPIC_REQUEST_TIERS)}, got {asked!r}"
    )
