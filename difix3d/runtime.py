"""Process-wide CPU settings, chosen by entry points only (library code never changes them).

Entry points (the `difix3d` CLI, nerfstudio's training of `difix3d-gs` / `difix3d-nerfacto` through their trainer,
the scripts) call `configure_cpu_runtime` once, before the work starts.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Optional

import torch


def configure_cpu_runtime(threads: Optional[int] = 1) -> None:
    """Set PyTorch's intra-op threads (None or 0: keep PyTorch's default) and keep freed memory in
    the heap.

    One thread is the default because CPU work here (splatting, ray-tracing small images) is many
    small operations, where threads cost more than they give: on 2 busy cores, 200 splatting steps at
    160x120 took 31 s with 1 thread and 120 s with 2.
    """
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory_in_heap()


@functools.cache
def keep_freed_memory_in_heap() -> None:
    """Stop glibc from handing large freed blocks back to the OS (process-wide, once).

    Every per-pair temporary of the CPU rasterizer is megabytes; by default glibc unmaps or trims such
    blocks on free, so each new one page-faults in afresh. On the 2-core VM this was developed on, that
    cost as much as the arithmetic (fwd+bwd CPU time 211 -> 147 ms at 160x120 with 20k Gaussians).
    This is what PyTorch's CPU tuning guides get from preloading jemalloc/tcmalloc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 * 2**20)
    libc.mallopt(m_trim_threshold, 1024 * 2**20)
