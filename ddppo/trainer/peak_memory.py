"""Peak memory of this process, for benchmarks and run summaries: resident set size and, when CUDA is in use,
the peak of torch's CUDA allocator. (How the process keeps freed memory: ddppo.trainer.malloc_settings.)"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys

import torch

MIB = 1024.0 * 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started (or since ``reset_peak_rss``), MiB.

    Linux's VmHWM is read first because ``reset_peak_rss`` can reset it; ru_maxrss is the portable fallback
    (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss * 1024 / MIB


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS, so that phases run one after another in one process each
    get their own peak (Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM). Memory an earlier phase
    freed is first handed back to the OS (glibc's malloc_trim), or it would count towards the next phase's peak.
    Also resets torch's CUDA peak. Returns False where the RSS peak cannot be reset: ``peak_rss_mib`` then spans
    the whole process."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay counted
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> dict[str, float]:
    """``peak_rss_mib``, and ``cuda_max_allocated_mib`` when this process has used CUDA."""
    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    return out
