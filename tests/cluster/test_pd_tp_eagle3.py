"""EAGLE-3 under PD and tensor parallelism together, with real processes: two workers, each
driving two tensor-parallel ranks (gloo) of the tiny Llama with the same random EAGLE-3 head
(the head runs whole on each driver: the layers' inputs are all-reduced there). Co-located
first, then flipped to a prefill and a decode worker (each rank pushing its own KV heads with
Mooncake, the head's states pushed by the driver with rank 0's): the decode worker's tokens and speculation
counters grow exactly as the co-located workers' did on the same prompts."""

from __future__ import annotations

import pytest
from cluster_helpers import set_roles, start_cluster
from test_pd_eagle3 import COUNTERS, complete, eagle3_spec, spec_counters

from tests.deps import MOONCAKE, require
from tests.engine.test_speculative import repetitive_prompts

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    spec = eagle3_spec(model, tmp_path_factory)
    # NOTE: no prefix caching: each request runs from its first token in both phases.
    engine = {"speculative_config": spec, "enable_prefix_caching": False,
              "tensor_parallel_size": 2}  # fmt: skip
    c = start_cluster(model, workers=2, engine_overrides=engine)
    yield c
    c.stop()


def test_pd_tp2_drafts_and_accepts_as_colocated_tp2(cluster):
    """Before this test nothing ran EAGLE-3 with PD and TP at once (test_pd_eagle3: TP 1;
    test_tensor_parallel_cluster: n-gram)."""
    prompts = repetitive_prompts()[:3]

    def run() -> tuple[list, dict[str, float]]:
        before = spec_counters(cluster)
        tokens = [complete(cluster.base_url, p) for p in prompts]
        after = spec_counters(cluster)
        return tokens, {k: after[k] - before[k] for k in after}

    colocated, want = run()
    assert want["num_drafts"] > 0 and want["num_accepted_tokens"] > 0
    set_roles(cluster, {"worker-0": "prefill", "worker-1": "decode"})
    try:
        pd, got = run()  # no mixed worker left: every request went PD
        assert pd == colocated
        assert (got.pop("push"), got.pop("grpc")) == (len(prompts), 0)  # not through the router
        assert {k: got[k] for k in COUNTERS} == {k: want[k] for k in COUNTERS}
    finally:
        set_roles(cluster, {"worker-0": "mixed", "worker-1": "mixed"})
