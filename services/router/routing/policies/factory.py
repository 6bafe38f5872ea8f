"""Find a routing policy by name. Each policy lives in its own module of this package."""

from __future__ import annotations

import importlib

from services.router.routing.policies.base import RoutingPolicy

# name -> "module:Class"; imported on demand so a broken policy cannot break the others.
_POLICIES = {
    "round_robin": "services.router.routing.policies.round_robin:RoundRobinPolicy",
    "least_load": "services.router.routing.policies.least_load:LeastLoadPolicy",
    "cache_aware": "services.router.routing.policies.cache_aware:CacheAwarePolicy",
}


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str) -> RoutingPolicy:
    try:
        target = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {', '.join(available_policies())}"
        ) from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    policy = cls()
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"{target} is not a RoutingPolicy")
    return policy
