"""Process memory during training: how glibc's allocator keeps or returns freed memory.

A training step allocates and frees the same large buffers every time, which should stay mapped between steps; an
evaluation pass allocates many buffers of varying sizes, whose freed pieces glibc keeps in its heap (fragments it
may never reuse), which should go back to the kernel. Both are glibc behaviours tuned through its public interface
(mallopt, malloc_trim); with another C library these functions do nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h) and the values `dare train` sets: allocations up to 32 MiB (the largest mmap threshold
# glibc accepts on 64-bit) come from the heap, and up to 512 MiB of free heap top stays mapped.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 512 << 20


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_step_memory_mapped() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel after every step.

    A training step allocates and frees the same buffers every time (an embedding table's dense gradient, Adam's
    temporaries: 25 MB each for a 400k-row table). With glibc's default, adaptive thresholds, part of them is unmapped
    when freed and page-faulted (and zeroed by the kernel) again at the next step: on the 10M-row file that was
    15,000-25,000 page faults and a fifth to a quarter of a step's CPU time in the kernel, and how much depended on the heap's
    history, so two processes of the same code differed by up to 8% (docs/scale.md). Fixed thresholds keep the
    step's buffers mapped; the peak is unchanged, since the step needs them again at once. Does nothing on other C
    libraries, or when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set in the environment (the user's choice).
    Returns whether the thresholds were set."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def return_free_memory() -> None:
    """Hand the free pages inside glibc's heap back to the kernel (malloc_trim(0)). An evaluation pass over 1M samples
    left 0.6 GB of such fragments behind (docs/scale.md); the evaluation calls this every few dozen batches."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
