"""Llama family (Llama 2/3, SmolLM2) with Hugging Face parameter names.

q/k/v and gate/up are fused into one matmul each; ``packed_modules_mapping`` tells the weight
loader which checkpoint tensor goes into which slice. Qwen2 and Qwen3 reuse this decoder
with their differences switched on (qkv bias; per-head q/k RMSNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import heartbeat
from services.engine.layers import cpu_fused, fused
from services.engine.layers.attention import AttentionBackend, AttentionMetadata
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import RotaryEmbedding, rope_parameters


def tp_load(dst: torch.Tensor, module: nn.Module, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(destination, checkpoint slice): ``module``'s ``tp_slice = (dim, start)`` (set by
    tp_shard.py) selects this rank's part of ``src``; the last rank's part may be short."""
    spec = getattr(module, "tp_slice", None)
    if spec is None or dst.shape == src.shape:
        return dst, src
    dim, start = spec
    n = min(dst.shape[dim], src.shape[dim] - start)
    return dst.narrow(dim, 0, n), src.narrow(dim, start, n)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PackedLinear(nn.Linear):
    """A Linear whose output rows are the concatenation of several checkpoint tensors."""

    def __init__(self, in_features: int, shards: dict[Any, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets: dict[Any, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shards.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        # Where each part starts in its checkpoint tensor (tensor-parallel slices; tp_shard.py).
        self.sources: dict[Any, int] = dict.fromkeys(shards, 0)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = PackedLinear(
            cfg.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.backend = backend
        # Sum of the ranks' partial outputs under tensor parallelism (tp_shard.py).
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
        # Set by the model runner once the KV cache exists.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        stored = (
            meta.write_kv
            and isinstance(rotary, RotaryEmbedding)
            and rotary.rotate_and_store(
                positions, q, k, v, self.k_cache, self.v_cache, meta.slot_mapping
            )
        )
        if not stored:
            q, k = rotary(positions, q, k)
        o = self.backend.forward(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored=stored
        )
        return self.reduce(self.o_proj(o.reshape(t, self.q_size)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = PackedLinear(cfg.hidden_size, {0: inter, 1: inter}, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused.on_cuda_rows(gate_up):
            return self.reduce(self.down_proj(fused.ops.silu_and_mul(gate_up)))
        cpu = cpu_fused.ops()
        if (cpu is not None and cpu.silu_vectorized and cpu_fused.rows(gate_up)
                and gate_up.shape[1] % 2 == 0):  # fmt: skip
            return self.reduce(self.down_proj(cpu.silu_mul(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.reduce(self.down_proj(F.silu(gate).mul_(up)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: Any, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool, mlp: nn.Module
    ):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, backend, qkv_bias, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, rotary, meta):
        attn = self.self_attn(positions, self.input_layernorm(x), rotary, meta)
        x, h = self.post_attention_layernorm.add_forward(x, attn)
        # NOTE: ``x`` is the new tensor add_forward made (the layer's input is left alone:
        # EAGLE-3 keeps some layers' inputs), so the second residual add may be in place.
        m = self.mlp(h)
        cpu = cpu_fused.ops()
        return cpu.add_(x, m) if cpu is not None and x.device.type == "cpu" else x.add_(m)


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: Any,
        backend: AttentionBackend,
        qkv_bias: bool,
        qk_norm: bool,
        make_mlp: Callable[[Any, int], nn.Module] = lambda cfg, _: LlamaMLP(cfg),
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, backend, qkv_bias, qk_norm, make_mlp(cfg, i))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn: LlamaAttention = self.layers[0].self_attn  # type: ignore[assignment]
        self.rotary = RotaryEmbedding(
            attn.head_dim, cfg.max_position_embeddings, rope_parameters(cfg)
        )
        # The CPU's decode-step path (a llama_decode.DecodePath, which imports this module),
        # set by the model runner once the weights are packed and the KV cache exists.
        self.decode_path: Any = None

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        path = self.decode_path
        fast = path.layers if path is not None and path.usable(positions, x, meta) else None
        if path is not None and fast is not None:
            path.steps += 1
        try:
            for i, layer in enumerate(self.layers):
                d = fast[i] if fast is not None else None
                if d is not None and not d.hooked():
                    x = d.forward(positions, x, self.rotary, meta)
                else:
                    x = layer(positions, x, self.rotary, meta)
                heartbeat.beat()  # a slow step is not a stuck one (heartbeat.py)
                if meta.on_layer_done is not None:
                    meta.on_layer_done(i)
        finally:
            self.rotary.forget()
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        super().__init__()
        qkv_bias = self.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        self.model = LlamaModel(cfg, backend, qkv_bias, self.qk_norm, self.make_mlp)
        self.vocab_size = cfg.vocab_size
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # The ranks' vocabulary slices of the logits, joined (tensor parallelism).
        self.gather_logits: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, cfg: Any, layer: int) -> nn.Module:
        """The feed-forward block of decoder layer ``layer`` (mixture-of-experts models
        override this)."""
        return LlamaMLP(cfg)

    @property
    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]  # type: ignore[misc]

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.gather_logits(self.lm_head(hidden))
        return logits[..., : self.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the parameters."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = name, None
            for src, (dst, shard_id) in self.packed_modules_mapping.items():
                if f".{src}." in name:
                    target, shard = name.replace(f".{src}.", f".{dst}."), shard_id
                    break
            if target not in params and f"model.{target}" in params:
                target = f"model.{target}"  # a bare decoder's checkpoint (Qwen3Model)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            param = params[target]
            dst_data = param.data
            if shard is not None:
                module = modules[target.rsplit(".", 1)[0]]
                assert isinstance(module, PackedLinear)
                offset, size = module.shard_offsets[shard]
                dst_data = dst_data.narrow(0, offset, size)
                if tensor.shape[0] != size:  # this rank's slice (tensor parallelism)
                    tensor = tensor.narrow(0, module.sources[shard], size)
            else:
                dst_data, tensor = tp_load(dst_data, modules[target.rsplit(".", 1)[0]], tensor)
            if dst_data.shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(dst_data.shape)}"
                )
            dst_data.copy_(tensor)
            loaded.add(f"{target}:{shard}")
        expected = {
            f"{mod_name}.{pname}:{shard}"
            for mod_name, m in modules.items()
            if isinstance(m, PackedLinear)
            for pname, _ in m.named_parameters()
            for shard in m.shard_offsets
        }
        missing = expected - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing fused-projection shards: {sorted(missing)[:4]}"
            )
