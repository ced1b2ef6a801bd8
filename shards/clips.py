"""Clip sets (build-clips): how a 16-frame unit is stored in a tar shard, read back, and verified.

One tar sample per unit, keyed `<video key>_u<unit>` (units of a video are consecutive samples):

    <key>.json           {"label", "class", "video", "split", "phase", "unit", "units"}
    <key>.hr_rgb.<ext>   the unit's HR RGB frames (H x W: 128x171 for 112 crops)
    <key>.lr_rgb.<ext>   its LR RGB frames at their low resolution (12x16; upsampled on the device)
    <key>.hr_flow.<ext>  flow images of the HR frames (x, y, magnitude; 128: no motion), H x W
    <key>.lr_flow.<ext>  flow images of the LR frames brought back to H x W

A stream member holds its frames end to end after a header of one little-endian uint32 size per
frame: JPEG (ext "jpgs", the default) or PNG ("pngs") images of R, G, B frames, or "raw": the
uint8 array (frames, h, w, 3) as it is (LR RGB is always raw: stream_storage). One member a stream, not one a frame: a tar header per
frame would add 8 KB to a 190 KB unit. The manifest is a shard set's (shards.manifest) with
"content": "clips", a "clips" record (frames, size, lr_size, storage), and one sample-table row per
video ({key, label, units, class, video, shard}); a shard entry's "samples" counts its videos.
"""

import json
import os
import sys
from collections import Counter

import numpy as np

from . import schema
from .errors import ELRError, ShardCorruptError
from .cache import human as human_bytes
from .manifest import file_problem, join_path, row_problems
from .tario import group_samples, iter_mapped_members

STREAMS = tuple(schema.STREAMS)  # the feature streams' names: a unit's clips are what C3D turns into them
STORAGE = {"jpeg": "jpgs", "png": "pngs", "raw": "raw"}  # storage -> member extension


def stream_storage(storage: str, stream: str) -> str:
    """How a stream is stored: LR RGB always raw (12x16x3 = 576 bytes a frame, fewer than a JPEG's own
    headers, and JPEG's 8x8 blocks would blur the eLR frames the whole method is about)."""
    return "raw" if stream == "lr_rgb" else storage


def member_name(storage: str, stream: str) -> str:
    return f"{stream}.{STORAGE[stream_storage(storage, stream)]}"


def unit_key(video_key: str, unit: int) -> str:
    return f"{video_key}_u{unit:05d}"


def encode_frames(frames: np.ndarray, storage: str, quality: int = 90) -> bytes:
    """uint8 R, G, B frames (n, h, w, 3) -> one stream member's bytes."""
    if storage == "raw":
        return np.ascontiguousarray(frames).tobytes()
    import cv2

    ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]) if storage == "jpeg" else (".png", [])
    parts = []
    for frame in frames:
        ok, data = cv2.imencode(ext, np.ascontiguousarray(frame[..., ::-1]), params)  # OpenCV writes B, G, R
        if not ok:
            raise ValueError(f"OpenCV could not encode a {frame.shape} frame as {storage}")
        parts.append(data.tobytes())
    return np.array([len(p) for p in parts], "<u4").tobytes() + b"".join(parts)


def decode_frames(data, storage: str, shape: tuple) -> np.ndarray:
    """One stream member's bytes -> uint8 R, G, B frames of `shape` (n, h, w, 3); a member that does
    not hold them is a ValueError saying what differs."""
    if storage == "raw":
        if len(data) != int(np.prod(shape)):
            raise ValueError(f"{len(data)} bytes, {shape} needs {int(np.prod(shape))}")
        return np.frombuffer(data, np.uint8).reshape(shape)
    import cv2

    n = shape[0]
    if len(data) < 4 * n:
        raise ValueError(f"{len(data)} bytes: shorter than its header of {n} frame sizes")
    sizes = np.frombuffer(data, "<u4", n).tolist()
    if 4 * n + sum(sizes) != len(data):
        raise ValueError(f"{len(data)} bytes, its header says {4 * n + sum(sizes)}")
    out, at = np.empty(shape, np.uint8), 4 * n
    for i, size in enumerate(sizes):
        image = cv2.imdecode(np.frombuffer(data, np.uint8, size, at), cv2.IMREAD_COLOR)
        if image is None or image.shape != shape[1:]:
            raise ValueError(f"frame {i} is not a {shape[2]}x{shape[1]} image"
                             + ("" if image is None else f" (found {image.shape[1]}x{image.shape[0]})"))
        out[i] = image[..., ::-1]
        at += size
    return out


def stream_shapes(clips: dict) -> dict:
    """{stream: (frames, h, w, 3)} of a clip set's "clips" record."""
    n, (h, w), (lh, lw) = clips["frames"], clips["size"], clips["lr_size"]
    return {s: (n, lh, lw, 3) if s == "lr_rgb" else (n, h, w, 3) for s in STREAMS}


def verify_clip_tar(root: str, shard: dict, expected: dict, clips: dict, n_classes: int) -> dict:
    """Hash one clip shard and decode every unit: its videos' units all there, in order, with the
    manifest's label, class and video, and every frame of the size the set says. {"seen": [(video
    key, label)], "problems": [...], "n": videos}."""
    name, path = shard["path"], os.path.join(root, shard["path"])
    if not os.path.exists(path):
        return {"seen": [], "problems": [f"{name}: missing"], "n": shard["samples"]}
    problems, units = [], Counter()
    labels, shapes = {}, stream_shapes(clips)
    try:
        for raw in group_samples(iter_mapped_members(path, name), name):
            key = raw["__key__"]
            video_key, _, unit = key.rpartition("_u")
            where = f"{name}: key {key}"
            try:
                meta = json.loads(bytes(raw["json"]))
            except (KeyError, ValueError):
                problems.append(f"{where}: no readable .json")
                continue
            entry = expected.get(video_key)
            if entry is None:
                problems.append(f"{where}: its video is not in the manifest")
                continue
            if meta.get("unit") != units[video_key] or unit != f"{units[video_key]:05d}":
                problems.append(f"{where}: unit {meta.get('unit')!r} where unit {units[video_key]} of "
                                f"{entry['class']}/{entry['video']} belongs")
            units[video_key] += 1
            labels[video_key] = meta.get("label")
            problems += row_problems(where, meta, entry)
            for stream, shape in shapes.items():
                member = member_name(clips["storage"], stream)
                try:
                    decode_frames(raw[member], stream_storage(clips["storage"], stream), shape)
                except KeyError:
                    problems.append(f"{where}: no {member}")
                except ValueError as e:
                    problems.append(f"{where}: {member}: {e}")
    except ELRError as e:
        problems.append(str(e))
    for video_key, entry in expected.items():
        if units[video_key] != entry["units"]:
            problems.append(f"{name}: {entry['class']}/{entry['video']} has {units[video_key]} units, "
                            f"manifest says {entry['units']}")
    if problem := file_problem(path, name, shard):
        problems.append(problem)
    return {"seen": sorted(labels.items()), "problems": problems, "n": shard["samples"], "units": sum(units.values())}


class ClipSet:
    """A clip set opened for reading: a phase's units in table order, each read by its index.

    `units(split, phase)` -> [(shard index, unit index in its shard, video index, unit of its video)]
    (from the sample table alone: a video's units are consecutive samples of its shard);
    `read(split, phase, unit)` -> {"meta": ..., stream: uint8 frames} for the streams asked for. A
    shard is mapped and its tar headers parsed once per process (shards.tario).

    A remote set (any fsspec URL) is read through a ShardCache (`cache`): units are read at random, a
    few at a time, so `download(split, phases)` brings every shard of the phases a run reads into the
    cache before its first step (once per machine: every rank and loader worker shares the copies);
    a unit is then read from the cached copy, held against eviction while it is read."""

    def __init__(self, root: str, cache=None):
        from . import remote
        from .cache import CacheError
        from .shardset import ShardSet

        self.remote = remote.is_url(root)
        if self.remote and cache is None:
            raise CacheError(f"{root}: a remote clip set is read through a local cache (its units are read at random, "
                             "a few at a time): give --cache-dir DIR --cache-limit SIZE (or ELR_CACHE_DIR, ELR_CACHE_LIMIT)")
        self.root = root.rstrip("/") if self.remote else os.path.abspath(root)
        self.cache = cache if self.remote else None  # a local set is read where it is
        self.manifest = ShardSet.open(self.root, samples=True, content="clips").manifest
        self.clips, self.classes = self.manifest["clips"], self.manifest["classes"]
        self.shapes = stream_shapes(self.clips)
        self._units = {}

    def shards(self, split: str, phases) -> list:
        """[(url or path, manifest entry)] of the phases' shards, phase after phase."""
        return [(join_path(self.root, s["path"]), s) for phase in phases
                for s in self.manifest["splits"][split][phase]["webdataset"]["shards"]]

    def check_cache_room(self, split: str, phases, reader: str = "") -> None:
        """A remote set: refuse a cache limit that cannot hold every shard of the phases (one CacheError
        saying why they are all needed: `reader`, else training's random reads)."""
        if self.cache is not None:
            sizes = [s["bytes"] for _, s in self.shards(split, phases)]
            shards, size = f"all {len(sizes)} shards of {', '.join(phases)}", human_bytes(sum(sizes))
            self.cache.check_room(sizes, len(sizes), why=f"{reader} ({shards}: {size})" if reader else
                                  f"units of {shards} are read at random in every epoch ({size})")

    def download(self, split: str, phases, rank: int = 0, world: int = 1, threads: int = 4,
                 progress: bool = True, videos=None) -> None:
        """A remote set: every shard of the phases (or only those holding `videos`, [(phase, index in
        its sample table)]) into the cache, checked against its sha256 (a copy already there is kept).
        The limit must hold every shard of the phases; ranks start at different shards and meet at the
        entries' locks, so each shard is downloaded once per machine."""
        from concurrent.futures import ThreadPoolExecutor

        from .progress import Progress

        if self.cache is None:
            return
        self.check_cache_room(split, phases)
        shards = self.shards(split, phases)
        if videos is not None:  # the shards holding them: a row names its shard by file name, within its phase
            wanted = {(phase, self.videos(split, phase)[index]["shard"]) for phase, index in videos}
            shards = [shard for phase in phases for shard in self.shards(split, [phase])
                      if (phase, os.path.basename(shard[1]["path"])) in wanted]
        start = len(shards) * rank // world
        shards = shards[start:] + shards[:start]

        def fetch(shard) -> int:
            url, entry = shard
            self.cache.fetch(url, entry["sha256"], entry["bytes"])
            return entry["bytes"]

        with Progress(total=sum(s["bytes"] for _, s in shards), desc="caching clip shards", unit="B", unit_scale=True,
                      disable=not progress, file=sys.stderr, leave=False) as bar, ThreadPoolExecutor(threads) as pool:
            for n in pool.map(fetch, shards):
                bar.update(n)

    def phases(self, split: str) -> list:
        return list(self.manifest["splits"].get(split, {}))

    def videos(self, split: str, phase: str) -> list:
        """The phase's sample-table rows (key, label, units, class, video, shard), in table order."""
        return self.manifest["splits"][split][phase]["samples"]

    def _index(self, split: str, phase: str) -> tuple:
        """(units, starts): the phase's units in table order, and where each video's (consecutive) begin."""
        if (split, phase) not in self._units:
            entry = self.manifest["splits"][split][phase]
            shard_of = {os.path.basename(s["path"]): i for i, s in enumerate(entry["webdataset"]["shards"])}
            units, starts, at = [], [], Counter()
            for v, row in enumerate(entry["samples"]):
                shard = shard_of[row["shard"]]
                starts.append(len(units))
                units += [(shard, at[shard] + u, v, u) for u in range(row["units"])]
                at[shard] += row["units"]
            self._units[(split, phase)] = units, starts + [len(units)]
        return self._units[(split, phase)]

    def units(self, split: str, phase: str) -> list:
        return self._index(split, phase)[0]

    def video_units(self, split: str, phase: str, video: int) -> list:
        """The units of the phase's `video`-th video (its sample-table row), in order."""
        units, starts = self._index(split, phase)
        return units[starts[video]:starts[video + 1]]

    def read(self, split: str, phase: str, unit: tuple, streams=STREAMS) -> dict:
        from .tario import mapped_samples

        shard, index, video, u = unit
        entry = self.manifest["splits"][split][phase]["webdataset"]["shards"][shard]
        path = join_path(self.root, entry["path"])  # errors name it (a remote one by its URL)
        if self.cache is None:
            return self._read(mapped_samples(path, path, skip=index, take=1), path, split, phase, unit, streams)
        with self.cache.open(path, entry["sha256"], entry["bytes"]) as local:
            return self._read(mapped_samples(local, path, skip=index, take=1), path, split, phase, unit, streams)

    def _read(self, samples, where: str, split: str, phase: str, unit: tuple, streams) -> dict:
        _, index, video, u = unit
        raw = next(samples, None)
        row = self.videos(split, phase)[video]
        if raw is None or raw["__key__"] != unit_key(row["key"], u):
            raise ShardCorruptError(f"{where}: sample {index} is not unit {u} of {row['class']}/{row['video']} "
                                    "(a shard changed since its manifest was written? elr-ingest verify finds it)")
        out, storage = {"meta": json.loads(bytes(raw["json"]))}, self.clips["storage"]
        for stream in streams:
            try:
                out[stream] = decode_frames(raw[member_name(storage, stream)], stream_storage(storage, stream),
                                            self.shapes[stream])
            except (KeyError, ValueError) as e:
                raise ShardCorruptError(f"{where}: key {raw['__key__']}: {stream}: "
                                        f"{'missing' if isinstance(e, KeyError) else e} (a damaged shard: elr-ingest "
                                        "verify checks every frame)") from None
        return out
