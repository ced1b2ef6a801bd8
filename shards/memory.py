"""Keep freed memory for reuse instead of handing it back to the kernel after every large buffer.

glibc serves buffers over 128 KiB (up to 32 MiB as it adapts) with fresh mmaps, and fresh memory costs
a page fault and kernel zeroing per page on first touch. Loaders and shard writers allocate such buffers
for every file, batch and block: a training step's batches (about 84 MiB each) were zeroed by the kernel
every step, and the shard loader ran about 2x faster once memory was reused (BENCHMARKS.md). dask's nanny
makes it worse: it starts workers with MALLOC_TRIM_THRESHOLD_=64 KiB, which also switches glibc's
adaptive threshold off, so every buffer over 128 KiB became a fresh mmap. Memory held this way is
bounded by the largest working set, a few batches or shards.
"""

import contextlib
import ctypes
import gc

MMAP_THRESHOLD = 1 << 28  # buffers up to 256 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse


def keep_freed_memory() -> bool:
    """Apply the thresholds above to this process (and to processes it forks); False where malloc
    is not glibc's, which changes nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def long_lived_frozen():
    """Within the block, every object alive at its start is hidden from the garbage collector's full
    collections (gc.freeze); they are seen again after it.

    After `import torch` a process tracks ~170k objects, and each full collection walks them all: 134 ms
    here, most of a warm epoch of the shard loader, and a first epoch (shard tables, kept maps) sets off
    two. Enter it once setup is done, when what exists (modules, model, manifest) outlives the block; it
    also stops collections in loader workers forked inside it from writing to those objects' pages
    (copy-on-write). Garbage made inside is collected as before; garbage that was already there when
    the block began is collected after it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
