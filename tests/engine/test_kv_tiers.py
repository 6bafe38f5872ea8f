"""KV tiers below the device cache: host pool and Mooncake Store, on tiny models and a real
``mooncake_master``. Every reuse must give the tokens a recompute gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import takewhile

import pytest
import torch

from services.engine import LLM, SamplingParams, kv_tiers
from services.engine.block_hash import hash_prompt_blocks
from services.engine.block_manager import CachedBlock
from services.engine.kv_host_pool import HostBlockPool
from services.engine.kv_store_format import BlockCodec
from services.engine.kv_tiers import KVTierManager
from services.engine.sequence import Sequence
from services.engine.tp_host_pool import whole_fingerprint
from services.worker.kv_events import kv_layout_key
from tests.conftest import DictStore
from tests.engine.test_correctness import GPU_MARKS

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def run(llm: LLM, ids: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of one prompt and the prompt tokens the model computed for it."""
    before = llm.engine.num_prompt_tokens_computed
    out = llm.generate(ids, GREEDY)[0]
    return out.outputs[0].token_ids, llm.engine.num_prompt_tokens_computed - before


def small_engine(model_dir: Callable[[str], object], device_blocks: int, tp: int = 1, **kw) -> LLM:
    probe_bytes = 2 * 2 * BS * 2 * 16 * 4  # tiny llama: 2 layers, 2 kv heads, dim 16, fp32
    return LLM(
        str(model_dir("llama")), block_size=BS, max_num_batched_tokens=256,
        kv_cache_bytes=device_blocks * probe_bytes // tp, tensor_parallel_size=tp, **kw,
    )  # fmt: skip


def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def store_hits_after(llm: LLM, ids: list[int], expect: list[int], timeout: float = 30.0) -> int:
    """Run ``ids`` until its blocks come from the store (a store write lands a moment after
    it is queued); returns the prompt tokens computed by that run."""
    deadline = time.monotonic() + timeout
    while True:
        before = llm.engine.stats().kv_store_hit_blocks
        tokens, computed = run(llm, ids)
        assert tokens == expect
        if llm.engine.stats().kv_store_hit_blocks > before:
            return computed
        assert time.monotonic() < deadline, "blocks never came back from the store"
        llm.engine.block_manager.reset_prefix_cache()
        time.sleep(0.1)


# ---- unit: host pool and codec ----------------------------------------------------------


def test_host_pool_keeps_lru_and_spills_the_oldest():
    pool = HostBlockPool(2, (2, 3), torch.float32, pin=False)
    data = torch.arange(18, dtype=torch.float32).view(3, 2, 3)
    added, spilled = pool.put([1, 2], [(1,), (2,)], data[:2])
    assert added == [1, 2] and spilled == []
    assert pool.lookup(1, (1,)) is not None  # 1 is now the most recent
    assert pool.lookup(2, (9,)) is None  # tokens confirm a hash hit
    added, spilled = pool.put([3], [(3,)], data[2:])
    assert added == [3]
    assert [(h, t) for h, t, _ in spilled] == [(2, (2,))]
    assert torch.equal(spilled[0][2], data[1])
    assert torch.equal(pool.data[pool.lookup(3, (3,))], data[2])
    # More new blocks than slots: the oldest new ones go straight down.
    added, spilled = pool.put([4, 5, 6], [(4,), (5,), (6,)], torch.zeros(3, 2, 3))
    assert added == [5, 6] and [h for h, _, _ in spilled] == [1, 3, 4]


def test_block_codec_round_trip_and_size_check():
    codec = BlockCodec((2, 2, 4, 2, 8), torch.bfloat16, 4)
    kv = torch.randn(2, 2, 4, 2, 8).to(torch.bfloat16)
    tokens, back = codec.decode(codec.encode(kv, (5, 6, 7, 8)))
    assert tokens == (5, 6, 7, 8) and torch.equal(back, kv)
    assert codec.decode(b"short") is None


class GatedStore(DictStore):
    """Reads that hit wait until ``gate`` is set: a slow store."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def get_blocks(self, hashes: list[int]) -> list[bytes]:
        if hashes and hashes[0] in self.data:
            assert self.gate.wait(60)
        return super().get_blocks(hashes)


def only_in_a_gated_store(model_dir: Callable[[str], object], ids: list[int]):
    """An engine whose store holds ``ids``'s blocks (its device not), the store's reads
    held back; and the greedy tokens of ``ids``."""
    llm = small_engine(model_dir, device_blocks=64)
    store = GatedStore()
    llm.engine.attach_kv_store(store)
    ref, _ = run(llm, ids)  # written through to the store
    llm.engine.tiers.flush()
    llm.engine.block_manager.reset_prefix_cache()
    store.gate.clear()
    return llm.engine, store, ref


def test_a_prompt_waiting_for_the_store_does_not_hold_up_others(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(kv_tiers, "MAX_FETCH_WAIT_S", 600.0)
    x = prompt(10, 100)
    eng, store, ref_x = only_in_a_gated_store(tiny_model_dir, x)
    eng.add_request("x", x, GREEDY)
    eng.add_request("y", prompt(11, 40), GREEDY)
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()

    def step_until_finished(rid: str) -> None:
        while rid not in finished:
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
                if out.finished:
                    finished.add(out.request_id)

    step_until_finished("y")
    assert "x" not in tokens  # still waiting for its blocks; y ran meanwhile
    assert [s.request_id for s in eng.scheduler.waiting] == ["x"]
    store.gate.set()
    step_until_finished("x")
    assert tokens["x"] == ref_x
    assert eng.stats().kv_store_hit_blocks == 6
    eng.close()


def test_a_store_read_that_takes_too_long_is_given_up(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(kv_tiers, "MAX_FETCH_WAIT_S", 0.2)
    x = prompt(12, 100)
    eng, store, ref_x = only_in_a_gated_store(tiny_model_dir, x)
    before = eng.num_prompt_tokens_computed
    eng.add_request("x", x, GREEDY)
    tokens: list[int] = []
    while eng.has_unfinished_requests():
        tokens += [t for out in eng.step() for t in out.outputs[0].token_ids]
    assert tokens == ref_x
    assert eng.num_prompt_tokens_computed - before == 100  # computed, not waited for
    assert eng.stats().kv_store_hit_blocks == 0
    store.gate.set()
    eng.close()


def test_a_full_host_pool_spills_its_oldest_blocks_to_the_store():
    store = DictStore()
    tiers = KVTierManager(2, (3,), torch.float32, host_blocks=1, pin_memory=False, store=store)
    blocks = [CachedBlock(0, 21, (1, 2)), CachedBlock(1, 22, (3, 4))]
    tiers.save(blocks, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    tiers.flush()
    assert list(store.data) == [21] and 22 in tiers.host
    tokens, kv = tiers.codec.decode(store.data[21])
    assert tokens == (1, 2) and kv.tolist() == [1.0, 2.0, 3.0]
    kinds = [(e.kind, e.tier, e.block_hashes) for e in tiers.take_events()]
    assert kinds == [("stored", "host", [22]), ("stored", "store", [21])]
    tiers.save([CachedBlock(2, 23, (5, 6))], torch.zeros(1, 3))  # pushes 22 out
    tiers.flush()
    kinds = [(e.kind, e.tier, e.block_hashes) for e in tiers.take_events()]
    assert kinds == [("stored", "host", [23]), ("removed", "host", [22]), ("stored", "store", [22])]
    tiers.close()


def test_evicted_blocks_are_counted_once_in_the_host_pool():
    tiers = KVTierManager(4, (2,), torch.float32, host_blocks=4, pin_memory=False)
    ev = [CachedBlock(0, 11, (1, 2, 3, 4))]
    tiers.save(tiers.filter_new(ev), torch.ones(1, 2))
    assert tiers.filter_new(ev) == []
    assert [(e.kind, e.tier, e.block_hashes) for e in tiers.take_events()] == [
        ("stored", "host", [11])
    ]


# ---- engine: device -> host -> store, and back --------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_device_evictions_come_back_from_the_host_pool(tiny_model_dir, tp):
    """With two tensor-parallel ranks each keeps its own heads' blocks in its own pool, and
    the driver's decisions (which blocks, which slots) are followed by both."""
    llm = small_engine(tiny_model_dir, device_blocks=8, tp=tp, kv_host_pool_bytes=1 << 20)
    assert llm.engine.runner.num_blocks == 8
    a, b = prompt(1, 100), prompt(2, 100)
    ref_a, computed = run(llm, a)
    assert computed == 100
    ref_b, _ = run(llm, b)  # needs the device blocks a left cached: they go to the host
    assert llm.engine.stats().kv_host_blocks_used > 0
    again, computed = run(llm, a)
    st = llm.engine.stats()
    assert again == ref_a
    assert st.kv_host_hit_blocks >= 4
    assert computed <= 100 - 4 * BS
    assert run(llm, b)[0] == ref_b
    llm.engine.block_manager.check_invariants()
    events = llm.engine.take_kv_events()
    assert {e.tier for e in events} >= {"device", "host"}
    llm.engine.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_host_pool_spills_to_the_store_and_blocks_come_back(tiny_model_dir, master, tp):
    """The store is attached after a's prefix was computed (nothing written through): a's
    blocks reach it only by being pushed out of the host pool, whole under tensor
    parallelism (each rank's heads), and come back from it."""
    llm = small_engine(tiny_model_dir, device_blocks=8, tp=tp, kv_host_pool_bytes=2 * 8192 // tp)
    eng = llm.engine
    a, b = prompt(3, 100), prompt(4, 100)
    ref_a, _ = run(llm, a)
    store = master.store(eng.model_name, whole_fingerprint(eng.runner))
    eng.attach_kv_store(store)
    run(llm, b)  # a's blocks: device -> host (2 slots) -> store
    eng.tiers.flush()
    in_store = [bool(store.get_blocks([h])) for h in hash_prompt_blocks(a, BS)]
    assert sum(in_store) >= 3
    before = eng.stats().kv_store_hit_blocks
    again, computed = run(llm, a)
    assert again == ref_a
    assert eng.stats().kv_store_hit_blocks - before >= 3 and computed <= 100 - 3 * BS
    assert any(e.tier == "store" for e in eng.take_kv_events())
    llm.engine.close()


@pytest.mark.parametrize("tp_a, tp_b", [(1, 1), (2, 1), (1, 2)])
def test_second_engine_reuses_the_first_ones_prefix_from_the_store(
    tiny_model_dir, master, tp_a, tp_b
):
    """With tensor parallelism the store holds whole blocks (every rank's heads, gathered on
    write, cut per rank on read) under the one-device key: engines of either size share them,
    and their workers index their blocks under that key too (one set per worker)."""
    # A keeps the prefix on its device: its blocks reach the store by write-through.
    a_llm = small_engine(tiny_model_dir, device_blocks=64, tp=tp_a)
    eng_a = a_llm.engine
    layout = whole_fingerprint(eng_a.runner)
    assert "-H2-" in layout  # the tiny model's 2 KV heads, whatever the size
    eng_a.attach_kv_store(master.store(eng_a.model_name, layout))
    shared = prompt(5, 160)
    ref, computed_a = run(a_llm, shared)
    assert computed_a == 160
    eng_a.tiers.flush()
    b_llm = small_engine(tiny_model_dir, device_blocks=64, tp=tp_b)
    eng_b = b_llm.engine
    assert whole_fingerprint(eng_b.runner) == layout
    assert kv_layout_key(eng_a) == kv_layout_key(eng_b) == layout  # was the rank's at TP 2
    eng_b.attach_kv_store(master.store(eng_b.model_name, layout))
    computed_b = store_hits_after(b_llm, shared, ref)
    assert computed_b <= 160 - 6 * BS  # far fewer prompt tokens than A computed
    assert eng_b.stats().kv_store_hit_blocks >= 6
    a_llm.engine.close()
    b_llm.engine.close()


def test_dead_master_means_recompute_and_a_restart_resumes_caching(tiny_model_dir, master):
    llm = small_engine(tiny_model_dir, device_blocks=10)
    eng = llm.engine
    store = master.store(eng.model_name, eng.runner.layout.fingerprint)
    eng.attach_kv_store(store)
    a, b, c = prompt(7, 100), prompt(8, 100), prompt(9, 100)
    ref_a, _ = run(llm, a)
    ref_b, _ = run(llm, b)
    eng.tiers.flush()
    master.kill()
    # No errors: reads miss, writes fail, everything is recomputed.
    again, computed = run(llm, a)
    assert again == ref_a and computed > 100 - 6 * BS
    assert run(llm, b)[0] == ref_b
    eng.tiers.flush()
    assert eng.stats().kv_store_hit_blocks == 0
    master.start()  # an empty store on the same ports
    ref_c, _ = run(llm, c)

    def c_cached() -> bool:
        run(llm, a)  # together they evict c from the device, writing it to the store
        run(llm, b)
        eng.tiers.flush()
        return bool(store.get_blocks([hash_prompt_blocks(c, BS)[0]]))

    wait_until(c_cached)
    assert store_hits_after(llm, c, ref_c) < 100
    llm.engine.close()


def test_a_host_pool_smaller_than_a_block_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="smaller than one KV block"):
        small_engine(tiny_model_dir, device_blocks=8, kv_host_pool_bytes=100)


# ---- engine: a PD reservation reuses the host pool -----------------------------------------


def decode_engine_with_prefix_in_host_pool(
    model_dir: Callable[[str], object], ids: list[int], **kw
):
    """A decode engine whose device cache evicted (most of) ``ids``'s prompt blocks to its
    host pool; returns it and how many of the 6 reusable blocks are on the device."""
    llm = small_engine(model_dir, device_blocks=8, kv_host_pool_bytes=1 << 20, **kw)
    eng = llm.engine
    run(llm, ids)
    run(llm, prompt(21, 100))  # needs the blocks ids left cached: they go to the host pool
    hashes = hash_prompt_blocks(ids, BS)[:6]  # (100 - 1) // BS blocks can be hits
    on_device = sum(1 for _ in takewhile(eng.block_manager.is_cached, hashes))
    assert 0 < on_device < 6  # the hit starts on the device and goes on in the host pool
    assert all(h in eng.tiers.host for h in hashes[on_device:])
    eng.take_kv_events()
    return eng, on_device


def prefill_and_export(model_dir: Callable[[str], object], rid: str, ids: list[int], **kw):
    """Prefill ``ids`` on a separate engine: its first token and the prompt's KV."""
    a = small_engine(model_dir, device_blocks=64, **kw).engine
    a.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
    first = None
    while a.has_unfinished_requests():
        for out in a.step():
            first = out.outputs[0].token_ids[0]
    blocks, computed = a.held_blocks(rid)
    assert computed == len(ids)
    data = a.read_kv(blocks)
    a.release_held(rid)
    return first, data


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=GPU_MARKS)],
)
def test_reserve_loads_host_pool_blocks_and_imports_only_the_rest(tiny_model_dir, device):
    kw = {"device": device, "dtype": "float32"}
    ids = prompt(20, 100)
    ref, _ = run(small_engine(tiny_model_dir, device_blocks=64, **kw), ids)
    eng, on_device = decode_engine_with_prefix_in_host_pool(tiny_model_dir, ids, **kw)
    hashes = hash_prompt_blocks(ids, BS)[:6]
    host_hits = eng.stats().kv_host_hit_blocks
    first, data = prefill_and_export(tiny_model_dir, "r", ids, **kw)

    dst, cached = eng.reserve("r", ids, GREEDY)
    assert cached == 6 * BS  # device hits and host-pool hits: neither is transferred
    assert eng.stats().kv_host_hit_blocks - host_hits == 6 - on_device
    assert eng.reserved["r"].num_cached_tokens == cached
    stored = [h for e in eng.take_kv_events() if e.kind == "stored" and e.tier == "device"
              for h in e.block_hashes]  # fmt: skip
    assert stored == hashes[on_device:]  # the loaded blocks are in the device cache again
    assert all(eng.block_manager.is_cached(h) for h in hashes)
    # The loaded KV is the prefill engine's (the same model computed it).
    assert torch.allclose(eng.read_kv(dst[:6]).cpu(), data[:, :, :6].cpu(), atol=1e-5)
    eng.block_manager.check_invariants()

    skip = cached // BS
    eng.write_kv(dst[skip:], data[:, :, skip : len(dst)])
    tokens = list(eng.start_reserved("r", first).outputs[0].token_ids)
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens.extend(out.outputs[0].token_ids)
    assert tokens == ref
    eng.block_manager.check_invariants()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.close()


def test_a_reservation_released_without_decoding_frees_its_loaded_blocks(tiny_model_dir):
    ids = prompt(22, 100)
    eng, on_device = decode_engine_with_prefix_in_host_pool(tiny_model_dir, ids)
    _, cached = eng.reserve("r", ids, GREEDY)
    assert cached == 6 * BS
    eng.free_reserved("r")
    bm = eng.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert not eng.reserved
    # The loaded blocks stay cached: a second reservation finds them all on the device.
    host_hits = eng.stats().kv_host_hit_blocks
    _, cached = eng.reserve("r2", ids, GREEDY)
    assert cached == 6 * BS and eng.stats().kv_host_hit_blocks == host_hits
    eng.free_reserved("r2")
    assert bm.num_free_blocks == bm.num_blocks
    eng.close()


def test_a_reservation_that_does_not_fit_takes_nothing_from_the_host_pool(tiny_model_dir):
    ids = prompt(23, 100)
    eng, _ = decode_engine_with_prefix_in_host_pool(tiny_model_dir, ids)
    hog = Sequence("hog", prompt(24, 5 * BS), GREEDY)
    assert eng.block_manager.allocate_slots(hog, 5 * BS)  # leaves 3 of 8 device blocks
    host_hits = eng.stats().kv_host_hit_blocks
    with pytest.raises(MemoryError):
        eng.reserve("r", ids, GREEDY)
    assert not eng.reserved and eng.stats().kv_host_hit_blocks == host_hits
    eng.block_manager.free(hog)
    eng.block_manager.check_invariants()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.close()
