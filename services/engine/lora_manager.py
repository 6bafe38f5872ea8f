"""The engine's LoRA adapters: the registry (name -> adapter read into host memory) and a
fixed number of device slots, filled least-recently-used first.

``prepare`` is called by the model runner for each forward pass with the adapter of every
row group; it puts each named adapter into a slot (copying its factors when it is not in
one yet) and tells the wrapped layers which rows use which slot. A batch may name at most
``max_loras`` adapters; ``split`` cuts a larger one into batches that fit (the executor runs
them one after the other).

NOTE (tensor parallelism): each rank's manager holds the factors of its shard, cut as the base
linears are (tp_shard.py): a column-parallel layer (q/k/v, gate/up) keeps the rows of B that
match its output rows, A whole; a row-parallel one (o, down) keeps the columns of A that match
its input columns, B whole, so its delta is a partial sum the layer's all-reduce completes.
The driver's manager repeats ``add`` and ``remove`` on the other ranks (``ranks``); an ``add``
is read on every rank before any registers it, so a rank that fails leaves none holding it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import Any, TypeVar

import torch

from services.engine.block_hash import adapter_hash_root
from services.engine.config import EngineConfig
from services.engine.distributed import RankFailure
from services.engine.layers import cpu_lora
from services.engine.layers.lora import LoRABatch, LoRALinear, cuda_kernels
from services.engine.lora_adapter import LoRAAdapter, load_adapter
from services.engine.model_files import name_problem

logger = logging.getLogger(__name__)

RANK_CALL_TIMEOUT_S = 120.0  # reading an adapter on every rank

# The engine modules an adapter can target, by the name they have in every decoder layer.
TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

T = TypeVar("T")
# The runs plan (layers/lora.py) when the adapters' rows come in runs of this many
# consecutive rows on average (prefill chunks): measured on SmolLM2's shapes, 8 slots, one
# thread, runs beat the padded bmm from ~32 rows a run (64: 200 vs 290 ms for 30 layers;
# 16: 106 vs 81 ms).
MIN_RUN_ROWS = 32


class LoRAManager:
    """Adapters by name, ``max_loras`` device slots and the wrapped layers of one model."""

    def __init__(self, model: Any, max_loras: int, max_lora_rank: int, dtype, device) -> None:
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.mapping: dict[str, tuple[str, Any]] = dict(model.packed_modules_mapping)
        self.batch = LoRABatch()
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        # Per wrapped layer, this rank's cut of the factors: where each shard's rows of B
        # start, and where A's columns start (None: A whole).
        self.cuts: dict[tuple[int, str], tuple[dict[Any, int], int | None]] = {}
        self._split_rows: set[tuple[int, str]] = set()  # layers whose B rows this rank cuts
        decoder = model.model.layers
        for i, layer in enumerate(decoder):
            for name in TARGET_MODULES:
                parent = layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp
                module = getattr(parent, name)
                offsets = getattr(module, "shard_offsets", {None: (0, module.out_features)})
                wrapped = LoRALinear(
                    module.forward, offsets, module.in_features, max_loras,
                    max_lora_rank, dtype, device, self.batch,
                )  # fmt: skip
                # NOTE: wraps whatever forward the layer has (oneDNN's packed one included).
                module.forward = wrapped  # type: ignore[method-assign]
                self.layers[(i, name)] = wrapped
                dim, start = getattr(module, "tp_slice", (0, 0))
                rows = getattr(module, "sources", dict.fromkeys(offsets, 0))
                self.cuts[(i, name)] = (rows, start if dim == 1 else None)
                if hasattr(module, "sources"):
                    self._split_rows.add((i, name))
        self.num_layers = len(decoder)
        self.batch.kernels = cuda_kernels(torch.device(device))  # None: the torch paths
        # On CPU: the C kernel for decode rows (None: no compiler, or not float32).
        if torch.device(device).type == "cpu" and dtype == torch.float32:
            self.batch.cpu_lib = cpu_lora.library()
        self._max_width = max((w.a.shape[1] for w in self.layers.values()), default=1)
        self.adapters: dict[str, LoRAAdapter] = {}
        # Hash-chain ids: an adapter re-registered with other weights gets a new one, so
        # blocks cached under the old weights are never hit.
        self._hash_ids: dict[str, str] = {}
        self._generation: dict[str, int] = {}
        self._retired: dict[str, LoRAAdapter] = {}  # removed, maybe still running
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        # The names in ``slots``, replaced whole on each change: read by the worker's load
        # reports from another thread, which must not iterate ``slots`` while it changes.
        self.resident: tuple[str, ...] = ()
        self.ranks: Any = None  # on a tensor-parallel driver: the other ranks (tp_ranks.py)

    @classmethod
    def from_config(cls, model: Any, config: EngineConfig, dtype, device) -> LoRAManager | None:
        """The manager of ``model`` with the config's adapters loaded; None if LoRA is off."""
        if not config.lora_enabled:
            return None
        manager = cls(model, config.max_loras, config.max_lora_rank, dtype, device)
        for name, path in config.lora_paths.items():
            manager.add(name, path)
        return manager

    # ---- the registry ------------------------------------------------------------------------

    def add(self, name: str, path: str) -> LoRAAdapter:
        """Read and register the adapter at ``path`` as ``name`` (ValueError if it cannot
        be served). Re-adding a name with the same path is a no-op. With tensor parallelism
        every rank registers it or none does."""
        adapter = self.read(name, path)
        if adapter is None:
            return self.adapters[name]
        if self.ranks is not None:
            self._add_on_ranks(name, path)
        self.register(name, adapter)
        logger.info("LoRA adapter %s loaded from %s (rank %d)", name, path, adapter.rank)
        return adapter

    def read(self, name: str, path: str) -> LoRAAdapter | None:
        """The adapter at ``path``, read but not registered; None if ``name`` already is
        the adapter at ``path``."""
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"bad LoRA adapter name: {problem}")
        old = self.adapters.get(name)
        if old is not None and old.path == str(path):
            return None
        adapter = load_adapter(name, path, self.mapping, self.num_layers, self.max_rank)
        self._check_factors(adapter)
        return adapter

    def _check_factors(self, adapter: LoRAAdapter) -> None:
        """ValueError, naming the adapter, for factors that are not this model's: an A whose
        columns are not the layer's inputs or a B whose rows are not its outputs (a file that
        lies about them was loaded: one column or row broadcast silently into garbage, others
        failed every request using it), or values that are not finite."""
        for key, factors in adapter.modules.items():
            wrapped = self.layers[key]
            rows, col = self.cuts[key]
            width = wrapped.a.shape[2]  # this rank's inputs
            for shard, (_, size) in zip(wrapped.shard_ids, wrapped.shards, strict=True):
                a, b = factors.a.get(shard), factors.b.get(shard)
                if a is None or b is None:
                    continue
                ins, outs = a.shape[1], b.shape[0]
                ok_a = ins == width if col is None else ins % width == 0 and col + width <= ins
                if key in self._split_rows:
                    ok_b = outs % size == 0 and rows[shard] + size <= outs
                else:
                    ok_b = outs == size
                if not (ok_a and ok_b):
                    raise ValueError(
                        f"LoRA adapter {adapter.path!r}: layer {key[0]} {key[1]}"
                        f"{'' if shard is None else f' ({shard})'} has A {tuple(a.shape)} and "
                        f"B {tuple(b.shape)}, which do not fit its {width} inputs and {size} "
                        "outputs"
                    )
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ValueError(f"LoRA adapter {adapter.path!r}: layer {key[0]} {key[1]} "
                                     "has values that are not finite")  # fmt: skip

    def register(self, name: str, adapter: LoRAAdapter) -> None:
        """Make ``adapter`` the one requests naming ``name`` run with (it cannot fail)."""
        self._drop(name)
        self._retired.pop(name, None)
        self.adapters[name] = adapter
        gen = self._generation.get(name, -1) + 1
        self._generation[name] = gen
        self._hash_ids[name] = name if gen == 0 else f"{name}#{gen}"

    def _add_on_ranks(self, name: str, path: str) -> None:
        """Every other rank reads its cut of the adapter; only when all did, they register it
        (posted: it runs before any later batch). A rank that fails or does not answer in
        time leaves every rank's adapters as they were: the reads are discarded (in the
        pipe's order, so also after a read that outlived the timeout)."""
        try:
            self.ranks.call(_read_on_rank, name, path, timeout=RANK_CALL_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(RankFailure):  # a group that is gone holds nothing
                self.ranks.post(_discard_on_rank, name)
            raise
        self.ranks.post(_register_on_rank, name)

    def remove(self, name: str) -> None:
        """Unregister ``name``: new requests can no longer name it; requests already
        running with it finish with it."""
        if name not in self.adapters:
            raise KeyError(name)
        if self.ranks is not None:
            self.ranks.call(_remove_on_rank, name, timeout=RANK_CALL_TIMEOUT_S)
        self._retired[name] = self.adapters.pop(name)

    def _drop(self, name: str) -> None:
        if self.slots.pop(name, None) is not None:
            self.resident = tuple(self.slots)

    def resident_adapters(self) -> list[str]:
        """Registered adapters in a slot now: a request for one runs without a copy."""
        return sorted(n for n in self.resident if n in self.adapters)

    def hash_root(self, root: int, name: str) -> int:
        """The block-hash chain seed of a prompt run with adapter ``name``."""
        return adapter_hash_root(root, self._hash_ids[name])

    # ---- slots -------------------------------------------------------------------------------

    def split(self, items: Seq[T], name_of) -> list[list[T]]:
        """``items`` cut into runs naming at most ``max_loras`` adapters each (order kept
        within each run); one run when they fit."""
        names = {name_of(it) for it in items} - {None}
        if len(names) <= self.max_loras:
            return [list(items)]
        order = sorted(names, key=lambda n: n not in self.slots)  # resident ones first
        chunks = [set(order[i : i + self.max_loras]) for i in range(0, len(order), self.max_loras)]
        runs: list[list[T]] = [[] for _ in chunks]
        for it in items:
            name = name_of(it)
            k = 0 if name is None else next(j for j, c in enumerate(chunks) if name in c)
            runs[k].append(it)
        return runs

    def prepare(self, rows: list[tuple[str | None, int]], device: torch.device) -> bool:
        """Set up the next forward pass: ``rows`` are (adapter or None, number of rows) in
        the order of the batch. Returns whether any row uses an adapter."""
        names = [n for n, _ in rows if n is not None]
        b = self.batch
        b.groups, b.runs, b.padded, b.segments, b.cpu = [], [], None, None, None
        if not names:
            return False
        slots = {name: self._slot_of(name, set(names)) for name in dict.fromkeys(names)}
        if len(slots) == 1 and len(names) == len(rows):
            b.groups = [(slots[names[0]], None)]
            return True
        per_slot: dict[int, list[int]] = {}
        runs: list[tuple[int, int, int]] = []  # (first row, end row, slot)
        total = 0
        for name, n in rows:
            if name is not None:
                slot = slots[name]
                per_slot.setdefault(slot, []).extend(range(total, total + n))
                if runs and runs[-1][1:] == (total, slot):
                    runs[-1] = (runs[-1][0], total + n, slot)
                else:
                    runs.append((total, total + n, slot))
            total += n
        if b.kernels is not None:  # CUDA: the slots' rows for the Triton kernels
            rows_of = [per_slot.get(s, []) for s in range(self.max_loras)]
            b.segments = b.kernels.segments(rows_of, device)
            return True
        if len(runs) * MIN_RUN_ROWS <= sum(hi - lo for lo, hi, _ in runs):
            b.runs = runs  # prefill chunks: each run's delta straight into its rows
            return True
        if b.cpu_lib is not None:  # decode rows: the C kernel, one call a layer
            rows_of = [per_slot.get(s, []) for s in range(self.max_loras)]
            b.cpu = cpu_lora.CPUSegments(rows_of, self._max_width)
            return True
        m = max(len(r) for r in per_slot.values())
        if self.max_loras * m <= 2 * total:  # padding at most the batch again: one bmm
            src = [per_slot.get(s, []) for s in range(self.max_loras)]
            dst = [r + [0] * (m - len(r)) for r in src]
            src = [r + [total] * (m - len(r)) for r in src]  # row ``total``: the zero row
            b.padded = (
                torch.tensor(src, dtype=torch.long, device=device).flatten(),
                torch.tensor(dst, dtype=torch.long, device=device).flatten(),
                m,
            )
            return True
        b.groups = [
            (s, torch.tensor(r, dtype=torch.long, device=device)) for s, r in per_slot.items()
        ]
        return True

    def _slot_of(self, name: str, in_batch: set[str]) -> int:
        if name in self.slots:
            self.slots.move_to_end(name)
            return self.slots[name]
        adapter = self.adapters.get(name) or self._retired.get(name)
        if adapter is None:
            raise ValueError(f"LoRA adapter {name!r} is not loaded")
        used = set(self.slots.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(n for n in self.slots if n not in in_batch)
            slot = self.slots.pop(victim)
        self._fill(slot, adapter)
        self.slots[name] = slot
        self.resident = tuple(self.slots)
        return slot

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for key, wrapped in self.layers.items():
            factors = adapter.modules.get(key)
            rows, col = self.cuts[key]
            width = wrapped.a.shape[2]
            a: list[torch.Tensor | None] = []
            b: list[torch.Tensor | None] = []
            for shard, (_, size) in zip(wrapped.shard_ids, wrapped.shards, strict=True):
                a_s = factors.a.get(shard) if factors else None
                b_s = factors.b.get(shard) if factors else None
                a.append(a_s if a_s is None or col is None else a_s[:, col : col + width])
                b.append(None if b_s is None else b_s[rows[shard] : rows[shard] + size])
            wrapped.set_slot(slot, a, b)


# ---- run on ranks 1..N-1 of a tensor-parallel engine (RankProcesses.call) -------------------
# NOTE: ``ctx`` is the rank's tp_rank_process.RankContext (not imported: tp_rank_process imports
# the runner, which imports this module).


def _read_on_rank(ctx: Any, name: str, path: str) -> None:
    assert ctx.runner.lora is not None
    ctx.state.setdefault("lora_read", {})[name] = ctx.runner.lora.read(name, path)


def _register_on_rank(ctx: Any, name: str) -> None:
    adapter = ctx.state.setdefault("lora_read", {}).pop(name, None)
    if adapter is not None:  # None: the rank had it from the same path already
        ctx.runner.lora.register(name, adapter)


def _discard_on_rank(ctx: Any, name: str) -> None:
    ctx.state.setdefault("lora_read", {}).pop(name, None)


def _remove_on_rank(ctx: Any, name: str) -> None:
    assert ctx.runner.lora is not None
    ctx.runner.lora.remove(name)
