"""glibc malloc settings for a training process (``keep_freed_memory`` in the config)."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves blocks from 128 KB up (a threshold it raises as it goes) with their own mmap and unmaps
    them when freed, and trims the heap's free top. A PPO update allocates and frees the same megabyte-sized
    activations and gradients every minibatch, and each fresh mapping page-faults in, zero-filled, again: a large
    share of an update at the quickstart's sizes on CPU. With the mmap threshold at its maximum (32 MB) and trimming
    only beyond 1 GiB of free heap, blocks up to 32 MB are reused; larger ones still come from, and go back to, the
    OS. The process keeps its peak heap resident, which a trainer reaches every update anyway. Process-wide;
    returns False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
