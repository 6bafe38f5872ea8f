"""CPU kernels in C (``csrc/``), built on first use for this machine and called through ctypes.

The kernels: ``csrc/paged_decode.c`` (below) and ``csrc/cpu_lora.c`` (``cpu_lora.py``).

Why: torch has no paged attention on the CPU. The reference decode path gathers every
sequence's K and V blocks into a padded copy and then runs SDPA over it: three passes over
the whole context per layer and step. ``csrc/paged_decode.c`` reads the blocks in place, once
(vLLM's CPU backend ships such kernels prebuilt; this one is small enough to build here).

How: the C file is compiled with the host's C compiler (``$CC``, else ``cc``/``gcc``) and
``-march=native``, so the instruction set is picked on the machine that runs it (AVX-512
where the CPU has it, AVX2 elsewhere), with OpenMP (the process shares torch's libgomp: it is
loaded first). No torch headers: the build takes about a second. The library is cached under
``$EPDSERVE_KERNEL_CACHE`` (default ``~/.cache/epdserve/kernels``), keyed by the source, the
flags and the CPU's feature flags; it is written to a temporary name and renamed, so processes
building at once do not see a half-written file. Without a compiler, on a failed build, or
with ``EPDSERVE_CPU_KERNELS=0``, ``paged_decode()`` is None and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
BUILD_TIMEOUT_S = 120.0
_lock = threading.Lock()
_cache: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("EPDSERVE_CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compile_flags(cpu_flags: str) -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
    # NOTE: GCC 12 does not know this project's Zen 5 CPU and tunes -march=native for 128-bit
    # vectors (-mprefer-vector-width=128), which halved the kernel's speed; ask for the
    # widest vectors the CPU has.
    if "avx512f" in cpu_flags.split():
        flags.append("-mprefer-vector-width=512")
    elif "avx2" in cpu_flags.split():
        flags.append("-mprefer-vector-width=256")
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("EPDSERVE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "epdserve" / "kernels"


def _build(name: str) -> ctypes.CDLL | None:
    source = CSRC / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the CPU kernel %s is not built (torch path)", name)
        return None
    cpu = _cpu_flags()
    flags = _compile_flags(cpu)
    key = hashlib.sha256(
        "\0".join([source.read_text(), compiler, *flags, cpu]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [compiler, *flags, "-o", tmp, str(source)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            if proc.returncode != 0:
                logger.warning("building the CPU kernel %s failed (torch path):\n%s",
                               name, proc.stderr[-2000:])  # fmt: skip
                return None
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("building the CPU kernel %s failed (torch path): %s", name, exc)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        logger.warning("loading the CPU kernel %s failed (torch path): %s", name, exc)
        return None


def library(name: str) -> ctypes.CDLL | None:
    """The built library ``csrc/<name>.c``, or None (disabled, no compiler, build failed).
    Built once per process (and once per machine and source, through the cache)."""
    if not enabled():
        return None
    with _lock:
        if name not in _cache:
            _cache[name] = _build(name)
        return _cache[name]


_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class PagedDecode:
    """``epd_paged_decode_f32``: decode attention over the paged cache, float32, in place."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.epd_paged_decode_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR] * 6 + [_I64] * 6 + [ctypes.c_float, _I64, _I64, ctypes.c_int]
        self.fn = fn

    @staticmethod
    def usable(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor
    ) -> bool:
        return (
            q.device.type == "cpu"
            and q.dtype == torch.float32
            and out.dtype == torch.float32
            and out.is_contiguous()
            and k_cache.dtype == torch.float32
            and v_cache.dtype == torch.float32
            and q.is_contiguous()
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
        )

    def __call__(
        self,
        q: torch.Tensor,  # [B, H, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [B, max_blocks] int64
        context_lens: torch.Tensor,  # [B] int64
        max_len: int,
        scale: float,
        out: torch.Tensor,  # [B, H, D], contiguous
    ) -> None:
        b, h, d = q.shape
        tables = block_tables.to(torch.int64).contiguous()
        lens = context_lens.to(torch.int64).contiguous()
        rc = self.fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            lens.data_ptr(), out.data_ptr(), b, h, k_cache.shape[2], d, k_cache.shape[1],
            tables.shape[1], scale, max_len, k_cache.shape[0], torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"paged decode kernel failed ({rc}): bad shapes or lengths")


_paged: PagedDecode | None = None


def paged_decode() -> PagedDecode | None:
    """The paged decode attention kernel, or None where it is not available."""
    global _paged
    if not enabled():
        return None
    if _paged is None:
        lib = library("paged_decode")
        if lib is None:
            return None
        _paged = PagedDecode(lib)
    return _paged
