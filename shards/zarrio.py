"""Zarr v3 phase stores: each stream a ragged [units, dim] array, sharded along units, plus offsets.

Streams are separate arrays, so a reader can take the LR streams of a video without touching HR bytes.
"""

import asyncio
import os

import numpy as np
import zarr
from zarr.storage import LocalStore

from .atomic import is_temp
from .directio import write_file_atomic
from .schema import STREAMS, make_sample, sample_meta

_WRITE_CONFIG = {"write_empty_chunks": True}  # every shard file exists, so the file list is predictable


def create_phase_store(path: str, dim: int, dtype: str, offsets, labels, keys, chunk_units: int, shard_units: int,
                       names: dict):
    """Create the group, its arrays and attributes (no stream data yet).

    names: {"split", "phase", "classes": [per sample], "videos": [per sample]}, so that a reader
    yields the same metadata as the tar copy (shards.schema)."""
    n_units = int(offsets[-1])
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for stream in STREAMS:
        group.create_array(
            stream, shape=(n_units, dim), dtype=dtype, chunks=(chunk_units, dim), shards=(shard_units, dim),
            compressors=None, fill_value=0.0, dimension_names=("unit", "feature"),
        )
    group.create_array("offsets", data=np.asarray(offsets, dtype=np.int64), chunks=(len(offsets),), compressors=None)
    group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(max(len(labels), 1),), compressors=None)
    group.attrs.update({"keys": list(keys), "streams": list(STREAMS), "shard_units": shard_units, **names})


def shard_ranges(n_units: int, shard_units: int):
    """Unit ranges [start, stop) of the store's shards: one writer task each, so no two tasks share a file."""
    return [(a, min(a + shard_units, n_units)) for a in range(0, n_units, shard_units)]


class ShardFileStore(LocalStore):
    """A LocalStore that writes each file with `write_file_atomic` (around the page cache, under a
    temporary name) and records its size and sha256, so a build never reads its shard files back."""

    def __init__(self, root, *, read_only: bool = False, direct: bool = True):
        super().__init__(root, read_only=read_only)
        self.direct, self.written = direct, {}

    def with_read_only(self, read_only: bool = False):
        return type(self)(self.root, read_only=read_only, direct=self.direct)

    async def set(self, key: str, value) -> None:
        self._check_writable()
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.written[key] = await asyncio.to_thread(write_file_atomic, path, value.as_buffer_like(), self.direct)


def write_unit_range(path: str, start: int, stop: int, blocks: dict, direct: bool = True) -> list:
    """Write whole shards [start, stop) of every stream; returns [{path, bytes, sha256}] of the files
    written, paths relative to the store."""
    store = ShardFileStore(path, direct=direct)
    for stream in STREAMS:
        arr = zarr.open_array(store, path=stream, mode="r+", config=_WRITE_CONFIG)
        arr[start:stop] = blocks[stream]
    return [{"path": key, **info} for key, info in sorted(store.written.items())]


def store_files(path: str) -> list:
    """Every file of a store, relative to it, sorted (temporary files of killed writers left out)."""
    found = []
    for folder, _, files in os.walk(path):
        found += [os.path.relpath(os.path.join(folder, f), path) for f in files if not is_temp(f)]
    return sorted(found)


class ZarrPhaseReader:
    """Random and range access to the samples of one phase store."""

    def __init__(self, path: str):
        self.path = path
        self.group = zarr.open_group(path, mode="r")
        self.offsets = self.group["offsets"][:]
        self.labels = self.group["labels"][:]
        attrs = self.group.attrs
        self.keys = list(attrs["keys"])
        self.names = {k: attrs.get(k) for k in ("split", "phase", "classes", "videos")}
        self.arrays = {s: self.group[s] for s in STREAMS}

    def __len__(self):
        return len(self.keys)

    def iter_range(self, first: int, last: int, fields=tuple(STREAMS)):
        """Samples first..last-1 (shards.schema), read with one contiguous slice per stream (no HR bytes
        if not asked)."""
        if first >= last:
            return
        lo, hi = int(self.offsets[first]), int(self.offsets[last])
        blocks = {s: self.arrays[s][lo:hi] for s in fields}
        n = self.names
        for i in range(first, last):
            a, b = int(self.offsets[i]) - lo, int(self.offsets[i + 1]) - lo
            if n["videos"] is not None:
                meta = sample_meta(int(self.labels[i]), n["classes"][i], n["videos"][i], b - a, n["split"], n["phase"])
            else:  # a store written before the names were kept
                meta = {"label": int(self.labels[i]), "units": b - a}
            yield make_sample(self.keys[i], meta, {s: blocks[s][a:b] for s in fields})
