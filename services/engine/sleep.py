"""Sleep and wake-up of an idle engine (as vLLM's ``sleep()`` / ``wake_up()``, xLLM's model
sleep): give the weights' and the KV cache's memory back, keep the process and every address.

Asleep, the weights live in a file and their pages are returned to the system
(``madvise(MADV_DONTNEED)``); the KV cache's pages are returned too, its content dropped (the
prefix cache is forgotten first, so nothing can hit the zeroed blocks). Waking reads the
weights back into the same tensors, bit for bit. Every tensor keeps its address: the views
the attention layers hold and the KV cache Mooncake registered at start-up stay valid without
being rebuilt. oneDNN's packed CPU weights (opaque tensors, layers/cpu_linear.py) are written
out as dense weights, dropped, and packed again on waking.

NOTE: CPU engines with one rank only; a draft model's weights stay in memory. Call both on
the step thread (``AsyncLLMEngine.call``), with no request in the engine.
"""

from __future__ import annotations

import ctypes
import io
import logging
import mmap
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from services.engine.layers.cpu_linear import OneDNNLinear

if TYPE_CHECKING:
    from services.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux: anonymous private pages read back as zeros afterwards


@dataclass
class SleepReport:
    """What one sleep or wake-up did."""

    weight_bytes: int  # bytes of weights written out and released (or read back)
    kv_bytes: int  # bytes of KV cache released (0 on wake-up: it comes back on use)
    seconds: float


def _release(ptr: int, nbytes: int) -> None:
    """Give the whole pages of ``[ptr, ptr + nbytes)`` back (pages shared with neighbouring
    allocations at either end are kept)."""
    page = mmap.PAGESIZE
    start = -(-ptr // page) * page
    end = (ptr + nbytes) // page * page
    if end <= start:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")


def _trim() -> None:
    """Hand the allocator's free memory back to the system (glibc keeps freed blocks, the
    dropped packed weights among them, for later allocations)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, for file reads and writes without a copy."""
    array = t.view(torch.uint8).reshape(-1).numpy()
    return memoryview(array)  # type: ignore[arg-type]  # numpy arrays are buffers


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors a module holds: parameters, buffers and tensor attributes, one level into
    plain objects it keeps (a packed linear's ``forward``)."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module | type):
            yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))
    if isinstance(obj, torch.nn.Module):
        yield from obj.parameters(recurse=False)
        yield from obj.buffers(recurse=False)


def weight_storages(model: torch.nn.Module, exclude: set[int]) -> list[torch.UntypedStorage]:
    """The distinct CPU storages ``model`` holds, outside the data pointers ``exclude``."""
    found: dict[int, torch.UntypedStorage] = {}
    for module in model.modules():
        for t in _tensors(module):
            if t.device.type != "cpu" or t.is_meta or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in exclude:
                found.setdefault(storage.data_ptr(), storage)
    return sorted(found.values(), key=lambda s: s.data_ptr())


class EngineSleep:
    """Puts one engine to sleep and wakes it up; holds the file its weights wait in."""

    def __init__(self, spill_dir: str | None = None) -> None:
        self.spill_dir = spill_dir  # None: the system's temporary folder
        self.asleep = False
        # The weights' file: anonymous (unlinked, or O_TMPFILE), so that its space comes back
        # when the process ends however it ends. NOTE: a named file outlived a worker stopped
        # or restarted with another model (os.execv) while asleep: a model's weights, fp32.
        self._file: io.BufferedRandom | None = None  # readinto: what tempfile gives
        self._storages: list[torch.UntypedStorage] = []
        # Packed weights to pack again on waking, with their dense shape and dtype.
        self._linears: list[tuple[OneDNNLinear, tuple[tuple[int, ...], torch.dtype]]] = []

    @staticmethod
    def _packed(model: torch.nn.Module) -> list[OneDNNLinear]:
        return [f for m in model.modules() if isinstance(f := vars(m).get("forward"), OneDNNLinear)]

    @staticmethod
    def supported(engine: LLMEngine) -> None:
        """ValueError when ``engine`` can never sleep."""
        runner = engine.runner
        if runner.device.type != "cpu" or runner.tp.size > 1:
            raise ValueError("sleep is implemented for CPU engines with one rank only")

    @classmethod
    def check(cls, engine: LLMEngine) -> None:
        """ValueError when ``engine`` cannot sleep now."""
        cls.supported(engine)
        if engine.has_unfinished_requests():
            raise ValueError("the engine still has requests; drain it first")

    def sleep(self, engine: LLMEngine) -> SleepReport:
        if self.asleep:
            return SleepReport(0, 0, 0.0)
        self.check(engine)
        started = time.monotonic()
        runner = engine.runner
        kv = runner.kv_cache.untyped_storage()
        storages = weight_storages(runner.model, exclude={kv.data_ptr()})
        packed = self._packed(runner.model)
        f = tempfile.TemporaryFile(prefix="epdserve-sleep-", suffix=".weights",
                                   dir=self.spill_dir)  # fmt: skip
        weight_bytes = sum(s.nbytes() for s in storages)
        shapes: list[tuple[tuple[int, ...], torch.dtype]] = []  # of the packed weights
        try:
            for storage in storages:
                f.write(_buffer(_bytes_of(storage)))
            for linear in packed:
                dense = linear.packed.to_dense().contiguous()
                f.write(_buffer(dense))
                weight_bytes += dense.nbytes
                shapes.append((tuple(dense.shape), dense.dtype))
            f.flush()
        except BaseException:
            f.close()
            raise
        for linear in packed:
            linear.packed = None  # type: ignore[assignment]
        for storage in storages:
            _release(storage.data_ptr(), storage.nbytes())
        # NOTE: the cached prefixes' KV is about to be zeroed: forget them (the kvstore index
        # hears of it through the block manager's events) before releasing the pages.
        engine.block_manager.reset_prefix_cache()
        _release(kv.data_ptr(), kv.nbytes())
        _trim()
        self._file, self._storages, self.asleep = f, storages, True
        self._linears = list(zip(packed, shapes, strict=True))
        report = SleepReport(weight_bytes, kv.nbytes(), time.monotonic() - started)
        log.info("asleep: %d weight bytes in a file in %s, %d KV bytes released (%.2fs)",
                 weight_bytes, self.spill_dir or tempfile.gettempdir(), kv.nbytes(),
                 report.seconds)  # fmt: skip
        return report

    def wake_up(self, engine: LLMEngine) -> SleepReport:
        if not self.asleep:
            return SleepReport(0, 0, 0.0)
        started = time.monotonic()
        assert self._file is not None
        weight_bytes = sum(s.nbytes() for s in self._storages)
        f = self._file  # closed once read back: a failed read may be retried
        f.seek(0)
        for storage in self._storages:
            view = _buffer(_bytes_of(storage))
            if f.readinto(view) != storage.nbytes():
                raise OSError("the sleep file is shorter than the weights it holds")
        for linear, (shape, dtype) in self._linears:
            dense = torch.empty(shape, dtype=dtype)
            if f.readinto(_buffer(dense)) != dense.nbytes:
                raise OSError("the sleep file is shorter than the weights it holds")
            linear.packed = torch.ops.mkldnn._reorder_linear_weight(dense)
            weight_bytes += dense.nbytes
        f.close()
        _trim()  # the dense copies the packing read from
        self._file, self._storages, self._linears, self.asleep = None, [], [], False
        report = SleepReport(weight_bytes, 0, time.monotonic() - started)
        log.info("awake: %d weight bytes read back (%.2fs)", weight_bytes, report.seconds)
        return report
