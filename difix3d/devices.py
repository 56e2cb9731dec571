"""Device and dtype choices shared by every entry point (CLI, nerfstudio method, benchmarks)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

import torch

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" is CUDA when available, else the CPU; anything else is passed to torch ("cuda:1", ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: DtypeName, device: torch.device | str) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (the SD VAE overflows in float16) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def device_name(device: torch.device | str = "cpu") -> str:
    """What a benchmark report names the machine by: the GPU's name on CUDA, else the CPU's model name
    (Linux's /proc/cpuinfo; `platform.processor()` is often empty there), else the architecture."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"
