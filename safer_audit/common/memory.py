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


M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 1 << 20  # bytes: blocks at least this large are mapped on their own and unmapped when freed
HEAP_BLOCK = 32 << 20  # glibc's own ceiling for its moving threshold (64-bit): a forward pass's tensors are smaller
HEAP_SLACK = 256 << 20  # freed bytes glibc keeps at its heap's top for the next batch (release_freed_memory trims)


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _glibc()
    return libc is not None and all(bool(libc.mallopt(param, value)) for param, value in settings)


def heap_kept_for_tensors() -> bool:
    """Have glibc carve blocks under HEAP_BLOCK bytes from its heap and keep up to HEAP_SLACK bytes freed at its
    top; process-wide, for the stages that run a model or an SAE (extraction, SAE training and encoding).

    Each batch allocates and frees the same sizes of tensors again. Mapped on their own, or trimmed off the
    heap as soon as freed, their pages are zeroed and faulted in afresh every batch: SmolLM2's extraction of 60
    HH pairs took 6.4-7.0 s under freed_blocks_to_the_system, 4.9-5.6 s under glibc's own moving threshold and
    4.6-4.9 s so (side by side; a twentieth of the first's page faults).
    The heap stays bounded: extraction trims it after every shard (release_freed_memory). False where it does
    not apply (not glibc)."""
    return _mallopt((M_MMAP_THRESHOLD, HEAP_BLOCK), (M_TRIM_THRESHOLD, HEAP_SLACK))


def freed_blocks_to_the_system() -> bool:
    """Have glibc map every block of LARGE_BLOCK bytes or more on its own (and unmap it when freed); process-wide.

    The report reads every pair's codes a range at a time (pair_batches, twice per feature_cards) into tensors of
    tens of MB. Carved from the heap, they fragment it and are not given back: the driver's RSS rose with every
    range read, ~6 KB a pair in the report stage (BENCHMARKS.md). Only for the stages that read codes so
    (scores, report): a model's or an SAE's stage sets heap_kept_for_tensors again, else a thorough profile's
    second model ran under this policy (see there). False where it does not apply (not glibc)."""
    return _mallopt((M_MMAP_THRESHOLD, LARGE_BLOCK))
