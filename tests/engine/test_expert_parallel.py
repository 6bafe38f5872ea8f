"""Expert parallelism (whole experts per rank, two processes, gloo) equals one device, and
expert load balancing (DeepSeek's EPLB) re-places experts mid-stream without changing a token;
the placement is saved, and an engine started from the file holds it."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM
from services.engine.eplb import ExpertPlacement, imbalance, load_placements, rebalance
from tests.engine.test_correctness import GREEDY, check, hf_greedy, prompts_of_mixed_lengths


def test_rebalance_replicates_the_hottest_expert() -> None:
    load = torch.tensor([400, 10, 10, 10, 10, 10, 10, 10])
    old = ExpertPlacement.contiguous(8, 2)
    assert imbalance(old.rank_loads(load)) == pytest.approx(430 / 235)
    new = rebalance(load, num_ranks=2, num_slots=10)
    assert new.slots_per_rank == 5
    # Both spare slots go to the hot expert (400/2 tokens per replica still beat 10), whose
    # three replicas then spread over both ranks: 133 x 2 + 10 x 3 against 133 + 10 x 4.
    assert len(new.replicas()[0]) == 3
    assert all(0 in rank for rank in new.ranks)
    assert imbalance(new.rank_loads(load)) == pytest.approx(296.67 / 235, rel=1e-3)
    # Without spare slots, packing alone still spreads the heavy experts.
    skewed = torch.tensor([90, 80, 70, 60, 4, 3, 2, 1])
    packed = rebalance(skewed, num_ranks=2, num_slots=8)
    assert imbalance(packed.rank_loads(skewed)) < imbalance(old.rank_loads(skewed))
    with pytest.raises(ValueError, match="evenly"):
        rebalance(load, num_ranks=3, num_slots=8)


EP = {"device": "cpu", "dtype": "float32", "block_size": 4, "tensor_parallel_size": 2,
      "enable_expert_parallel": True}  # fmt: skip


@pytest.fixture(scope="module")
def ep(tiny_model_dir, tmp_path_factory):
    """(references, a Qwen2-MoE engine on 2 ranks with 4 of the 8 experts each; its shared
    expert and dense second layer stay tensor-parallel). Its placement file does not exist
    yet: it starts contiguous, and writes the file when it re-places."""
    model = tiny_model_dir("qwen2_moe")
    refs = hf_greedy(model, prompts_of_mixed_lengths(), GREEDY.max_tokens)
    path = tmp_path_factory.mktemp("eplb") / "placement.json"
    llm = LLM(str(model), eplb_placement=str(path), **EP)
    yield refs, llm
    llm.engine.close()


def test_ep2_matches_single_device(ep) -> None:
    refs, llm = ep
    experts = llm.engine.runner.model.moe_blocks[0].experts
    assert experts.w13.shape[0] == 4 and experts.placement == ExpertPlacement.contiguous(8, 2)
    check(llm.generate(prompts_of_mixed_lengths(), GREEDY), refs)


def test_eplb_mid_stream_leaves_outputs_unchanged(ep) -> None:
    refs, llm = ep
    engine = llm.engine
    prompts = prompts_of_mixed_lengths()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)

    for _ in range(4):
        step()
    # Two spare slots: the hottest experts get a replica on the other rank.
    report = engine.executor.rebalance_experts(num_slots=10)
    experts = engine.runner.model.moe_blocks[0].experts
    assert experts.w13.shape[0] == 5 and experts.placement == report.placements[0]
    assert report.mean_after < report.mean_before
    while engine.has_unfinished_requests():
        step()
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == [r[0] for r in refs]
    assert load_placements(report.saved_to) == report.placements


def test_engine_starts_from_the_saved_placement(ep, tiny_model_dir) -> None:
    refs, llm = ep
    path = llm.engine.config.eplb_placement
    saved = load_placements(path)
    assert saved is not None and saved[0].slots_per_rank == 5  # the test above wrote it
    again = LLM(str(tiny_model_dir("qwen2_moe")), eplb_placement=path, **EP)
    try:
        assert [b.experts.placement for b in again.engine.runner.model.moe_blocks] == saved
        check(again.generate(prompts_of_mixed_lengths(), GREEDY), refs)
        # A placement for another model or rank count is refused, not half applied.
        with pytest.raises(ValueError, match="sparse layers"):
            again.engine.executor.rebalance_experts(placements=saved * 2)
    finally:
        again.engine.close()
