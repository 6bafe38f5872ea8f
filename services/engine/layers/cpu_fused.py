"""Fused elementwise ops of a decoder layer on the CPU (``csrc/fused_elementwise.c``).

RMSNorm with the residual add folded in, silu(gate) * up from the merged gate_up output, the
rotary embedding of q and k in place (with the KV cache write folded in, ``rotary_store_``),
the residual add after the MLP, and the greedy sampler's argmax over the logits: each one C call (one pass over the rows, one OpenMP
region at most, none for a decode batch) where torch runs two to six ops. Float32 CPU tensors
only; callers keep their torch path for anything else, and ``ops()`` is None without a
compiler, on a failed build, or with ``EPDSERVE_CPU_KERNELS=0`` (native.py) or
``EPDSERVE_CPU_FUSED=0`` (this module alone, e.g. to compare).
"""

from __future__ import annotations

import ctypes

import torch

from services.engine.layers import native

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_F32 = ctypes.c_float


def rows(x: torch.Tensor) -> bool:
    """A float32 CPU matrix whose rows are contiguous (a column slice of a wider one too)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.stride(1) == 1
        and x.stride(0) >= x.shape[1]
    )


class CpuFused:
    """The kernels of ``fused_elementwise.c`` (see there for the math)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._norm = lib.epd_rms_norm_f32
        self._norm.restype = ctypes.c_int
        self._norm.argtypes = [_PTR] * 5 + [_I64] * 3 + [_F32, ctypes.c_int]
        self._silu = lib.epd_silu_mul_f32
        self._silu.restype = ctypes.c_int
        self._silu.argtypes = [_PTR, _PTR] + [_I64] * 3 + [ctypes.c_int]
        self._add = lib.epd_add_f32
        self._add.restype = ctypes.c_int
        self._add.argtypes = [_PTR, _PTR, _I64, ctypes.c_int]
        self._rotary = lib.epd_rotary_f32
        self._rotary.restype = ctypes.c_int
        self._rotary.argtypes = [_PTR] * 5 + [_I64] * 8 + [ctypes.c_int]
        self._rotary_store = lib.epd_rotary_store_f32
        self._rotary_store.restype = ctypes.c_int
        self._rotary_store.argtypes = [_PTR] * 9 + [_I64] * 10 + [ctypes.c_int]
        self._argmax = lib.epd_argmax_f32
        self._argmax.restype = ctypes.c_int
        self._argmax.argtypes = [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_int]
        # NOTE: GCC 12 vectorizes the silu loop only with AVX-512 (epd_exp.h); built for AVX2
        # it ran scalar, 274 us against torch's 50 us at 64 x 1536 (one thread): callers keep
        # torch's silu there.
        self.silu_vectorized = "avx512f" in native.cpu_flags().split()

    @staticmethod
    def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            rows(x)
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.is_contiguous()
            and weight.shape == (x.shape[1],)
        )

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        delta: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` with ``s = x + delta`` (a new tensor; ``x`` itself without
        ``delta``). ``x`` and ``delta`` are left unchanged: a layer's input may be held by
        others (EAGLE-3 keeps some layers' inputs). ``out``: where ``norm(s)`` goes (a
        contiguous float32 tensor of ``x``'s shape; a new one when None)."""
        n, hidden = x.shape
        if out is None:
            out = torch.empty((n, hidden), dtype=torch.float32)
        total = x
        if delta is not None:
            delta = delta.contiguous()
            if delta.shape != x.shape or delta.dtype != torch.float32:
                raise ValueError(f"residual {tuple(delta.shape)} does not match {tuple(x.shape)}")
            total = torch.empty((n, hidden), dtype=torch.float32)
        rc = self._norm(
            x.data_ptr(), None if delta is None else delta.data_ptr(),
            None if delta is None else total.data_ptr(), weight.data_ptr(), out.data_ptr(),
            n, hidden, x.stride(0), eps, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"rms_norm kernel failed ({rc})")
        return total, out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``silu(gate) * up`` of ``gate_up = [gate | up]`` (rows of 2 x inter), into ``out``
        (contiguous float32 [rows, inter]; a new tensor when None)."""
        n, width = gate_up.shape
        inter = width // 2
        if out is None:
            out = torch.empty((n, inter), dtype=torch.float32)
        rc = self._silu(gate_up.data_ptr(), out.data_ptr(), n, inter, gate_up.stride(0),
                        torch.get_num_threads())  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"silu_mul kernel failed ({rc})")
        return out

    def add_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x += y`` (both contiguous float32 of one shape; else torch's ``add_``)."""
        if not (x.is_contiguous() and y.is_contiguous() and x.shape == y.shape
                and x.dtype == y.dtype == torch.float32 and y.device.type == "cpu"):  # fmt: skip
            return x.add_(y)
        rc = self._add(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"add kernel failed ({rc})")
        return x

    @staticmethod
    def rotary_usable(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
        """q [T, H, D] and k [T, Hkv, D] float32 on the CPU, heads contiguous within a token
        (views into the fused qkv output qualify), positions int64."""
        return (
            q.device.type == "cpu"
            and q.dtype == torch.float32
            and k.dtype == torch.float32
            and q.dim() == 3
            and k.dim() == 3
            and q.shape[0] == k.shape[0] == positions.numel()
            and q.shape[2] == k.shape[2]
            and q.stride(2) == 1
            and k.stride(2) == 1
            and q.stride(1) == q.shape[2]
            and k.stride(1) == k.shape[2]
            and positions.device.type == "cpu"
        )

    def rotary_(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Rotate q and k in place by the tables ``cos``/``sin`` [max_positions, >= D/2]."""
        pos = positions.to(torch.int64).contiguous()
        t, h, d = q.shape
        if not (cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape):
            raise ValueError("rotary tables must be contiguous and of one shape")
        rc = self._rotary(
            pos.data_ptr(), q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            t, h, k.shape[1], d, q.stride(0), k.stride(0), cos.shape[1], cos.shape[0],
            torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise ValueError(f"a position is outside the rotary tables (0..{cos.shape[0] - 1})")
        if rc != 0:
            raise RuntimeError(f"rotary kernel failed ({rc})")
        return q, k

    @staticmethod
    def store_usable(
        k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> bool:  # fmt: skip
        """v like k (a view into the qkv output qualifies), float32 caches of contiguous rows
        ``[..., Hkv, D]`` on the CPU, one int64 slot a token."""
        return (
            v.dtype == torch.float32
            and v.device.type == "cpu"
            and v.shape == k.shape
            and v.stride(2) == 1
            and v.stride(1) == v.shape[2]
            and k_cache.dtype == v_cache.dtype == torch.float32
            and k_cache.device.type == v_cache.device.type == "cpu"
            and k_cache.shape == v_cache.shape
            and k_cache.dim() >= 3
            and tuple(k_cache.shape[-2:]) == tuple(k.shape[1:])
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and slots.dtype == torch.int64
            and slots.device.type == "cpu"
            and slots.numel() == k.shape[0]
        )

    def rotary_store_(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``rotary_`` and then the rotated k and v written into the caches at ``slots`` (what
        ``attention.store_kv`` does), in one pass (``rotary_usable`` and ``store_usable``)."""
        pos = positions.to(torch.int64).contiguous()
        slots = slots.contiguous()
        t, h, d = q.shape
        if not (cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape):
            raise ValueError("rotary tables must be contiguous and of one shape")
        rows = k_cache.numel() // (k.shape[1] * d)
        rc = self._rotary_store(
            pos.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
            t, h, k.shape[1], d, q.stride(0), k.stride(0), v.stride(0), cos.shape[1],
            cos.shape[0], rows, torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise ValueError(f"a position is outside the rotary tables (0..{cos.shape[0] - 1})")
        if rc == -3:
            raise IndexError(f"a KV slot is outside the cache (0..{rows - 1})")
        if rc != 0:
            raise RuntimeError(f"rotary + KV store kernel failed ({rc})")
        return q, k

    def argmax(self, x: torch.Tensor) -> list[int]:
        """``x.argmax(dim=-1).tolist()`` of a float32 CPU matrix of contiguous rows (``rows``),
        the same indices: the first of equal maxima, the first NaN where a row has one."""
        n, width = x.shape
        if not rows(x) or width < 1:
            return x.argmax(dim=-1).tolist()
        out = torch.empty(n, dtype=torch.int64)
        rc = self._argmax(x.data_ptr(), n, width, x.stride(0), out.data_ptr(),
                          torch.get_num_threads())  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"argmax kernel failed ({rc})")
        return out.tolist()


def ops() -> CpuFused | None:
    """The fused kernels, or None where they are not available or switched off."""
    return native.kernel("fused_elementwise", CpuFused, "EPDSERVE_CPU_FUSED")
