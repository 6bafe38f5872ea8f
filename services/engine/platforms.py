"""Device selection: cpu, cuda, and npu (torch_npu is imported only when npu is asked for)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_device(name: str) -> torch.device:
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    elif kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu device with torch)
        except ImportError as e:
            raise ValueError("device 'npu' requested but torch_npu is not installed") from e
    elif kind != "cpu":
        raise ValueError(f"unknown device {name!r}")
    return torch.device(name)


def free_device_memory(device: torch.device) -> int:
    """Bytes free on an accelerator (0 for the CPU, where the caller sets a budget)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "npu":
        free, _ = torch.npu.mem_get_info(device)  # type: ignore[attr-defined]
        return int(free)
    return 0
