"""Host-process settings for CPU runs: glibc malloc that keeps freed memory, pinning to cores.

Measured in ``experiments/bench_train_step.py`` (``docs/benchmarks/train_step.md``, 2026-12-02):
XLA:CPU allocates a step's temporaries afresh on every execution from a worker thread; with glibc's
defaults those buffers are mmapped and unmapped each time, and the kernel page-faults (and zeroes)
them back in: ~147k page faults and ~0.25-0.45 s of system time per cpu-medium DiT step, about half
of its CPU time. :func:`malloc_keep_freed_memory` removes that (same numbers, 37-47 % less CPU per
step). The experiment scripts call it when run from the command line
(``experiments.common.run_cli``; ``RESEARCH_MALLOC=default`` turns it off).
"""
from __future__ import annotations

import os

__all__ = ["malloc_keep_freed_memory", "pin_cpu_cores"]


def malloc_keep_freed_memory() -> bool:
    """glibc malloc: one arena, no mmap, no trimming (``mallopt``; what
    ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``
    does at start-up), so a big buffer freed by one step is reused by the next instead of being
    unmapped and page-faulted (and zeroed by the kernel) in again. XLA:CPU allocates the step's
    temporaries (hundreds of MiB at cpu-medium) afresh each execution on a worker thread, whose glibc
    arena cannot hold them, so by default they are mmapped: ~147k page faults and ~0.25 s of sys time
    per cpu-medium step. Affects every allocation of the process (torch's too). Returns True on success
    (False where there is no glibc). Call it before JAX and torch start their threads."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(libc.mallopt(opt, val) == 1
               for opt, val in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


def pin_cpu_cores(n: int) -> list[int]:
    """Restricts this process to ``n`` of its allowed cores: every existing thread and (inherited)
    every thread created later. The way to give XLA:CPU and torch the same number of cores."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(allowed):
        raise ValueError(f"--cpu-cores must be between 1 and the {len(allowed)} cores this process may use, got {n}")
    cores = set(allowed[:n])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return sorted(cores)
