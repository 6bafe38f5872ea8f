"""LoRA adapters in the engine: greedy tokens and logprobs equal transformers + peft for each
adapter (fused q/k/v and gate/up included), a batch mixing adapters and the base model equals
each run alone (in one pass and split over too few slots), and the prefix cache never shares
blocks across adapters."""

from __future__ import annotations

import time

import pytest

from services.engine import LLM, SamplingParams, lora_manager
from services.engine.distributed import RankFailure
from services.engine.layers import cpu_lora
from tests.engine.lora_helpers import build_adapter, peft_greedy
from tests.engine.test_correctness import prompts_of_mixed_lengths

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
# name -> (seed, rank, targets, rslora): all targets, attention only (k, v shards absent
# from q's), MLP only with rsLoRA scaling.
ADAPTERS = {
    "all": (1, 8, None, False),
    "attn": (2, 4, ["q_proj", "v_proj", "o_proj"], False),
    "mlp": (3, 16, ["gate_proj", "down_proj"], True),
}


def _nap(ctx, seconds: float) -> None:
    """Run on a tensor-parallel rank: keep it busy."""
    time.sleep(seconds)


def _rank_adapters(ctx) -> tuple[dict[str, str], list[str]]:
    """Run on a tensor-parallel rank: its adapters' paths and the names it read but holds
    unregistered."""
    loras = ctx.runner.lora
    return {n: a.path for n, a in loras.adapters.items()}, list(ctx.state.get("lora_read", {}))


def prompts() -> list[list[int]]:
    return prompts_of_mixed_lengths()[1:5]  # 5, 17, 33 and 64 tokens


@pytest.fixture(scope="module")
def setups(tiny_model_dir, tmp_path_factory):
    """``setups(family)`` -> (base folder, {adapter: folder}, {adapter or None: reference
    outputs}), built once per family."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            base = tiny_model_dir(family)
            folders = {
                name: build_adapter(base, tmp_path_factory.mktemp(f"lora-{name}"), *spec)
                for name, spec in ADAPTERS.items()
            }
            refs = peft_greedy(base, folders, prompts(), MAX_TOKENS)
            cache[family] = base, folders, refs
        return cache[family]

    return get


@pytest.fixture
def setup(setups):
    return setups("llama")


def engine(base, folders, **kwargs) -> LLM:
    modules = [f"{name}={folder}" for name, folder in folders.items()]
    kwargs = {"kv_cache_bytes": 8 << 20, "cpu_linear": "onednn", **kwargs}
    return LLM(str(base), dtype="float32", lora_modules=modules, **kwargs)


def check(outputs, refs) -> None:
    for out, (ref_tokens, ref_lps) in zip(outputs, refs, strict=True):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        for lp, ref in zip(got.logprobs, ref_lps, strict=True):
            assert abs(lp.logprob - ref) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_adapter_matches_peft(setups, family):
    base, folders, refs = setups(family)
    # Every adapter changes the output (else equality would prove nothing).
    for name in ADAPTERS:
        assert [t for t, _ in refs[name]] != [t for t, _ in refs[None]], name
    # Two slots for three adapters: the third one evicts the least recently used.
    llm = engine(base, folders, max_loras=2)
    for name in [*ADAPTERS, "all", None]:
        check(llm.generate(prompts(), GREEDY, lora=name), refs[name])
    assert len(llm.engine.loras.slots) == 2
    # What the worker's load reports say is in a slot (LoRA-aware routing): the last two used;
    # an adapter unloaded is no longer offered even while its slot is not yet reused.
    assert llm.engine.loras.resident_adapters() == sorted([list(ADAPTERS)[-1], "all"])
    llm.engine.loras.remove("all")
    assert llm.engine.loras.resident_adapters() == [list(ADAPTERS)[-1]]


@pytest.mark.parametrize("max_loras, tp", [(4, 1), (2, 1), (2, 2)])
def test_mixed_batch_equals_each_alone(setup, max_loras, tp, monkeypatch):
    """Three adapters and the base model in one batch; with 2 slots the batch runs in
    several passes. With two tensor-parallel ranks each holds its cut of the factors (B's
    rows of its q/k/v and gate/up outputs, A's columns of its o and down inputs), and an
    adapter added while the engine runs reaches both; one that a rank fails to read reaches
    none."""
    base, folders, refs = setup
    # On CPU the decode steps run the C kernel where it builds (counted: tokens equal to
    # peft through it, not through the torch plans only).
    kernel_calls = []
    real_apply = cpu_lora.apply
    monkeypatch.setattr(cpu_lora, "apply", lambda *a: kernel_calls.append(1) or real_apply(*a))
    at_start = {n: f for n, f in folders.items() if tp == 1 or n != "mlp"}
    llm = engine(base, at_start, max_loras=max_loras, enable_prefix_caching=False,
                 tensor_parallel_size=tp)  # fmt: skip
    if tp > 1:
        # A re-load of "all" from other files that rank 1 reads too late (busy): it fails
        # on the driver, and rank 1 must not keep it either (it did: "all" ran with mlp's
        # factors there and with its own on the driver).
        loras = llm.engine.loras
        monkeypatch.setattr(lora_manager, "RANK_CALL_TIMEOUT_S", 0.5)
        loras.ranks.post(_nap, 2.0)
        with pytest.raises(RankFailure, match="did not answer"):
            loras.add("all", str(folders["mlp"]))
        monkeypatch.undo()
        loras.add("mlp", str(folders["mlp"]))
        held = {"all": str(folders["all"]), "attn": str(folders["attn"]),
                "mlp": str(folders["mlp"])}  # fmt: skip
        assert loras.ranks.call(_rank_adapters, timeout=30) == [(held, [])]
    # Unequal shares (4, 2, 1 and 4 prompts): decode steps pad the smaller slots' rows.
    counts = {"all": 4, "attn": 2, "mlp": 1, None: 4}
    batch = [(p, name) for name, n in counts.items() for p in prompts()[:n]]
    batch = batch[::2] + batch[1::2]  # interleave adapters within the batch
    outs = llm.generate([p for p, _ in batch], GREEDY, lora=[n for _, n in batch])
    for out, (prompt, name) in zip(outs, batch, strict=True):
        check([out], [refs[name][prompts().index(prompt)]])
    if tp == 1 and cpu_lora.library() is not None:
        assert kernel_calls
    llm.engine.close()


def test_prefix_cache_is_per_adapter(setup):
    base, folders, refs = setup
    llm = engine(base, folders, block_size=4)
    prompt = prompts()[3]
    first = llm.generate([prompt], GREEDY, lora="all")[0]
    again = llm.generate([prompt], GREEDY, lora="all")[0]
    other = llm.generate([prompt], GREEDY, lora="attn")[0]
    plain = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= len(prompt) - 4
    assert other.num_cached_tokens == 0 and plain.num_cached_tokens == 0
    check([again, other, plain], [refs["all"][3], refs["attn"][3], refs[None][3]])


def test_bad_adapters_are_clear_errors(setup, tmp_path):
    base, folders, _ = setup
    llm = engine(base, {"all": folders["all"]}, max_lora_rank=8)
    with pytest.raises(ValueError, match="not loaded"):
        llm.generate([[5, 6, 7]], GREEDY, lora="nope")
    with pytest.raises(ValueError, match="max_lora_rank"):
        llm.engine.loras.add("mlp", str(folders["mlp"]))  # rank 16
    with pytest.raises(ValueError, match="adapter_config.json"):
        llm.engine.loras.add("empty", str(tmp_path))
    broken = tmp_path / "broken"  # a good config beside weights that are not safetensors
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes(
        (folders["all"] / "adapter_config.json").read_bytes()
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    for bad in (broken, tmp_path / ("x" * 300)):  # SafetensorError, ENAMETOOLONG before
        with pytest.raises(ValueError, match="cannot be read"):
            llm.engine.loras.add("bad", str(bad))
    for bad_name in ("a\nb", "x\x00", "\x1b[31mred"):  # log lines, argv, terminals
        with pytest.raises(ValueError, match="not printable"):
            llm.engine.loras.add(bad_name, str(folders["all"]))
    with pytest.raises(ValueError, match="1 to 256 characters"):
        llm.engine.loras.add("x" * 257, str(folders["all"]))
    plain = LLM(str(base), dtype="float32", kv_cache_bytes=8 << 20)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate([[5, 6, 7]], GREEDY, lora="all")
    # The engine still serves after the errors.
    assert llm.generate([[5, 6, 7]], GREEDY, lora="all")[0].outputs[0].token_ids


def _layer_and_want(shards, d_in, rank, slots, row_slots, seed=0):
    """A LoRALinear over a random base layer with random factors in every slot (slot 1
    leaves shard 1 alone when there is one), the input rows and each row's own sum."""
    import torch

    from services.engine.layers.lora import LoRABatch, LoRALinear

    gen = torch.Generator().manual_seed(seed)
    out = sum(n for _, n in shards.values())
    weight = torch.randn(out, d_in, generator=gen)
    batch = LoRABatch()
    layer = LoRALinear(lambda x: x @ weight.T, shards, d_in, slots, rank, torch.float32,
                       torch.device("cpu"), batch)  # fmt: skip
    factors = []
    for s in range(slots):
        a = [torch.randn(rank, d_in, generator=gen) for _ in shards]
        b = [torch.randn(n, rank, generator=gen) for _, n in shards.values()]
        if s == 1 and len(shards) > 1:
            a[1] = b[1] = None
        layer.set_slot(s, a, b)
        factors.append((a, b))
    x = torch.randn(len(row_slots), d_in, generator=gen)
    want = x @ weight.T
    for i, s in enumerate(row_slots):
        if s is not None:
            a, b = factors[s]
            want[i] += torch.cat([(bi @ (ai @ x[i])) if ai is not None else torch.zeros(n)
                                  for ai, bi, (_, n) in zip(a, b, shards.values(), strict=True)])  # fmt: skip
    rows_of = {s: [i for i, t in enumerate(row_slots) if t == s] for s in range(slots)}
    return layer, batch, x, want, rows_of


def test_every_cpu_plan_adds_each_rows_own_delta():
    """The layer's three torch CPU plans (one matmul pair per run of consecutive rows, the
    padded bmm, gathered groups) add each row's own adapter delta, on a fused layer whose
    middle shard one adapter leaves alone, beside rows with no adapter."""
    import torch

    shards = {0: (0, 6), 1: (6, 4), 2: (10, 4)}
    # Rows: a run of slot 0, base rows, a run of slot 2, one row of slot 1, slot 0 again.
    row_slots = [0] * 5 + [None] * 2 + [2] * 4 + [1] + [0] * 3
    layer, batch, x, want, rows_of = _layer_and_want(shards, 8, 2, 3, row_slots)
    batch.runs = [(0, 5, 0), (7, 11, 2), (11, 12, 1), (12, 15, 0)]
    torch.testing.assert_close(layer(x), want)
    batch.runs = []
    m = max(len(r) for r in rows_of.values())
    src = [r + [len(row_slots)] * (m - len(r)) for r in rows_of.values()]
    dst = [r + [0] * (m - len(r)) for r in rows_of.values()]
    batch.padded = (torch.tensor(src).flatten(), torch.tensor(dst).flatten(), m)
    torch.testing.assert_close(layer(x), want)
    batch.padded = None
    batch.groups = [(s, torch.tensor(r)) for s, r in rows_of.items()]
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shards, d_in",
    [
        ({0: (0, 6), 1: (6, 4), 2: (10, 4)}, 8),  # under one 64-column block, odd widths
        ({0: (0, 130), 1: (130, 64), 2: (194, 70)}, 77),  # full blocks and tails
        ({None: (0, 200)}, 300),
    ],  # fmt: skip
)
def test_cpu_kernel_adds_each_rows_own_delta(shards, d_in, threads):
    """The C kernel (cpu_lora.py) adds each row's own delta: slots with 1 to 6 rows (4 rows
    a step, and the rest), an unused slot, rows with no adapter, a shard that one adapter
    leaves alone, on one and two threads."""
    import torch

    from services.engine.layers import cpu_lora

    lib = cpu_lora.library()
    if lib is None:
        pytest.skip("no C compiler here: the torch plans run LoRA")
    row_slots = [0, 2, None, 0, 2, 1, 0, 2, 0, 0, 2, None, 0, 2]  # slot 3 unused
    layer, batch, x, want, rows_of = _layer_and_want(shards, d_in, 4, 4, row_slots)
    batch.cpu_lib = lib
    batch.cpu = cpu_lora.CPUSegments([rows_of[s] for s in range(4)], layer.a.shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)
