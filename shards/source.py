"""Discover the seed's per-file feature tree and load one video's four aligned arrays."""

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .errors import BadVideoError, SourceLayoutError
from .npyio import NpyFormatError, npy_from_bytes, read_npy_layout

from .schema import STREAMS

PHASES = ("Train", "Validation", "Test")


def video_key(split: str, phase: str, class_name: str, video: str) -> str:
    """Stable, unique, WebDataset-safe sample key (no dots, no slashes)."""
    digest = hashlib.sha1(f"{split}/{phase}/{class_name}/{video}".encode()).hexdigest()
    return "v" + digest[:20]


@dataclass(frozen=True)
class SourceVideo:
    split: str
    phase: str
    class_name: str
    video: str  # original file name without .npy, kept in the sample metadata
    paths: tuple  # one path per stream, in STREAMS order
    sizes: tuple = ()  # each file's size in bytes as discovered, -1 for a missing one

    @property
    def key(self) -> str:
        return video_key(self.split, self.phase, self.class_name, self.video)


@dataclass
class SourceTree:
    root: str
    classes: list  # sorted class names; the label is the index here
    phases: dict  # (split, phase) -> [SourceVideo], sorted by class then video

    def digest(self) -> str:
        """Digest of the source file list (relative path and size), to detect a changed tree."""
        h = hashlib.sha256()
        for (split, phase), videos in self.phases.items():
            for v in videos:
                for suffix, size in zip(STREAMS.values(), v.sizes):
                    h.update(f"{split}/{phase}_{suffix}/{v.class_name}/{v.video}.npy\t{size}\n".encode())
        return h.hexdigest()

    def n_files(self) -> int:
        return sum(len(vs) for vs in self.phases.values()) * len(STREAMS)


def _list_dirs(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def discover(root: str, splits=None) -> SourceTree:
    """Find splits (`Split*`), phases and classes under `root`; every phase needs all four stream folders."""
    if not os.path.isdir(root):
        raise SourceLayoutError(f"{root}: no such dataset folder")
    found = [d for d in _list_dirs(root) if d.startswith("Split")]
    if splits:
        missing = sorted(set(splits) - set(found))
        if missing:
            raise SourceLayoutError(f"{root}: no split folder {', '.join(missing)} (found: {', '.join(found) or 'none'})")
        found = [s for s in found if s in splits]
    if not found:
        raise SourceLayoutError(f"{root}: no Split* folders (expected e.g. {root}/Split1/Train_lr_features/<class>/<video>.npy)")

    layout = {}  # (split, phase) -> {stream: {class: [video names]}}
    for split in found:
        split_dir = os.path.join(root, split)
        for phase in PHASES:
            folders = {s: os.path.join(split_dir, f"{phase}_{suffix}") for s, suffix in STREAMS.items()}
            present = [s for s, f in folders.items() if os.path.isdir(f)]
            if not present:
                continue
            if len(present) < len(STREAMS):
                absent = [folders[s] for s in STREAMS if s not in present]
                raise SourceLayoutError(f"{absent[0]}: missing stream folder ({phase} has {len(present)} of 4 streams)")
            layout[(split, phase)] = {
                s: {c: _npy_names(os.path.join(f, c)) for c in _list_dirs(f)} for s, f in folders.items()
            }
        if not any(sp == split for sp, _ in layout):
            raise SourceLayoutError(f"{split_dir}: no phase folders (expected Train_lr_features, ...)")

    classes = sorted({c for streams in layout.values() for per_class in streams.values() for c in per_class})
    phases = {}
    for (split, phase), streams in layout.items():
        ref_stream = "lr_rgb"
        for s, per_class in streams.items():
            for c in set(streams[ref_stream]) ^ set(per_class):
                has, lacks = (s, ref_stream) if c in per_class else (ref_stream, s)
                raise SourceLayoutError(
                    f"{os.path.join(root, split, f'{phase}_{STREAMS[has]}', c)}: class '{c}' has no folder "
                    f"in {phase}_{STREAMS[lacks]}"
                )
        videos = []
        for c in sorted(streams[ref_stream]):
            names = sorted(set().union(*(streams[s][c] for s in STREAMS)))
            for name in names:
                paths = tuple(os.path.join(root, split, f"{phase}_{STREAMS[s]}", c, name + ".npy") for s in STREAMS)
                videos.append(SourceVideo(split, phase, c, name, paths, tuple(map(_size, paths))))
        if not videos:
            raise SourceLayoutError(f"{os.path.join(root, split)}: phase {phase} is empty (no .npy files)")
        phases[(split, phase)] = videos
    return SourceTree(root=root, classes=classes, phases=phases)


def _size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _npy_names(folder):
    return {e.name[:-4] for e in os.scandir(folder) if e.name.endswith(".npy") and not e.name.startswith(".")}


def _check_shape(v: SourceVideo, path: str, shape, dtype) -> None:
    if len(shape) != 2:
        raise BadVideoError(v.class_name, v.video, path, f"expected a 2-D [units, dim] array, found shape {tuple(shape)}")
    if dtype.kind != "f":
        raise BadVideoError(v.class_name, v.video, path, f"expected a float array, found dtype {dtype}")
    if shape[0] == 0 or shape[1] == 0:
        raise BadVideoError(v.class_name, v.video, path, f"empty array of shape {tuple(shape)}")


def _check_aligned(v: SourceVideo, shapes: list) -> tuple:
    t0, d0 = shapes[0]
    for path, (t, d) in zip(v.paths[1:], shapes[1:]):
        if t != t0:
            raise BadVideoError(v.class_name, v.video, path, f"has {t} units but {v.paths[0]} has {t0}")
        if d != d0:
            raise BadVideoError(v.class_name, v.video, path, f"has dim {d} but {v.paths[0]} has dim {d0}")
    return t0, d0


def scan_video(v: SourceVideo) -> tuple:
    """Cheap check of the four headers and file sizes: (units, dim), or BadVideoError."""
    shapes = []
    for path in v.paths:
        try:
            (shape, _, dtype, offset, nbytes), size = read_npy_layout(path)
        except FileNotFoundError:
            raise BadVideoError(v.class_name, v.video, path, "missing (the other streams have this video)") from None
        except NpyFormatError as e:
            raise BadVideoError(v.class_name, v.video, path, str(e)) from None
        _check_shape(v, path, shape, dtype)
        if size < offset + nbytes:
            raise BadVideoError(v.class_name, v.video, path, f"truncated: {size} bytes, header promises {offset + nbytes}")
        shapes.append(shape)
    return _check_aligned(v, shapes)


def _open_files(v: SourceVideo) -> list:
    """Open a video's four files (None for a missing one)."""
    fds = []
    for path in v.paths:
        try:
            fds.append(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError:
            fds.append(None)
    return fds


def _read_files(fds: list) -> list:
    """The whole content of each open file, which is then closed (None stays None)."""
    raws = []
    try:
        for fd in fds:
            if fd is None:
                raws.append(None)
                continue
            size = os.fstat(fd).st_size
            raw = os.read(fd, size)  # one read for a regular file (bytes, not zero-filled first)
            while len(raw) < size:  # a short read: read on, to the end
                more = os.read(fd, size - len(raw))
                if not more:
                    break  # shrank since fstat: the decoder reports the truncation
                raw += more
            raws.append(raw)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    return raws


def read_video_files(v: SourceVideo) -> list:
    """The raw bytes of a video's four files (None for a missing one): the I/O half of load_video."""
    return _read_files(_open_files(v))


def load_video(v: SourceVideo, dtype: str, raws=None, check_values: bool = True) -> dict:
    """Read (unless `raws` are given) and validate the four arrays of a video, cast to the storage dtype.

    check_values=False skips the finiteness scans, for a caller whose video is fully checked elsewhere."""
    raws = read_video_files(v) if raws is None else raws
    arrays, shapes = {}, []
    for stream, path, raw in zip(STREAMS, v.paths, raws):
        if raw is None:
            raise BadVideoError(v.class_name, v.video, path, "missing (the other streams have this video)")
        try:
            arr = npy_from_bytes(raw)
        except NpyFormatError as e:
            raise BadVideoError(v.class_name, v.video, path, str(e)) from None
        _check_shape(v, path, arr.shape, arr.dtype)
        if check_values and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise BadVideoError(v.class_name, v.video, path, f"{bad} non-finite values (NaN or inf)")
        if arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)
            if check_values and not np.isfinite(arr).all():
                raise BadVideoError(v.class_name, v.video, path, f"values overflow {dtype} (largest magnitude beyond its range)")
        arrays[stream] = arr
        shapes.append(arr.shape)
    _check_aligned(v, shapes)
    return arrays


def _will_need(fds: list) -> list:
    """Ask the kernel to start reading these open files into the page cache (no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        for fd in fds:
            if fd is not None:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    return fds


def read_ahead(videos, window: int = 8):
    """Yield (video, raw bytes) in order while the kernel reads the next `window` videos' files: cold
    files are latency-bound, and the CPU work of one video overlaps the reads of the next ones.
    (Reader threads did the same for cold files but doubled the CPU time of warm ones.) The files
    are opened once, when their read-ahead is asked for, and closed when read."""
    pending = [_will_need(_open_files(v)) for v in videos[:window]]
    try:
        for i, v in enumerate(videos):
            if i + window < len(videos):
                pending.append(_will_need(_open_files(videos[i + window])))
            fds, pending[i] = pending[i], None
            yield v, _read_files(fds)
    finally:  # an abandoned generator (a failed task) closes what it opened
        for fds in pending:
            for fd in fds or ():
                if fd is not None:
                    os.close(fd)
