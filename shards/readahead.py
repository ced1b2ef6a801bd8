"""Reading ahead of a stream's pieces [(ShardRef, skip, take)], in background threads, so that the disk
and the network work while the current piece is decoded and joined into steps:
  - a remote shard with a cache (shards.cache) is downloaded while the piece before it is read;
  - a local shard's bytes are asked of the disk as large sequential requests (POSIX_FADV_WILLNEED,
    16 MiB at a time) as its piece starts, and the next piece's shard too: a cold mapped read
    otherwise faults the file in as the decoding reaches it, waiting on each fault. On a warm page
    cache the advice finds every page present (a walk of the page cache, no copy); a shard this
    process has mapped already (a later epoch) is not advised at all.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from .mapcache import SHARD_CACHE
from .tario import local_path

ADVISE_BYTES = 16 << 20
_POOLS = {}  # pid -> executor (a forked loader worker starts its own)


def _pool() -> ThreadPoolExecutor:
    pid = os.getpid()
    return _POOLS.get(pid) or _POOLS.setdefault(pid, ThreadPoolExecutor(2, "shard-read-ahead"))


class ReadAhead:
    """`ahead = ReadAhead(pieces)`; before reading piece i: `ahead.begin(i)` (waits for its download,
    if it has one, and starts the next piece's)."""

    def __init__(self, pieces: list):
        self.pieces, self.pending = pieces, {}

    def begin(self, i: int) -> None:
        for j in (i, i + 1):
            if j < len(self.pieces) and j not in self.pending:
                self.pending[j] = _pool().submit(prepare, *self.pieces[j])
        done = self.pending.pop(i)
        if self.pieces[i][0].cache is not None:
            done.result()  # its download, or the error that ended it


def prepare(shard, skip: int, take: int) -> None:
    """Download a cached shard; then ask the disk for the shard's bytes."""
    if shard.cache is not None:
        path = shard.cache.fetch(shard.url, shard.sha256, shard.bytes)
    elif shard.is_remote:
        return  # range reads: shards.tario.remote_samples
    else:
        path = local_path(shard.url)
    if SHARD_CACHE.kept(path) is not None:
        return  # mapped by this process already: a later epoch reads kept samples, not the disk
    try:
        advise(path)
    except OSError:
        pass  # only a hint: the reader reports a missing or unreadable file itself


def advise(path: str) -> None:
    """The whole shard, not only the piece: its first read parses every tar header in it, and the rest
    of a shard split between two streams is read by the other in the same epoch (no byte read twice)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        for a in range(0, end, ADVISE_BYTES):
            os.posix_fadvise(fd, a, min(ADVISE_BYTES, end - a), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
