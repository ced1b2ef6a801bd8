"""The maps and sample tables (shards.tario.SampleTable) a process keeps of the local shards it reads:
one MappedShards object, with its limits, that every reader of the process shares (SHARD_CACHE).

A shard is mapped and its tar headers parsed once per process and file version; later reads (the
next epoch, a stream starting mid-shard) parse and map nothing. A training stream also keeps the
samples it decodes (`keep=True`): every epoch reads the same videos, and decoding them again was
13% of a warm epoch at HMDB51's size.
"""

import os


class MappedShards:
    """path -> (identity, map, SampleTable) of local tar shards, the oldest dropped past `max_shards`;
    decoded samples kept across the tables within `max_decoded` (~1.9 KB each: a dict, its metadata,
    four array views of the map; 16,384 are ~32 MB, every video of HMDB51's or UCF101's splits)."""

    def __init__(self, max_shards: int = 1024, max_decoded: int = 16384):
        self.max_shards, self.max_decoded = max_shards, max_decoded
        self.decoded = 0  # samples the kept tables hold now
        self._shards = {}

    def get(self, path: str, name: str, parse) -> tuple:
        """(identity, view, table) of a local tar; `parse(path, name, cache)` gives (view, identity, table)
        when the shard is new or was rewritten (another inode, size or mtime)."""
        st = os.stat(path)
        kept = self._shards.get(path)
        if kept is None or kept[0] != (st.st_ino, st.st_size, st.st_mtime_ns):
            view, identity, table = parse(path, name, self)
            kept = (identity, view, table)
            self.forget(path)
            if len(self._shards) >= self.max_shards:
                self.forget(next(iter(self._shards)))  # the oldest
            self._shards[path] = kept
        return kept

    def kept(self, path: str):
        """What is kept of `path` now, without checking the file: (identity, view, table) or None."""
        return self._shards.get(path)

    def reserve_decoded(self) -> bool:
        """Room for one more kept sample? (taken if so)"""
        if self.decoded >= self.max_decoded:
            return False
        self.decoded += 1
        return True

    def forget(self, path: str) -> None:
        """Drop one kept map and table, and give its kept samples' room back."""
        kept = self._shards.pop(path, None)
        if kept is not None:
            self.decoded -= kept[2].kept_samples

    def forget_all(self) -> None:
        for path in list(self._shards):
            self.forget(path)


SHARD_CACHE = MappedShards()  # the process's: every local tar reader shares it
