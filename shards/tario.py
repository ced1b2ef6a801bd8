"""Reading WebDataset tar shards: a chain of small streaming stages, local (mapped, shards.mapcache) or
remote (range reads, shards.remote). The writer is shards.tarwrite."""

import json
import mmap
import os
import tarfile

import numpy as np

from . import remote
from .errors import ShardCorruptError
from .mapcache import SHARD_CACHE
from .npyio import NpyFormatError, npy_from_bytes, npy_layout
from .schema import STREAMS


# Reading: open -> members -> samples (grouped) -> decoded dicts. Each stage names the shard in its errors.


def _parse_header(header: bytes, name: str, offset: int):
    """(member name, size, type flag) of one 512-byte tar header.

    USTAR headers, which our writer and GNU tar produce, are parsed here: 7x faster than
    `TarInfo.frombuf`, which was a third of the loader's time. Anything else goes to tarfile."""
    try:
        if header[257:262] != b"ustar" or header[124] & 0x80:  # not USTAR, or a base-256 size
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            return info.name, info.size, info.type
        if int(header[148:156].strip(b"\0 ") or b"-1", 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.HeaderError("bad checksum")
        member = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0":  # POSIX: long names are split into prefix / name (GNU uses 345: otherwise)
            prefix = header[345:500].split(b"\0", 1)[0]
            member = prefix + b"/" + member if prefix else member
        return member.decode("utf-8", "surrogateescape"), int(header[124:136].strip(b"\0 ") or b"0", 8), header[156:157]
    except (tarfile.HeaderError, ValueError) as e:
        raise ShardCorruptError(f"{name}: truncated or not a tar file (bad header at byte {offset}: {e})") from None


def _map(path: str, name: str):
    """(read-only memoryview of a local tar, its identity (inode, size, mtime)) from one open file."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise ShardCorruptError(f"{name}: truncated or not a tar file (empty)")
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    return view, (st.st_ino, st.st_size, st.st_mtime_ns)


def _member_spans(view: memoryview, name: str, whole: bool = True):
    """Yield (member name, data start, data length) of the regular files of a mapped tar.

    whole=False: `view` is a run of whole samples cut from a shard (a range read), with no
    end-of-archive marker after them."""
    size, offset = len(view), 0
    while offset + tarfile.BLOCKSIZE <= size:
        header = bytes(view[offset:offset + tarfile.BLOCKSIZE])
        if not any(header):
            return  # end-of-archive marker
        member, length, kind = _parse_header(header, name, offset)
        start = offset + tarfile.BLOCKSIZE
        if start + length > size:
            raise ShardCorruptError(f"{name}: truncated or not a tar file ({member} runs past the end)")
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            raise ShardCorruptError(f"{name}: unsupported extended tar header for {member!r}")
        if kind in tarfile.REGULAR_TYPES:
            yield member, start, length
        offset = start + -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if whole or offset != size:
        raise ShardCorruptError(f"{name}: truncated or not a tar file (no end-of-archive marker)")


def iter_mapped_members(path: str, name: str | None = None):
    """Yield (member name, memoryview) of the regular files of a local tar, parsed from an mmap.

    Members are zero-copy views of the page cache; tarfile's stream mode copied every byte in 10 KB
    pieces. Nothing is extracted to disk. The map lives as long as a view of it does."""
    name = name or path
    view, _ = _map(path, name)
    for member, start, length in _member_spans(view, name):
        yield member, view[start:start + length]


class SampleTable:
    """Where each sample's members lie in a mapped shard: keys, and every field's (start, length).

    Kept as arrays when every sample has the same fields (what build-shards writes): about 60 bytes
    a sample with five fields, so a rank that has read every shard of a million videos holds ~60 MB;
    the dicts this replaced took ~800 bytes a sample. Other shards keep their samples' dicts."""

    def __init__(self, samples: list, cache=None):
        self.fields = tuple(f for f in samples[0] if f != "__key__") if samples else ()
        uniform = bool(samples) and all(len(s) == len(self.fields) + 1 and all(f in s for f in self.fields)
                                        for s in samples)
        self.rows = None if uniform else samples
        if uniform:
            self.keys = [s["__key__"] for s in samples]
            self.keys = np.array(self.keys, dtype=object if any(not k.isascii() for k in self.keys) else "S")
            spans = [[s[f] for f in self.fields] for s in samples]
            wide = any(start + length >= 1 << 32 for row in spans for start, length in row)
            self.spans = np.array(spans, dtype=np.int64 if wide else np.uint32).reshape(len(samples), -1, 2)

        self._arrays = {}  # field -> (data offset, dtype, dim) shared by all its members, or None
        self._kept = {}  # streams -> [decoded sample or None], for decoded(keep=True)
        self.kept_samples = 0  # of its cache's decoded budget
        self.cache = cache  # the MappedShards that owns the budget

    def __len__(self):
        return len(self.rows) if self.rows is not None else len(self.keys)

    def _array_layout(self, view: memoryview, field: str):
        """(data offset, dtype, dim) that every `field` member of the shard has (a 2-D C-order .npy whose
        data fills the member exactly), checked once per process; None if any member differs."""
        if field not in self._arrays:
            self._arrays[field] = None
            if self.rows is None and field in self.fields:
                column, layouts = self.fields.index(field), set()
                for start, length in self.spans[:, column].tolist():
                    try:
                        shape, order, dtype, offset, nbytes = npy_layout(view[start:start + length])
                    except NpyFormatError:
                        return None
                    if len(shape) != 2 or order != "C" or offset + nbytes != length:
                        return None
                    layouts.add((offset, dtype, shape[1]))
                if len(layouts) == 1:
                    self._arrays[field] = layouts.pop()
        return self._arrays[field]

    def decoded(self, view: memoryview, skip: int, take: int | None, name: str, streams, file: tuple,
                keep: bool = False):
        """decode_sample of samples skip..skip+take; when every member of each stream shares one header
        layout (what build-shards writes), arrays are made from the table's spans without reading a
        header per member (later epochs: a third of decode_sample's time), and each sample also holds
        "__at__": (file, the streams' byte offsets in it), where `file` names the mapped file.

        keep=True (on that fast path, in a table of a cache): samples are kept with the table, within the
        cache's budget, and the same objects are handed out again on later calls: callers must not
        change them."""
        layouts = [self._array_layout(view, f"{s}.npy") for s in streams]
        if not all(layouts) or "json" not in self.fields:
            for raw in self.samples(view, skip, take):
                yield decode_sample(raw, name, streams)
            return
        end = len(self) if take is None else min(len(self), skip + take)
        if not keep or self.cache is None:
            yield from self._decode_rows(view, skip, end, name, streams, file, layouts)
            return
        kept = self._kept.setdefault(tuple(streams), [None] * len(self))
        i = skip
        while i < end:
            if kept[i] is not None:
                yield kept[i]
                i += 1
                continue
            j = i + 1  # decode the run of samples not kept yet in one go
            while j < end and kept[j] is None:
                j += 1
            for k, sample in enumerate(self._decode_rows(view, i, j, name, streams, file, layouts), i):
                if self.cache.reserve_decoded():
                    kept[k] = sample
                    self.kept_samples += 1
                yield sample
            i = j

    def _decode_rows(self, view: memoryview, skip: int, end: int, name: str, streams, file: tuple, layouts):
        meta = self.fields.index("json")
        columns = [(stream, self.fields.index(f"{stream}.npy"), offset, dtype, dim, dim * dtype.itemsize)
                   for stream, (offset, dtype, dim) in zip(streams, layouts)]
        for key, spans in zip(self.keys[skip:end].tolist(), self.spans[skip:end].tolist()):
            key = key.decode() if isinstance(key, bytes) else key
            start, length = spans[meta]
            sample = {"__key__": key, "meta": decode_meta(view[start:start + length], name, key)}
            at = []
            for stream, column, offset, dtype, dim, row_bytes in columns:
                start, length = spans[column]
                sample[stream] = np.ndarray(((length - offset) // row_bytes, dim), dtype, view, start + offset)
                at.append(start + offset)
            sample["__at__"] = (file, at)
            yield sample

    def samples(self, view: memoryview, skip: int, take: int | None):
        """Raw samples skip..skip+take: {"__key__": key, field: view of its bytes}."""
        end = None if take is None else skip + take
        if self.rows is not None:
            for row in self.rows[skip:end]:
                yield {f: v if f == "__key__" else view[v[0]:v[0] + v[1]] for f, v in row.items()}
            return
        for key, spans in zip(self.keys[skip:end].tolist(), self.spans[skip:end].tolist()):
            sample = {"__key__": key.decode() if isinstance(key, bytes) else key}
            for field, (start, length) in zip(self.fields, spans):
                sample[field] = view[start:start + length]
            yield sample


def _parse_shard(path: str, name: str, cache) -> tuple:
    """(view, identity, SampleTable) of a local tar, for SHARD_CACHE."""
    view, identity = _map(path, name)
    spans = ((member, (start, length)) for member, start, length in _member_spans(view, name))
    return view, identity, SampleTable(list(group_samples(spans, name)), cache)


def _mapped_shard(path: str, name: str) -> tuple:
    """(identity, view, SampleTable) of a local tar, mapped and parsed once per process and file version."""
    return SHARD_CACHE.get(path, name, _parse_shard)


def forget_mapped_shards() -> None:
    """Drop the kept maps, tables and decoded samples: the next read maps and parses again, and pages
    no map holds can leave the page cache (a benchmark calls this before timing a cold read)."""
    SHARD_CACHE.forget_all()


def mapped_bytes(file: tuple) -> np.ndarray:
    """The kept map of a local shard, as read-only bytes; `file` is the (path, identity) of a decoded
    sample's "__at__", and the file must still be the one it names (not rewritten since)."""
    path, identity = file
    kept = SHARD_CACHE.kept(path)
    if kept is None or kept[0] != identity:  # else the worker has just checked the file: no stat again
        kept = _mapped_shard(path, path)
        if kept[0] != identity:
            raise ShardCorruptError(f"{path}: rewritten while it was being read")
    return np.frombuffer(kept[1], np.uint8)


def mapped_samples(path: str, name: str | None = None, skip: int = 0, take: int | None = None):
    """Raw samples skip..skip+take of a local tar, their fields zero-copy views of one mmap.

    A shard's tar headers are parsed on its first read in this process, and its map is kept: streams
    that start mid-shard skip samples without reading them, and later epochs parse and map nothing
    (the page tables stay filled)."""
    _, view, table = _mapped_shard(path, name or path)
    yield from table.samples(view, skip, take)


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


_JSON = json.JSONDecoder()


def decode_meta(raw, name: str, key: str) -> dict:
    """json.loads of a sample's metadata, in half its time for the compact UTF-8 JSON the writer stores."""
    try:
        try:
            text = str(raw, "utf-8")
            meta, end = _JSON.raw_decode(text)  # skips loads' encoding sniffing and whitespace regexes
            if end == len(text):
                return meta
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        return json.loads(bytes(raw))  # whitespace around it, another encoding, or the error to report
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardCorruptError(f"{name}: key {key}: unreadable metadata ({e})") from None


def decode_sample(raw: dict, name: str, fields=tuple(STREAMS)) -> dict:
    """Decode the requested streams (`.npy`, never unpickled) and the metadata of a raw sample."""
    key = raw["__key__"]
    missing = [f for f in ("json", *(f"{s}.npy" for s in fields)) if f not in raw]
    if missing:
        raise ShardCorruptError(f"{name}: key {key}: missing {', '.join(missing)}")
    sample = {"__key__": key, "meta": decode_meta(raw["json"], name, key)}
    for stream in fields:
        try:
            sample[stream] = npy_from_bytes(raw[f"{stream}.npy"])
        except NpyFormatError as e:
            raise ShardCorruptError(f"{name}: key {key}: {stream}: {e}") from None
    return sample


RANGE_BYTES = 64 << 20  # a remote stream reads its samples in requests of about this size


def remote_samples(url: str, skip: int = 0, take: int | None = None, spans=None):
    """Raw samples skip..skip+take of a remote shard, read as byte ranges of whole samples.

    spans: each sample's (offset, bytes) in the shard, from the manifest; without them (or past
    them) the whole shard is read. Every request is retried (shards.remote)."""
    if spans is None:
        data = memoryview(remote.read_bytes(url))
        members = ((m, data[a:a + n]) for m, a, n in _member_spans(data, url))
        samples = tuple(group_samples(members, url))
        yield from samples[skip:None if take is None else skip + take]
        return
    wanted = spans[skip:None if take is None else skip + take]
    i = 0
    while i < len(wanted):
        j = i + 1  # whole samples, up to RANGE_BYTES (one request for the piece if the server ignores ranges)
        while j < len(wanted) and (remote.ignores_ranges(url) or wanted[j][0] + wanted[j][1] - wanted[i][0] <= RANGE_BYTES):
            j += 1
        start, end = wanted[i][0], wanted[j - 1][0] + wanted[j - 1][1]
        data = memoryview(remote.read_bytes(url, start, end))
        members = ((m, data[a:a + n]) for m, a, n in _member_spans(data, f"{url} (bytes {start}..{end})", whole=False))
        yield from group_samples(members, url)
        i = j


def iter_raw_samples(url: str, skip: int = 0, take: int | None = None, spans=None):
    """Raw (undecoded) samples skip..skip+take of one shard, in stored order: mapped for local files,
    range reads for URLs (see remote_samples)."""
    if remote.is_url(url):
        yield from remote_samples(url, skip, take, spans)
    else:
        yield from mapped_samples(local_path(url), url, skip, take)


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def iter_decoded_samples(url: str, skip: int = 0, take: int | None = None, spans=None, fields=tuple(STREAMS),
                         keep: bool = False):
    """decode_sample of iter_raw_samples(url, skip, take, spans); local shards take their table's fast path.

    keep=True (a reader that comes back every epoch): a local shard's decoded samples are kept and
    handed out again as the same objects (SampleTable.decoded), so the caller must not change them."""
    if remote.is_url(url):
        for raw in remote_samples(url, skip, take, spans):
            yield decode_sample(raw, url, fields)
    else:
        path = local_path(url)
        identity, view, table = _mapped_shard(path, url)
        yield from table.decoded(view, skip, take, url, fields, (path, identity), keep)


def iter_tar_samples(url: str, fields=tuple(STREAMS)):
    """All decoded samples of one shard, in stored order."""
    return iter_decoded_samples(url, fields=fields)
