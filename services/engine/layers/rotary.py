"""Rotary position embeddings (NeoX / Hugging Face "rotate half" layout): default and llama3."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from services.engine.layers import cpu_fused, fused


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of a config, whether transformers stores them as ``rope_parameters``
    (v5) or as ``rope_theta`` + ``rope_scaling`` (v4)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    theta = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3, linear)")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position; ``forward`` rotates q and k in place-free form."""

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        # The half tables of the last ``positions`` seen on the CPU (see ``_halves``).
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # NOTE: built on meta (engine/meta_init.py), the tables wait for ``build(device)``:
        # computing them there goes through torch's decompositions, which import torch._dynamo.
        if torch.get_default_device().type != "meta":
            self.build()

    def build(self, device: torch.device | None = None) -> None:
        """(Re)compute the tables, e.g. after the module was created on the meta device."""
        inv_freq = inv_frequencies(self.head_dim, self.params)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        emb = torch.outer(t, inv_freq).repeat(1, 2)
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)
        self._last = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, Hkv, D]; the rotation runs in float32 like transformers.
        if fused.ops is not None and q.is_cuda and q.stride(2) == 1 and k.stride(2) == 1:
            return fused.ops.rotary_(positions, q, k, self.cos, self.sin)  # in place, one kernel
        cpu = cpu_fused.ops()
        if cpu is not None and cpu.rotary_usable(positions, q, k):
            return cpu.rotary_(positions, q, k, self.cos, self.sin)  # in place, one C call
        if q.dtype == torch.float32 and k.dtype == torch.float32 and not q.is_cuda:
            cos, sin = self._halves(positions)
            return _rotate_halves(q, cos, sin), _rotate_halves(k, cos, sin)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate_and_store(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    ) -> bool:  # fmt: skip
        """Rotate q and k in place and write k and v into the KV cache at ``slots``, in one C
        call, where the fused CPU kernels take these tensors; False (nothing done) elsewhere.

        NOTE: on the CPU the cache write was two ``index_copy_`` a layer, each a torch
        dispatch (and on long prefills an OpenMP region); here it rides on the rotary pass."""
        cpu = cpu_fused.ops()
        if (
            cpu is None
            or not cpu.rotary_usable(positions, q, k)
            or not cpu.store_usable(k, v, k_cache, v_cache, slots)
        ):
            return False
        cpu.rotary_store_(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slots)
        return True

    def _halves(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions``, first half of the head only ([T, 1, D/2]).

        NOTE: both halves of a row of the tables are equal (``build`` repeats the frequencies),
        so half a table carries it all. Every layer of a forward pass rotates by the same
        ``positions`` tensor: the lookup runs once per forward pass, not once per layer. The
        model forgets it at the end of the pass (``forget``), so a positions buffer refilled in
        place for the next pass is looked up again.
        """
        last = self._last
        if last is not None and last[0] is positions:
            return last[1], last[2]
        half = self.head_dim // 2
        cos = self.cos[positions, :half].unsqueeze(1)
        sin = self.sin[positions, :half].unsqueeze(1)
        self._last = (positions, cos, sin)
        return cos, sin

    def forget(self) -> None:
        """End of a forward pass: drop the tables looked up for its positions."""
        self._last = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``_rotate`` for float32 with half tables: ``[x1, x2] -> [x1 c - x2 s, x2 c + x1 s]``,
    written straight into the two halves of the output (4 kernels instead of 7; the same
    products and sums, so the same values up to the rounding of a fused multiply-add)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out
