"""CPU kernels in C (``csrc/``), built on first use for this machine and called through ctypes.

The kernels: ``csrc/paged_decode.c`` (below), ``csrc/prefill_attn.c`` (below: causal attention
of fresh prompts), ``csrc/cpu_lora.c`` (``cpu_lora.py``) and ``csrc/fused_elementwise.c``
(``cpu_fused.py``: RMSNorm + residual add, silu * up, rotary).

Why: torch has no paged attention on the CPU. The reference decode path gathers every
sequence's K and V blocks into a padded copy and then runs SDPA over it: three passes over
the whole context per layer and step. ``csrc/paged_decode.c`` reads the blocks in place, once
(vLLM's CPU backend ships such kernels prebuilt; this one is small enough to build here).

How: the C file is compiled with the host's C compiler (``$CC``, else ``cc``/``gcc``) and
``-march=native``, so the instruction set is picked on the machine that runs it (AVX-512
where the CPU has it, AVX2 elsewhere), with OpenMP (the process shares torch's libgomp: it is
loaded first). No torch headers: the build takes about a second. The library is cached under
``$EPDSERVE_KERNEL_CACHE`` (default ``~/.cache/epdserve/kernels``), keyed by the source (with
csrc's headers: ``epd_exp.h``), the flags and the CPU's feature flags; it is written to a
temporary name and renamed, so processes building at once do not see a half-written file, and
a digest beside it must match before a cached file is loaded (a corrupt one is rebuilt). An
unwritable cache builds into a private folder. Without a compiler, on a failed or hung build (``BUILD_TIMEOUT_S``), or with
``EPDSERVE_CPU_KERNELS=0``, ``paged_decode()`` is None and callers keep their torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
BUILD_TIMEOUT_S = 120.0
_lock = threading.Lock()
_cache: dict[str, ctypes.CDLL | None] = {}
_kernels: dict[str, Any] = {}  # kernel(): the wrapper made over each library
K = TypeVar("K")
# The entry points each kernel library must export: a file lacking them is not that kernel.
SYMBOLS = {
    "paged_decode": ("epd_paged_decode_f32", "epd_decode_attn_f32"),
    "prefill_attn": ("epd_prefill_attn_f32",),
    "cpu_lora": ("lora_apply",),
    "omp_bind": ("epd_bind_omp_threads",),
}


def enabled() -> bool:
    return os.environ.get("EPDSERVE_CPU_KERNELS", "1") != "0"


def cpu_flags() -> str:
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
    if root:
        return Path(root)
    try:
        return Path.home() / ".cache" / "epdserve" / "kernels"
    except RuntimeError:  # no HOME and no passwd entry (a bare container user)
        return Path(tempfile.gettempdir()) / "epdserve-kernels"


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)  # $CC may carry flags ("gcc -m64"), as make reads it
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _compile(cmd: list[str], source: Path, out: str, name: str) -> bool:
    """Compile ``source`` into ``out``; False (logged) on a failure or past BUILD_TIMEOUT_S.
    NOTE: the compiler runs in its own process group, killed whole on the timeout: cc runs
    cc1, as and ld under it, and killing cc alone would leave a hung cc1 running for ever."""
    try:
        proc = subprocess.Popen([*cmd, "-o", out, str(source)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    except OSError as exc:
        logger.warning("building the CPU kernel %s failed (torch path): %s", name, exc)
        return False
    try:
        _, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        logger.warning("building the CPU kernel %s took over %.0f s: killed (torch path)",
                       name, BUILD_TIMEOUT_S)  # fmt: skip
        return False
    if proc.returncode != 0:
        logger.warning("building the CPU kernel %s failed (torch path):\n%s", name, err[-2000:])
        return False
    return True


def _load(path: Path | str, name: str) -> ctypes.CDLL | None:
    """The library at ``path`` when it loads and exports ``name``'s entry points, else None."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        logger.warning("loading the CPU kernel %s failed: %s", name, exc)
        return None
    missing = [s for s in SYMBOLS.get(name, ()) if not hasattr(lib, s)]
    if missing:
        logger.warning("the CPU kernel library %s lacks %s", path, ", ".join(missing))
        return None
    return lib


def _digest_file(target: Path) -> Path:
    return target.with_suffix(".sha256")


def _cached(target: Path, name: str) -> ctypes.CDLL | None:
    """The cached library, when its bytes are those its build recorded (a truncated or
    corrupt file is never handed to dlopen, where it could crash the process), else None."""
    try:
        recorded = _digest_file(target).read_text().strip()
        actual = hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError:
        return None  # not built yet (or unreadable): build it
    if actual != recorded:
        logger.warning("the cached CPU kernel %s is corrupt: rebuilding it", target)
        return None
    return _load(target, name)


def _build_into(target: Path, cmd: list[str], source: Path, name: str) -> ctypes.CDLL | None:
    """Build into a temporary file beside ``target``, load that, then rename it (and its
    digest) into place, so that processes building at once never see a half-written file.
    NOTE: the temporary name is loaded, not ``target``: dlopen of a path it already loaded
    (a bad file there before) would return the old library. OSError: ``target``'s folder
    cannot be written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        if not _compile(cmd, source, tmp, name):
            return None
        lib = _load(tmp, name)
        if lib is None:
            return None
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, target)
        fd, tmp_digest = tempfile.mkstemp(prefix=".build-", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        os.replace(tmp_digest, _digest_file(target))
        return lib
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _build(name: str) -> ctypes.CDLL | None:
    source = CSRC / f"{name}.c"
    cmd = _compiler()
    if cmd is None:
        logger.info("no C compiler: the CPU kernel %s is not built (torch path)", name)
        return None
    cpu = cpu_flags()
    flags = _compile_flags(cpu)
    # NOTE: the headers of csrc/ (epd_exp.h) are part of the key: a changed header rebuilds.
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]
    text = "\0".join([source.read_text(), *headers, *cmd, *flags, cpu])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    lib = _cached(target, name)
    if lib is not None:
        return lib
    try:
        return _build_into(target, [*cmd, *flags], source, name)
    except OSError as exc:
        logger.warning("the kernel cache %s cannot be written (%s): building %s in a private "
                       "folder", target.parent, exc, name)  # fmt: skip
    # The process keeps the library mapped after its file is removed.
    with tempfile.TemporaryDirectory(prefix="epdserve-kernel-") as private:
        return _build_into(Path(private) / target.name, [*cmd, *flags], source, name)


def library(name: str) -> ctypes.CDLL | None:
    """The built library ``csrc/<name>.c``, or None (disabled, no compiler, build failed).
    Built once per process (and once per machine and source, through the cache)."""
    if not enabled():
        return None
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = _build(name)
            except Exception:  # NOTE: an optional speed-up never ends the worker
                logger.exception("the CPU kernel %s is unavailable (torch path)", name)
                _cache[name] = None
        return _cache[name]


def kernel(name: str, make: Callable[[ctypes.CDLL], K], switch: str | None = None) -> K | None:
    """``make(library(name))``, made once per process; None where the kernels are off
    (``EPDSERVE_CPU_KERNELS=0``, or the environment variable ``switch`` set to 0; both read
    on every call, so a benchmark can compare in one process) or the library is not there."""
    if not enabled() or (switch is not None and os.environ.get(switch, "1") == "0"):
        return None
    if name not in _kernels:
        lib = library(name)
        _kernels[name] = None if lib is None else make(lib)
    made: K | None = _kernels[name]
    return made


def forget(name: str | None = None) -> None:
    """Drop the library ``name`` (every one without it) and its wrapper from this process, as
    if it had not been loaded (tests: a fresh process over another cache folder)."""
    with _lock:
        for memo in (_cache, _kernels):
            if name is None:
                memo.clear()
            else:
                memo.pop(name, None)


_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class PagedDecode:
    """``epd_paged_decode_f32``: decode attention over the paged cache, float32, in place."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.epd_paged_decode_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR] * 6 + [_I64] * 6 + [ctypes.c_float, _I64, _I64, ctypes.c_int]
        self.fn = fn
        fused = lib.epd_decode_attn_f32
        fused.restype = ctypes.c_int
        fused.argtypes = [_PTR] * 12 + [_I64] * 11 + [ctypes.c_float, _I64, _I64, ctypes.c_int]
        self.fused = fused

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

    def rotary_store_attend(
        self, positions: torch.Tensor, qkv: torch.Tensor, heads: int, cos: torch.Tensor,
        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
        block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int, scale: float,
        out: torch.Tensor,
    ) -> None:  # fmt: skip
        """A decode batch's attention in one call: ``CpuFused.rotary_store_`` (q and k rotated
        in place, k and v written at ``slots``), then this kernel's attention of q into
        ``out`` (contiguous [B, heads, D]); the same bits as the two calls. ``qkv`` is the
        fused projection's output, rows [q | k | v] of (heads + 2 Hkv) x D floats (Hkv and D
        from the cache [num_blocks, block_size, Hkv, D]).
        NOTE: no conversions or shape checks in Python (the decode step's path calls it once a
        layer): the caller passes a float32 ``qkv`` of contiguous rows, int64 contiguous
        ``positions``, ``slots``, ``block_tables`` and ``context_lens``, contiguous tables
        ``cos``/``sin`` [max_positions, >= D/2] and caches (``llama_decode.DecodePath``
        checks them); the C side checks every index and length before it writes anything."""
        kv_heads, d = k_cache.shape[2], k_cache.shape[3]
        if qkv.shape[1] != (heads + 2 * kv_heads) * d:
            raise ValueError(
                f"qkv rows of {qkv.shape[1]} floats are not {heads}+2x{kv_heads} heads"
            )
        base, row = qkv.data_ptr(), qkv.stride(0)
        rc = self.fused(
            positions.data_ptr(), base, base + 4 * heads * d, base + 4 * (heads + kv_heads) * d,
            cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
            qkv.shape[0], heads, kv_heads, d, row, row, row, cos.shape[1], cos.shape[0],
            k_cache.shape[1], block_tables.shape[1], scale, max_len, k_cache.shape[0],
            torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise ValueError(f"a position is outside the rotary tables (0..{cos.shape[0] - 1})")
        if rc == -3:
            raise IndexError("a KV slot is outside the cache")
        if rc != 0:
            raise RuntimeError(f"paged decode kernel failed ({rc}): bad shapes or lengths")


def paged_decode() -> PagedDecode | None:
    """The paged decode attention kernel, or None where it is not available."""
    return kernel("paged_decode", PagedDecode)
