"""Giving freed heap memory back to the system (glibc only; elsewhere nothing happens)."""

from __future__ import annotations

import functools


@functools.cache
def _glibc():
    """The C library when it is glibc, else None: both calls below are glibc's own."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Batches grow in length as extraction goes (they are length-sorted), so glibc cannot
    reuse the smaller freed blocks and keeps them: peak RSS grew with the dataset (2.5 GB
    after extracting HH, 0.5 GB after malloc_trim). Trimming once per shard bounds it.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 1 << 20  # bytes: blocks at least this large are mapped on their own and unmapped when freed


def freed_blocks_to_the_system() -> bool:
    """Have glibc map every block of LARGE_BLOCK bytes or more on its own (and unmap it when freed); process-wide.

    The report reads every pair's codes a range at a time (pair_batches, twice per feature_cards) into tensors of
    tens of MB. By default glibc raises its mmap threshold to the size of each such block freed (up to 32 MB), so
    the next ranges are carved from the heap, which fragments and is not given back: the driver's RSS rose with
    every range read, ~6 KB a pair in the report stage (BENCHMARKS.md). Not from the scan's start: every
    forward pass's and SAE step's tensors are then mapped and faulted in afresh, and extraction and SAE training
    took ~20% longer (700 HH pairs, side by side). False where it does not apply (not glibc)."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
