"""Builds the model and its paged KV cache, turns a scheduled batch into tensors, runs it.

The runner reads only ``ScheduledSeq`` items (scheduler_output.py), never the scheduler, and
its cache is the ``KVCache`` (kv_cache.py) the KV tiers and PD transfers read and write.

NOTE (tensor parallelism): a runner per rank, each with its shard of the weights and of the
KV heads (``num_kv_heads`` here becomes the rank's share); the engine's one ``execute`` per
step drives every rank with the same batch, and rank 0's logits are sampled.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from services.engine.config import EngineConfig
from services.engine.cpu_malloc import keep_freed_memory
from services.engine.decode_graphs import DecodeGraphs, capture_blocker
from services.engine.distributed import TPGroup
from services.engine.eplb import ExpertPlacement
from services.engine.kv_layout import KVLayout
from services.engine.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention
from services.engine.layers.cpu_linear import pack_linears
from services.engine.layers.masks import additive_mask
from services.engine.lora_manager import LoRAManager
from services.engine.meta_init import meta_build, to_device
from services.engine.model_loader import iter_safetensors
from services.engine.models.llama import LlamaModel
from services.engine.models.llama_decode import DecodePath
from services.engine.models.registry import resolve_model_class
from services.engine.multimodal import decode_mrope_positions, prepare_batch
from services.engine.platforms import DTYPES, free_device_memory, get_device
from services.engine.scheduler_output import ScheduledSeq
from services.engine.speculative.memory import draft_bytes_per_block
from services.engine.tp_shard import shard_model

logger = logging.getLogger(__name__)

# KV budget on the CPU when the caller gives none.
DEFAULT_CPU_KV_BYTES = 1 << 30
# Environment variable that replaces that default (bytes). NOTE: the test suite sets it small
# for itself and every process it starts (tests/conftest.py): each engine zeroes its whole
# budget at start, and 1 GiB costs ~2 s of CPU and a GiB of memory no test uses.
CPU_KV_BYTES_ENV = "EPDSERVE_CPU_KV_BYTES"


def default_cpu_kv_bytes() -> int:
    """The CPU KV budget of an engine given none: ``EPDSERVE_CPU_KV_BYTES`` or 1 GiB."""
    raw = os.environ.get(CPU_KV_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_CPU_KV_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{CPU_KV_BYTES_ENV} must be a positive number of bytes, got {raw!r}")
    return value


def attention_backend(device: torch.device) -> TorchAttention:
    """Triton paged attention on CUDA (when triton is installed), the reference elsewhere."""
    if device.type == "cuda":
        try:
            from services.engine.layers.triton_attention import TritonAttention
        except ImportError:
            logger.warning("triton is not installed: using the reference attention on CUDA")
        else:
            return TritonAttention()
    return TorchAttention(device)


def dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place of a checkpoint: N(0, 0.02) matrices, zero biases, unit norms."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)


def is_decode(s: ScheduledSeq) -> bool:
    """One new token, after the whole prompt (a generated token, or a recomputed one)."""
    return s.num_new_tokens == 1 and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens


class ModelRunner:
    """The model and its KV cache on one device; a ``KVCache`` (read and write by block)."""

    def __init__(
        self,
        config: EngineConfig,
        hf_config: Any,
        model_path: str,
        max_model_len: int,
        pooling_hook: Callable[[torch.nn.Module], None] | None = None,
        tp: TPGroup | None = None,
        num_blocks: int | None = None,
        model_class: type[torch.nn.Module] | None = None,
        placements: list[ExpertPlacement] | None = None,
    ) -> None:
        """``pooling_hook``: given, this is a pooling model (pooler.py): the hook adapts the
        loaded model (before its weights are packed) and the KV cache is one block.
        ``num_blocks``: the cache's size in blocks instead of the memory budget's (a draft
        model's cache, indexed by the target's block ids); ``model_class``: instead of the
        registry's class for the config (EAGLE heads); ``placements``: each sparse layer's
        experts per rank (expert parallelism; default contiguous), the same on every rank."""
        self.config = config
        self.max_model_len = max_model_len
        self.model_path = model_path  # read again when experts are re-placed (EPLB)
        self.device = get_device(config.device)
        self.dtype = DTYPES[config.torch_dtype_name]
        if self.device.type == "cpu" and config.model_threads:
            torch.set_num_threads(config.model_threads)
        self.block_size = config.block_size
        cls: Any = model_class or resolve_model_class(hf_config)
        torch.manual_seed(config.seed)
        self.backend = attention_backend(self.device)
        self.tp = tp or TPGroup()
        self.ranks: Any = None  # on the driver: the other ranks' processes (tp_ranks.py)
        with meta_build():
            model = cls(hf_config, self.backend)
            if self.tp.size > 1:
                shard_model(model, self.tp, config.enable_expert_parallel, placements)
        model = to_device(model, self.device).to(self.dtype)
        if model.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        # Buffers (rotary cos/sin) were created on meta: rebuild them on the device.
        model.model.rotary.build(self.device)
        with torch.no_grad():
            if config.load_format == "dummy":
                dummy_weights(model, config.seed)
            else:
                model.load_weights(iter_safetensors(model_path))
        self.model = model.eval()
        self.pooling = pooling_hook is not None
        if pooling_hook is not None:
            pooling_hook(model)
        if self.device.type == "cpu":
            pack_linears(model, config.cpu_linear)
        # After packing: LoRA wraps whatever forward each linear ends up with.
        self.lora = LoRAManager.from_config(model, config, self.dtype, self.device)
        attn = model.attention_layers[0]
        self.num_layers = len(model.attention_layers)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        # Every rank holds the same blocks (of its own heads).
        self.num_blocks = num_blocks or self.tp.min_int(self._num_kv_blocks())
        # One tensor for all layers: [k/v, layer, block, slot, kv_head, head_dim]. A block of
        # one layer's K (or V) is one contiguous slab: the unit of KV export and transfer.
        self.kv_cache = torch.zeros(
            2,
            self.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        for i, layer in enumerate(model.attention_layers):
            layer.k_cache = self.kv_cache[0, i]
            layer.v_cache = self.kv_cache[1, i]
        decoder = getattr(model, "model", None)
        if isinstance(decoder, LlamaModel) and self.tp.size == 1 and not self.pooling:
            # After packing, LoRA and the cache: the path holds the modules they set up.
            decoder.decode_path = DecodePath.build(decoder)
        self.graphs: DecodeGraphs | None = None
        # NOTE: no CUDA graphs with tensor parallelism yet (collectives inside the capture).
        cuda = self.device.type == "cuda" and not self.pooling and self.tp.size == 1
        if cuda and not config.enforce_eager and self.backend.paged_decode:
            blocker = capture_blocker(model)
            if blocker is not None:
                logger.warning("no CUDA graphs: %s", blocker)
            else:
                self.graphs = DecodeGraphs(self, config.max_num_seqs)
        if self.device.type == "cpu":
            # Weights packed, cache made: from here on a step's freed activations stay mapped
            # for the next step (cpu_malloc.py; the unpacked weights go back to the kernel).
            keep_freed_memory()

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's KV, all layers: [k/v, layer, slot, kv_head, head_dim]."""
        return (2, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.pooling:
            return 1  # pooling batches keep no KV (pooler.py)
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cpu":
                budget = default_cpu_kv_bytes()
            else:
                budget = int(free_device_memory(self.device) * self.config.gpu_memory_utilization)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        # NOTE: a draft model runs whole on the driver (rank 0), the other ranks hold no KV of
        # it; the group's count is the smallest rank's (every rank the same block ids).
        draft = draft_bytes_per_block(self.config, elem) if self.tp.rank == 0 else 0
        per_block = self.bytes_per_block + draft
        n = budget // per_block
        if n < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes is smaller than one block "
                f"({per_block} bytes, a draft model's included)"
            )
        return int(n)

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None,
    ) -> torch.Tensor:
        """Run one step; returns float32 logits on the model's device, one row per verified
        position (``num_logit_rows``) of each sampling sequence, in the order of ``scheduled``."""
        bs = self.block_size
        # NOTE: a one-token chunk of a prompt is still a prefill: on an image pad it takes the
        # image's embedding, which only the prefill path merges in.
        decodes = [s for s in scheduled if is_decode(s)]
        prefills = [s for s in scheduled if not is_decode(s)]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: dict[int, range] = {}  # seq_id -> flattened indices of its logit rows
        for s in decodes:
            p = s.seq.num_computed_tokens
            sample_rows[s.seq.seq_id] = range(len(ids), len(ids) + 1)
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(s.seq.block_table[p // bs] * bs + p % bs)
        segments: list[PrefillSegment] = []
        for s in prefills:
            start, n = s.seq.num_computed_tokens, s.num_new_tokens
            ctx = start + n
            seg_start = len(ids)
            ids.extend(s.seq.token_ids[start : start + s.num_known_tokens] + s.draft_token_ids)
            pos.extend(range(start, ctx))
            table = s.seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, ctx))
            segments.append(
                PrefillSegment(
                    seg_start,
                    n,
                    ctx,
                    torch.tensor(
                        table[: (ctx + bs - 1) // bs], dtype=torch.long, device=self.device
                    ),
                )
            )
            if s.samples:
                sample_rows[s.seq.seq_id] = range(len(ids) - s.num_logit_rows, len(ids))
        dev = self.device
        tables, lens = self._decode_tables(decodes) if decodes else ([], [])
        hidden = None
        lora = self.lora is not None and self.lora.prepare(
            [(s.seq.lora, 1) for s in decodes] + [(s.seq.lora, s.num_new_tokens) for s in prefills],
            dev,
        )
        # NOTE: the graphs hold the base model only (captured with no adapter rows). A layer
        # hook (the prefill side's KV push, set on every worker that can prefill) is not called
        # for decode-only batches: it sends prompt blocks only, and a decode step computes none.
        # Requiring no hook kept every such worker's decodes off the graphs.
        if self.graphs is not None and decodes and not prefills and not lora:
            positions = (
                decode_mrope_positions(decodes)
                if self.graphs.mrope
                else torch.tensor(pos, dtype=torch.long)
            )
            hidden = self.graphs.run(ids, positions, slots, tables, lens)
        if hidden is None:
            meta = self._metadata(slots, tables, lens, segments)
            if layer_hook is not None:
                meta.on_layer_done = functools.partial(self._layer_done, layer_hook, scheduled)
            hidden = self._forward(ids, pos, meta, decodes, prefills)
        rows = [r for s in scheduled if s.samples for r in sample_rows[s.seq.seq_id]]
        if not rows:
            return torch.empty(0, 0, device=dev)
        if rows != list(range(hidden.shape[0])):
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=dev)]
        return self.model.compute_logits(hidden).float()

    def _metadata(
        self,
        slots: list[int],
        tables: list[list[int]],
        lens: list[int],
        segments: list[PrefillSegment],
    ) -> AttentionMetadata:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(lens),
            prefills=segments,
        )
        if lens:
            paged = self.backend.paged_decode
            index_dtype = torch.int32 if paged else torch.long
            ctx_lens = torch.tensor(lens, dtype=index_dtype, device=dev)
            meta.decode_block_tables = torch.tensor(tables, dtype=index_dtype, device=dev)
            meta.decode_context_lens = ctx_lens
            meta.decode_max_len = max(lens)
            if not paged and getattr(self.backend, "decode_mask_needed", True):
                width = len(tables[0]) * self.block_size
                mask = additive_mask(ctx_lens, width, self.dtype)
                meta.decode_mask = mask[:, None, None, :]
        return meta

    def _forward(
        self,
        ids: list[int],
        pos: list[int],
        meta: AttentionMetadata,
        decodes: list[ScheduledSeq],
        prefills: list[ScheduledSeq],
    ) -> torch.Tensor:
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        if getattr(self.model, "is_multimodal", False):
            positions, embeds = prepare_batch(self.model, decodes, prefills, input_ids)
            return self.model(input_ids, positions, meta, inputs_embeds=embeds)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        return self.model(input_ids, positions, meta)

    def _decode_tables(self, decodes: list[ScheduledSeq]) -> tuple[list[list[int]], list[int]]:
        """Block tables (padded with 0 to the longest) and context lengths of the decodes."""
        bs = self.block_size
        max_blocks = max((s.seq.num_computed_tokens // bs) + 1 for s in decodes)
        tables = [
            s.seq.block_table[:max_blocks]
            + [0] * (max_blocks - len(s.seq.block_table[:max_blocks]))
            for s in decodes
        ]
        return tables, [s.seq.num_computed_tokens + 1 for s in decodes]

    def _layer_done(self, hook, scheduled: list[ScheduledSeq], layer: int) -> None:
        if self.device.type != "cpu":
            # Readers of the cache run on other threads: make this layer's writes visible.
            torch.accelerator.synchronize(self.device)
        hook(layer, scheduled)

    @property
    def layout(self) -> KVLayout:
        """Addresses of the cache's blocks, for transfer engines that write it directly."""
        elem = self.kv_cache.element_size()
        return KVLayout(
            base_addr=int(self.kv_cache.data_ptr()),
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            slab_bytes=self.block_size * self.num_kv_heads * self.head_dim * elem,
            fingerprint=(
                f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-B{self.block_size}-"
                f"{self.dtype}".replace("torch.", "")
            ),
        )

    # ---- KV export / import by block (the basis of PD disaggregation) ----------------------

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks: [2, layers, len(block_ids), block_size, kv_heads, dim]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(2, index).cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        expected = (
            2,
            self.num_layers,
            len(block_ids),
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        self.kv_cache.index_copy_(2, index, data.to(self.device, self.dtype))
