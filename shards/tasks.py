"""The work build-shards sends to dask workers: scan headers, write a tar shard, fill a Zarr shard range."""

import os
from dataclasses import dataclass

import numpy as np

from .errors import BadVideoError
from .schema import STREAMS, sample_meta
from .source import load_video, read_ahead, scan_video
from .tarwrite import TarShardWriter, sample_digest


@dataclass(frozen=True)
class Scanned:
    """A video whose four headers agree."""
    units: int
    dim: int


def scan_batch(videos) -> list:
    """Per video a Scanned, or the BadVideoError that names what is wrong (a value, not raised: the
    caller decides whether it stops the build)."""
    results = []
    for v in videos:
        try:
            results.append(Scanned(*scan_video(v)))
        except BadVideoError as e:
            results.append(e)
    return results


def skip_record(e: BadVideoError) -> dict:
    return {"class": e.class_name, "video": e.video, "path": e.path, "reason": e.problem}


def tar_task(staging, shard, videos, dtype, on_error, write, direct=True):
    """Load, validate and (if `write`) store one tar shard's videos; returns the task record."""
    samples, skipped, nbytes = [], [], 0
    writer = TarShardWriter(os.path.join(staging, shard["name"]), direct) if write else None
    try:
        for (key, label, _), (v, raws) in zip(shard["videos"], read_ahead(videos)):
            try:
                arrays = load_video(v, dtype, raws)
            except BadVideoError as e:
                if on_error == "fail":
                    raise
                skipped.append(skip_record(e))
                continue
            meta = sample_meta(label, v.class_name, v.video, arrays["lr_rgb"].shape[0], v.split, v.phase)
            entry = {"key": key, "label": label, "class": v.class_name, "video": v.video,
                     "units": meta["units"], "shard": os.path.basename(shard["name"]), "digest": sample_digest(arrays)}
            if writer:  # where the sample lies in its shard: remote readers fetch just these bytes
                entry["offset"], entry["bytes"] = writer.write(key, arrays, meta)
            nbytes += sum(a.nbytes for a in arrays.values())
            samples.append(entry)
        record = {"samples": samples, "skipped": skipped, "nbytes": nbytes, "count": len(videos), "files": []}
        if writer:
            info = writer.close()
            record["files"] = [{"path": shard["name"], "bytes": info["bytes"], "sha256": info["sha256"]}]
        return record
    except BaseException:
        if writer:
            writer.abort()
        raise


_BLOCKS = {}  # per worker process: reused block buffers (fresh memory costs a page fault per 4 KB)


def _blocks(units, dim, dtype):
    key = (dim, dtype)
    if key not in _BLOCKS or _BLOCKS[key]["hr_rgb"].shape[0] < units:
        _BLOCKS[key] = {s: np.empty((units, dim), dtype=dtype) for s in STREAMS}
    return {s: b[:units] for s, b in _BLOCKS[key].items()}


def zarr_task(staging, store_rel, start, stop, pieces, dim, dtype, direct=True):
    """Fill units [start, stop) of every stream from the videos overlapping it, write, hash the files.

    The videos cover every unit of the range (offsets are contiguous), so the blocks need no zeroing.
    Values are not re-scanned: the tar (or validate) task of every video checks them all, and any
    failure there abandons the whole build."""
    from .zarrio import write_unit_range  # zarr takes 0.3 s to import: only Zarr builds pay it

    blocks = _blocks(stop - start, dim, dtype)
    for (v, offset), (_, raws) in zip(pieces, read_ahead([v for v, _ in pieces])):
        arrays = load_video(v, dtype, raws, check_values=False)
        t = arrays["lr_rgb"].shape[0]
        a, b = max(start, offset), min(stop, offset + t)
        for s in STREAMS:
            blocks[s][a - start:b - start] = arrays[s][a - offset:b - offset]
    files = write_unit_range(os.path.join(staging, store_rel), start, stop, blocks, direct)
    for f in files:
        f["path"] = f"{store_rel}/{f['path']}"
    return {"files": files, "nbytes": sum(b.nbytes for b in blocks.values()), "count": len(pieces)}
