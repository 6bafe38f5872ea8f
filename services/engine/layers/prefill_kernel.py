"""The C prefill attention kernel (csrc/prefill_attn.c): causal attention of fresh prompts,
float32, GQA, over views into the fused qkv output. Built and loaded by native.py."""

from __future__ import annotations

import ctypes

import torch

from services.engine.layers.native import kernel

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class PrefillAttention:
    """``epd_prefill_attn_f32``: causal attention of fresh prompts (no cached prefix), each
    over its own keys, float32, GQA; q, k and v may be views into the fused qkv output."""

    HEAD_DIMS = (64, 128)

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.epd_prefill_attn_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR] * 6 + [_I64] * 8 + [ctypes.c_float, ctypes.c_int]
        self.fn = fn

    @classmethod
    def usable(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
        """q, out [T, H, D] and k, v [T, Hkv, D] float32 CPU tensors whose heads are
        contiguous rows within a token (out wholly contiguous), D 64 or 128."""
        d = q.shape[-1] if q.dim() == 3 else 0
        return (
            d in cls.HEAD_DIMS
            and all(
                x.dim() == 3
                and x.dtype == torch.float32
                and x.device.type == "cpu"
                and x.shape[0] == q.shape[0]
                and x.shape[2] == d
                and x.stride(2) == 1
                and x.stride(1) == d
                and x.stride(0) >= x.shape[1] * d
                for x in (q, k, v, out)
            )
            and out.is_contiguous()
            and out.shape == q.shape
            and k.shape == v.shape
            and k.shape[1] > 0
            and q.shape[1] % k.shape[1] == 0
            and q.shape[1] // k.shape[1] <= 64
        )

    def __call__(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        segments: list[tuple[int, int]],  # (first row, rows) of each prompt
        scale: float,
        out: torch.Tensor,  # [T, H, D], contiguous
    ) -> None:
        t = q.shape[0]
        if any(s < 0 or n < 1 or s + n > t for s, n in segments):
            raise ValueError(f"prefill segments {segments} do not fit {t} rows")
        starts = torch.tensor([s for s, _ in segments], dtype=torch.int64)
        lens = torch.tensor([n for _, n in segments], dtype=torch.int64)
        rc = self.fn(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(),
            lens.data_ptr(), len(segments), q.shape[1], k.shape[1], q.shape[2], q.stride(0),
            k.stride(0), v.stride(0), out.stride(0), scale, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"prefill attention kernel failed ({rc})")


def prefill_attention() -> PrefillAttention | None:
    """The causal prefill attention kernel, or None where it is not available (or
    ``EPDSERVE_CPU_PREFILL_ATTN=0``: SDPA, e.g. to compare)."""
    return kernel("prefill_attn", PrefillAttention, "EPDSERVE_CPU_PREFILL_ATTN")
