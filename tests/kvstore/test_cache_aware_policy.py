"""The cache-aware routing policy: prefix held vs load, tiers weighed, PD pairs, and the
fallback to least-load without cache information."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.proto import worker_pb2 as pb
from services.router.routing.policies.base import CachedPrefix, RouteRequest
from services.router.routing.policies.cache_aware import CacheAwarePolicy
from services.router.routing.policies.factory import create_policy


@dataclass
class W:
    id: str
    inflight: int = 0
    ended_since_report: int = 0
    prompt_tokens_ended_since_report: int = 0
    load: pb.LoadReport | None = None


def req(cached: dict[str, CachedPrefix], tokens: int = 1024) -> RouteRequest:
    return RouteRequest("r", tokens, list(range(tokens)), cached=cached)


def test_found_by_name_and_uses_the_index() -> None:
    p = create_policy("cache_aware")
    assert isinstance(p, CacheAwarePolicy) and p.uses_kv_index


def test_prefers_the_worker_holding_the_prefix() -> None:
    p = CacheAwarePolicy()
    a, b, c = W("a"), W("b"), W("c")
    r = req({"b": CachedPrefix(device=896, host=896, total=896)})
    assert all(p.select([a, b, c], r).id == "b" for _ in range(5))


def test_device_beats_host_beats_store() -> None:
    p = CacheAwarePolicy()
    dev, host, store = W("dev"), W("host"), W("store")
    r = req({
        "dev": CachedPrefix(512, 512, 512),
        "host": CachedPrefix(0, 512, 512),
        "store": CachedPrefix(0, 0, 512),
    })  # fmt: skip
    assert p.select([store, host, dev], r).id == "dev"
    assert p.select([store, host], r).id == "host"
    assert p.select([store, W("none")], r).id == "store"


def test_a_report_from_before_the_last_prefill_ended_does_not_push_a_repeat_away() -> None:
    # The holder reported while this router's previous request (300 prompt tokens) was still
    # queued there; that prefill has since ended. Counting it sent 1 in 5 repeats of an
    # image prompt to the other prefill worker (tests/cluster/test_epd_qwen25.py, loaded machine).
    p = CacheAwarePolicy()
    stale = pb.LoadReport(num_inflight=1, num_waiting_prompt_tokens=300)
    holder, other = W("a", load=stale), W("b", load=pb.LoadReport())
    r = req({"a": CachedPrefix(288, 288, 288)}, tokens=300)
    assert p.select([holder, other], r).id == "b"  # the report alone
    holder.ended_since_report, holder.prompt_tokens_ended_since_report = 1, 300
    assert all(p.select([holder, other], r).id == "a" for _ in range(4))
    # The router's own current count still holds when the report is behind it.
    holder.inflight = 2
    assert p.cost(holder, r, 1.0) >= 2 * p.request_tokens


def test_an_overloaded_holder_loses_to_an_idle_worker() -> None:
    p = CacheAwarePolicy()
    holder = W("a", load=pb.LoadReport(num_inflight=4, num_waiting_prompt_tokens=8192))
    idle = W("b", load=pb.LoadReport())
    r = req({"a": CachedPrefix(768, 768, 768)})
    assert p.select([holder, idle], r).id == "b"
    # Busy but not swamped, the holder still wins: recomputing the prefix costs more.
    holder.load = pb.LoadReport(num_inflight=2, kv_utilization=0.5)
    assert p.select([holder, idle], r).id == "a"


def test_without_cache_information_it_is_least_load() -> None:
    p = CacheAwarePolicy()
    busy, idle = W("a", inflight=2), W("b")
    assert p.select([busy, idle], req({})).id == "b"
    # Ties rotate so an idle cluster spreads requests.
    assert {p.select([W("x"), W("y")], req({})).id for _ in range(4)} == {"x", "y"}
    # ... in pairs too: each side rotates on its own (a shared turn would step by two).
    pairs = [p.select_pair([W("p1"), W("p2")], [W("d1")], req({})) for _ in range(4)]
    assert {prefill.id for prefill, _ in pairs} == {"p1", "p2"}


def test_pair_weighs_the_cache_on_the_prefill_side() -> None:
    p = CacheAwarePolicy()
    p1, p2 = W("p1"), W("p2")
    d1, d2 = W("d1", inflight=1), W("d2")
    r = req({"p2": CachedPrefix(900, 900, 900), "d1": CachedPrefix(900, 900, 900)})
    prefill, decode = p.select_pair([p1, p2], [d1, d2], r)
    assert prefill.id == "p2"
    # On the decode side a cached prefix counts little against a request in flight.
    assert decode.id == "d2"
