"""What the benchmark scripts share: the page cache (warmed, dropped), the memory-copy ceiling, rates.

Run every script from the repository's root as a module: `python -m bench.train`."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join("bench", "_work")  # trees and shard sets made once, reused by later runs


def warm(root):
    """Read every file under `root`, so each timed step starts from the same warm page cache."""
    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: open(p, "rb").read() and None, paths))


def drop_caches() -> bool:
    """Empty the page cache (needs root); False where that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(folder: str) -> None:
    """Drop the files under `folder` from the page cache (POSIX_FADV_DONTNEED; no root needed): a cold
    read of those files while the programs' own code and libraries stay cached, as they are when a
    run's first epoch starts. (Dropping every cache also drops torch's code pages, which a timed
    epoch then faults back in from the disk 4 KiB at a time: measured as most of a cold epoch here.)"""
    os.sync()
    for parent, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_ceiling(bytes_per_sequence: int) -> float:
    """Sequences/s if a loader did nothing but copy each sequence's bytes once (memory bandwidth)."""
    src = np.ones(64 << 20, dtype=np.float32)  # 256 MiB: past the CPU caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(8):
        np.copyto(dst, src)
    return 8 * src.nbytes / (time.perf_counter() - t) / bytes_per_sequence


def rate(n_items, seconds):
    return n_items / seconds
