"""The benchmarks' timing harness: side-by-side medians, a steady allocator, machine facts.

Every speed ratio gblr reports is measured with :func:`gblr.core.timing.time_side_by_side`
(re-exported here): the functions being compared run in one process, their repetitions
interleaved in a rotating order, and medians are compared, so a slow spell of a shared
machine touches every contender alike.
"""

from __future__ import annotations

import platform
from pathlib import Path

from gblr.core.timing import cuda_graph, time_samples, time_side_by_side

__all__ = ["steady_allocator", "time_side_by_side", "time_samples", "cuda_graph", "cpu_name"]


#: glibc ``mallopt`` parameters: the size above which blocks are mmapped, and the free
#: space at the top of the heap above which memory goes back to the system.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator(limit: int = 1 << 31) -> bool:
    """Keep freed memory for reuse (glibc): returns whether the setting took.

    By default glibc hands every large block (the activations of a whole batch) straight
    back to the system when freed, so the next forward pass page-faults on fresh memory;
    how often depends on glibc's moving threshold and so on the sizes earlier models
    happened to allocate. That made the same model's time swing by 1.5x between runs.
    With blocks up to ``limit`` bytes kept in the heap, every model is timed on warm
    memory. Same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(limit))) and bool(
        mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(limit)))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
