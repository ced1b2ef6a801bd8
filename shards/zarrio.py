"""Zarr v3 phase stores: each stream a ragged [units, dim] array, sharded along units, plus offsets.

Streams are separate arrays, so a reader can take the LR streams of a video without touching HR bytes.
"""

import json
import os

import numpy as np
import zarr

from .atomic import is_temp
from .directio import write_file_atomic
from .schema import STREAMS, make_sample, sample_meta


def create_phase_store(path: str, dim: int, dtype: str, offsets, labels, keys, chunk_units: int, shard_units: int,
                       names: dict):
    """Create the group, its arrays and attributes (no stream data yet).

    names: {"split", "phase", "classes": [per sample], "videos": [per sample]}, so that a reader
    yields the same metadata as the tar copy (shards.schema)."""
    try:
        _create_phase_store(path, dim, dtype, offsets, labels, keys, chunk_units, shard_units, names)
    except OSError as e:  # zarr's store writes name no file (a full disk says only "[Errno 28]")
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from None


def _create_phase_store(path, dim, dtype, offsets, labels, keys, chunk_units, shard_units, names):
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


# The layout create_phase_store makes, whose shard files write_unit_range encodes itself
_SHARDED = {"bytes": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
_EMPTY = np.iinfo(np.uint64).max  # the index entry of a chunk that is not stored


def _shard_layout(path: str, stream: str):
    """(chunk_units, shard_units, n_units) of a stream array made by create_phase_store."""
    with open(os.path.join(path, stream, "zarr.json")) as f:
        meta = json.load(f)
    codecs = meta.get("codecs", [])
    conf = codecs[0].get("configuration", {}) if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed" else {}
    if (conf.get("codecs") != _SHARDED["bytes"] or conf.get("index_codecs") != _SHARDED["index"]
            or conf.get("index_location", "end") != "end" or meta.get("fill_value") != 0.0
            or meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}):
        raise ValueError(f"{path}/{stream}: not the layout create_phase_store makes (the only one written here)")
    return conf["chunk_shape"][0], meta["chunk_grid"]["configuration"]["chunk_shape"][0], meta["shape"][0]


def encode_shard(block: np.ndarray, chunk_units: int, shard_units: int) -> list | None:
    """The bytes of one shard file, as zarr's sharding codec writes them (the same bytes: tested):
    its chunks in Morton order, each `chunk_units` rows (the array's last ones padded with the fill
    value 0), those all +0.0 left out, then the index of (offset, length) pairs and its crc32c. `block`
    is the shard's rows (fewer than shard_units for the array's last shard); None if nothing is stored."""
    k = shard_units // chunk_units
    index = np.full((k, 1, 2), _EMPTY, dtype="<u8")
    parts, offset = [], 0
    # Morton order over a (k, 1) chunk grid is plain row order: with one column, the interleaved bits
    # are the row's. (zarr's private morton_order_iter was renamed in zarr 3.4: not imported.)
    for i in range(k):
        chunk = block[i * chunk_units:(i + 1) * chunk_units]
        if len(chunk) == 0:
            continue  # wholly past the array's end
        if len(chunk) < chunk_units:
            chunk = np.concatenate([chunk, np.zeros((chunk_units - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        if not chunk.view(f"u{chunk.dtype.itemsize}").any():  # zarr stores no chunk whose bits are all the fill
            continue  # value's (+0.0; a -0.0 is stored)
        data = memoryview(np.ascontiguousarray(chunk, chunk.dtype.newbyteorder("<"))).cast("B")
        index[i, 0] = offset, len(data)
        parts.append(data)
        offset += len(data)
    if not parts:
        return None
    raw = index.tobytes()
    return parts + [raw + _crc32c(raw).to_bytes(4, "little")]


def _crc32c(data: bytes) -> int:
    try:
        from google_crc32c import value  # zarr >= 3.1's own dependency
    except ImportError:
        from crc32c import crc32c as value  # zarr 3.0's
    return value(data)


def write_unit_range(path: str, start: int, stop: int, blocks: dict, direct: bool = True) -> list:
    """Write whole shards [start, stop) of every stream; returns [{path, bytes, sha256}] of the files
    written, paths relative to the store.

    The shard files are encoded by encode_shard, not by zarr-python: its codec pipeline spent as much
    CPU again as the rest of a Zarr build (a fill-value comparison of every chunk, then two copies)."""
    files = []
    for stream in STREAMS:
        chunk_units, shard_units, n_units = _shard_layout(path, stream)
        if start % shard_units or (stop % shard_units and stop != n_units):
            raise ValueError(f"{path}: units [{start}, {stop}) are not whole shards of {shard_units} units")
        for a in range(start, stop, shard_units):
            b = min(a + shard_units, stop)
            parts = encode_shard(blocks[stream][a - start:b - start], chunk_units, shard_units)
            if parts is None:
                continue  # all fill value: zarr writes no file either
            key = f"{stream}/c/{a // shard_units}/0"
            os.makedirs(os.path.join(path, os.path.dirname(key)), exist_ok=True)
            files.append({"path": key, **write_file_atomic(os.path.join(path, key), parts, direct)})
    return sorted(files, key=lambda f: f["path"])


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
