"""CPU training: keep freed memory in the process instead of handing it back to the kernel each step.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh ``mmap`` and unmaps it on ``free``, and trims the top of the heap when more than
128 KiB is free there. A CPU training step allocates and frees activations of that size every
step, so the kernel zero-fills the same pages again and again (page faults, kernel time).
Serving every block from the heap and never trimming it (``mallopt(M_MMAP_MAX, 0)``,
``M_TRIM_THRESHOLD`` 1 GiB) removes that; ``benchmarks/cpu_allocator.py`` measures the gain
(MobileNetV2 epochs in 0.64 of the time in BENCHMARKS.md) and the memory kept. The price: the
process keeps its peak heap until it exits, which a training process mostly does anyway.

:func:`manyheads.fit` calls :func:`keep_freed_memory` when it trains on the CPU. Set the
environment variable ``MANYHEADS_MALLOC=system`` to keep glibc's defaults.

    keep_freed_memory()  # True where glibc took the settings
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes free at the heap's top before it is given back (mallopt takes an int)
OPT_OUT = "MANYHEADS_MALLOC"

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc malloc to reuse freed blocks rather than unmap them; True if it took (Linux, glibc).

    Applied once per process; a no-op returning False elsewhere or when ``MANYHEADS_MALLOC=system``.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
