"""Writing WebDataset tar shards: a deterministic writer whose bytes are a function of the samples alone."""

import json
import os
import tarfile
import zlib

import numpy as np

from .atomic import remove_quietly, temp_path
from .directio import DirectFile
from .npyio import npy_parts
from .schema import STREAMS


def sample_digest(arrays: dict) -> str:
    """CRC32 over the four arrays' bytes in stream order: a cheap identity shared by tar and Zarr copies."""
    crc = 0
    for stream in STREAMS:
        crc = zlib.crc32(np.ascontiguousarray(arrays[stream]).data, crc)
    return f"{crc:08x}"


def _ustar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    return info


# Every member header is the same but for name, size and checksum: the stdlib builds it once (so the
# other fields are exactly what tarfile writes) and each member patches three fields in (tobuf took
# 60 us a member, a tenth of a small video's build time).
_USTAR = bytearray(_ustar_info("", 0).tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
_USTAR[148:156] = b" " * 8  # the checksum is summed with its own field as spaces


def ustar_header(name: str, size: int) -> bytes:
    """The USTAR header block tarfile writes for a member `name` of `size` bytes (mode 0444, mtime 0)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:  # a split name (prefix field) or a huge size: tarfile's own way
        return _ustar_info(name, size).tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    buf = bytearray(_USTAR)
    buf[:len(raw)] = raw
    buf[124:136] = b"%011o\0" % size
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


class TarShardWriter:
    """Write one tar shard under a temporary name; `close()` (or a clean `with` exit) renames it into place.

    Members are written directly: a 512-byte USTAR header (`ustar_header`), then array bytes from the
    array's own buffer to a DirectFile, which hashes what it writes (tarfile's stream layer copied every
    byte several times; the page cache cost more than all the rest, see directio).
    Fixed metadata (mtime 0, mode 0444, no owner names) and a fixed member order make the bytes a
    function of the samples alone. The result is a plain tar that `tar`, tarfile and webdataset read.
    """

    def __init__(self, path: str, direct: bool = True):
        self.path, self.tmp = path, temp_path(path)
        self._file = DirectFile(self.tmp, direct, name=path)  # hashes and counts what it writes
        self.n_samples, self.info = 0, None

    def _member(self, name: str, parts: list) -> None:
        size = sum(len(p) for p in parts)
        self._file.write(ustar_header(name, size))
        for part in parts:
            self._file.write(part)
        if size % tarfile.BLOCKSIZE:
            self._file.write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def write(self, key: str, arrays: dict, meta: dict) -> tuple:
        """Append one sample; returns its (offset, bytes) in the shard: what a range read fetches."""
        members = {f"{stream}.npy": npy_parts(arrays[stream]) for stream in STREAMS}
        return self.write_members(key, members, meta)

    def write_members(self, key: str, members: dict, meta: dict) -> tuple:
        """Append one sample of members {field: [bytes-like parts]} and its `key.json` meta; returns
        its (offset, bytes) in the shard."""
        start = self._file.nbytes
        members = {**members, "json": [json.dumps(meta, sort_keys=True).encode()]}
        for field in sorted(members):  # the order webdataset's TarWriter uses
            self._member(f"{key}.{field}", members[field])
        self.n_samples += 1
        return start, self._file.nbytes - start

    def close(self) -> dict:
        """Finish the archive and rename it into place; returns its bytes, sha256 and sample count."""
        if self.info is not None:
            return self.info
        self._file.write(bytes(2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        if self._file.nbytes % tarfile.RECORDSIZE:  # pad to a whole record, as tar and tarfile do
            self._file.write(bytes(tarfile.RECORDSIZE - self._file.nbytes % tarfile.RECORDSIZE))
        self._file.close()
        os.replace(self.tmp, self.path)
        self.info = {"bytes": self._file.nbytes, "sha256": self._file.sha256.hexdigest(), "samples": self.n_samples}
        return self.info

    def abort(self) -> None:
        self._file.abandon()
        remove_quietly(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type:
            self.abort()
        else:
            self.close()
