"""Builds the model and its paged KV cache, turns a scheduled batch into tensors, runs it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from services.engine.config import EngineConfig
from services.engine.kv_layout import KVLayout
from services.engine.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention
from services.engine.model_loader import iter_safetensors
from services.engine.models.registry import resolve_model_class
from services.engine.multimodal import prepare_batch
from services.engine.platforms import DTYPES, free_device_memory, get_device
from services.engine.scheduler import ScheduledSeq

logger = logging.getLogger(__name__)

# KV budget on the CPU when the caller gives none.
DEFAULT_CPU_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: Any, model_path: str) -> None:
        self.config = config
        self.device = get_device(config.device)
        self.dtype = DTYPES[config.torch_dtype_name]
        self.block_size = config.block_size
        cls = resolve_model_class(hf_config)
        torch.manual_seed(config.seed)
        with torch.device("meta"):
            model = cls(hf_config, TorchAttention())
        model = model.to_empty(device=self.device).to(self.dtype)
        if model.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        # Buffers (rotary cos/sin) were created on meta: rebuild them on the device.
        model.model.rotary.build(self.device)
        with torch.no_grad():
            model.load_weights(iter_safetensors(model_path))
        self.model = model.eval()
        attn = model.attention_layers[0]
        self.num_layers = len(model.attention_layers)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.num_blocks = self._num_kv_blocks()
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

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's KV, all layers: [k/v, layer, slot, kv_head, head_dim]."""
        return (2, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_kv_blocks(self) -> int:
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cpu":
                budget = DEFAULT_CPU_KV_BYTES
            else:
                budget = int(free_device_memory(self.device) * self.config.gpu_memory_utilization)
        n = budget // self.bytes_per_block
        if n < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes is smaller than one block "
                f"({self.bytes_per_block} bytes)"
            )
        return int(n)

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None,
    ) -> torch.Tensor:
        """Run one step; returns float32 logits on the CPU, one row per sampling sequence,
        in the order of ``scheduled``."""
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: dict[int, int] = {}  # seq_id -> flattened token index
        for s in decodes:
            p = s.seq.num_computed_tokens
            sample_rows[s.seq.seq_id] = len(ids)
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(s.seq.block_table[p // bs] * bs + p % bs)
        segments: list[PrefillSegment] = []
        for s in prefills:
            start, n = s.seq.num_computed_tokens, s.num_new_tokens
            ctx = start + n
            seg_start = len(ids)
            ids.extend(s.seq.token_ids[start:ctx])
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
                sample_rows[s.seq.seq_id] = len(ids) - 1
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decodes),
            prefills=segments,
        )
        if layer_hook is not None:
            meta.on_layer_done = functools.partial(self._layer_done, layer_hook, scheduled)
        if decodes:
            max_blocks = max((s.seq.num_computed_tokens // bs) + 1 for s in decodes)
            tables = [
                s.seq.block_table[:max_blocks]
                + [0] * (max_blocks - len(s.seq.block_table[:max_blocks]))
                for s in decodes
            ]
            ctx_lens = torch.tensor([s.seq.num_computed_tokens + 1 for s in decodes], device=dev)
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            meta.decode_context_lens = ctx_lens
            meta.decode_mask = (
                torch.arange(max_blocks * bs, device=dev)[None, :] < ctx_lens[:, None]
            )[:, None, None, :]
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        if getattr(self.model, "is_multimodal", False):
            positions, embeds = prepare_batch(self.model, decodes, prefills, input_ids)
            hidden = self.model(input_ids, positions, meta, inputs_embeds=embeds)
        else:
            positions = torch.tensor(pos, dtype=torch.long, device=dev)
            hidden = self.model(input_ids, positions, meta)
        rows = [sample_rows[s.seq.seq_id] for s in scheduled if s.samples]
        if not rows:
            return torch.empty(0, 0)
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[index]).float().cpu()

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
