"""Keep freed memory for reuse instead of handing it back to the kernel after every large buffer.

glibc serves buffers over 128 KiB (up to 32 MiB as it adapts) with fresh mmaps, and fresh memory costs
a page fault and kernel zeroing per page on first touch. Loaders and shard writers allocate such buffers
for every file, batch and block: a training step's batches (about 84 MiB each) were zeroed by the kernel
every step, and the shard loader ran 3 to 4x faster once memory was reused (BENCHMARKS.md). Memory held
this way is bounded by the largest working set, a few batches or shards.
"""

import ctypes

MMAP_THRESHOLD = 1 << 28  # buffers up to 256 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse
# For processes not yet started (dask's nanny sets MALLOC_TRIM_THRESHOLD_=64 KiB in its workers, which
# also switches glibc's adaptive threshold off: every buffer over 128 KiB became a fresh mmap).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


def keep_freed_memory() -> bool:
    """Apply the thresholds above to this process (and to processes it forks); False where malloc
    is not glibc's, which changes nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
