"""Find a rebalancing policy by name. Each policy lives in its own module of this package."""

from __future__ import annotations

import importlib
from typing import Any

from services.router.rebalance.base import RebalancePolicy

# name -> "module:Class"; imported on demand so a broken policy cannot break the others.
_POLICIES = {
    "static": "services.router.rebalance.static:StaticPolicy",
    "queue": "services.router.rebalance.queue:QueuePolicy",
    "slo": "services.router.rebalance.slo:SLOPolicy",
}


def available_rebalance_policies() -> list[str]:
    return sorted(_POLICIES)


def create_rebalance_policy(name: str, **params: Any) -> RebalancePolicy:
    """The policy ``name`` with ``params`` (ValueError: unknown name or bad parameter)."""
    try:
        target = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown rebalance policy {name!r}; choose from "
            f"{', '.join(available_rebalance_policies())}"
        ) from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    policy = cls(**params)
    if not isinstance(policy, RebalancePolicy):
        raise TypeError(f"{target} is not a RebalancePolicy")
    return policy


def parse_params(text: str) -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` (ValueError on an item without ``=``)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"policy parameter {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out
