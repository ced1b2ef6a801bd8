"""WebDataset tar shards: a deterministic writer and a chain of small streaming readers."""

import hashlib
import io
import json
import os
import tarfile
import urllib.request
import zlib

import numpy as np
import webdataset as wds

from .errors import ShardCorruptError
from .npyio import NpyFormatError, npy_from_bytes, npy_to_bytes
from .source import STREAMS


def sample_digest(arrays: dict) -> str:
    """CRC32 over the four arrays' bytes in stream order: a cheap identity shared by tar and Zarr copies."""
    crc = 0
    for stream in STREAMS:
        crc = zlib.crc32(np.ascontiguousarray(arrays[stream]).data, crc)
    return f"{crc:08x}"


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts every byte on its way to `raw`."""

    def __init__(self, raw):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.nbytes += len(b)
        return self.raw.write(b)


class TarShardWriter:
    """Write one tar shard under a temporary name; `close()` renames it into place.

    Fixed tar metadata (mtime 0, no owner names) makes the bytes a function of the samples alone.
    """

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.partial-{os.getpid()}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(self.tmp, "wb", buffering=4 << 20)
        self._hashing = _HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hashing, user="", group="", mode=0o444, mtime=0, encoder=False)
        self.n_samples = 0

    def write(self, key: str, arrays: dict, meta: dict) -> None:
        sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
        for stream in STREAMS:
            sample[f"{stream}.npy"] = npy_to_bytes(arrays[stream])
        self._tar.write(sample)
        self.n_samples += 1

    def close(self) -> dict:
        self._tar.close()
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self._hashing.nbytes, "sha256": self._hashing.sha.hexdigest(), "samples": self.n_samples}

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.abort() if exc_type else None


# Reading: open -> members -> samples (grouped) -> decoded dicts. Each stage names the shard in its errors.


def open_shard(url: str):
    """A readable binary stream for a local path, file:// or http(s):// URL (streamed, not downloaded first)."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return open(url, "rb", buffering=1 << 20)


def iter_members(stream, name: str):
    """Yield (member name, bytes) of regular files in a tar stream; nothing is extracted to disk."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardCorruptError(f"{name}: truncated or not a tar file ({e})") from None


def group_samples(members, name: str):
    """Group consecutive members `<key>.<field>` into raw samples {"__key__": key, field: bytes}."""
    current = None
    for member, data in members:
        key, dot, field = member.partition(".")
        if not dot or "/" in key:
            raise ShardCorruptError(f"{name}: unexpected member {member!r}")
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        if field in current:
            raise ShardCorruptError(f"{name}: key {key}: field {field!r} appears twice")
        current[field] = data
    if current is not None:
        yield current


def decode_sample(raw: dict, name: str, fields=tuple(STREAMS)) -> dict:
    """Decode the requested streams (`.npy`, never unpickled) and the metadata of a raw sample."""
    key = raw["__key__"]
    missing = [f for f in ("json", *(f"{s}.npy" for s in fields)) if f not in raw]
    if missing:
        raise ShardCorruptError(f"{name}: key {key}: missing {', '.join(missing)}")
    try:
        sample = {"__key__": key, "meta": json.loads(raw["json"])}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardCorruptError(f"{name}: key {key}: unreadable metadata ({e})") from None
    for stream in fields:
        try:
            sample[stream] = npy_from_bytes(raw[f"{stream}.npy"])
        except NpyFormatError as e:
            raise ShardCorruptError(f"{name}: key {key}: {stream}: {e}") from None
    return sample


def iter_tar_samples(url: str, fields=tuple(STREAMS)):
    """All decoded samples of one shard, in stored order."""
    with open_shard(url) as stream:
        for raw in group_samples(iter_members(stream, url), url):
            yield decode_sample(raw, url, fields)
