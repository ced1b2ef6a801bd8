"""Where extract-features takes each video's clips from: the videos themselves (decoded, resized, their
flow computed: ingest.videos.frames), or a clip set that build-clips stored from them (`--clips`).

From a clip set nothing is decoded from the videos and no flow is computed again: each video's units
are read from its shards, the LR frames upsampled and every stream center-cropped as prepare_video
does. From a set stored raw (`build-clips --storage raw`) the clips, and so the features, equal those
made from the videos bit for bit; from JPEG frames they differ by JPEG's error (the frames the
fine-tuned network saw in training). A remote set (any fsspec URL, `--clips s3://...`) is read
through a machine's ShardCache (`--cache-dir`): every shard downloaded once, checked against its
sha256, shared by the run's preparing workers and by every job on the machine.
"""

import functools
import os
import sys
from dataclasses import dataclass

import numpy as np

from ingest.videos.frames import CLIP_FRAMES, PreparedVideo, clip_stacks, upsample_lr
from ingest.videos.splits import VideoJob, VideoPlan, checked_plan

CLIP_SET_OPTIONS = ("split", "validation", "lr_size", "flow", "flow_bound")  # what a clip set fixes


@dataclass(frozen=True)
class ClipJob(VideoJob):
    """A video of a clip set: `path` is the set's folder or URL, `index` its row in the phase's sample
    table, `cache` the ShardCache a remote set is read through (a worker opens the set with it)."""
    split: str = "Split1"
    index: int = 0
    units: int = 1
    frames: int = CLIP_FRAMES  # as decoded when the clips were built (what job balancing weighs)
    cache: object = None


def open_clip_set(root: str, cache=None):
    """The clip set at `root`, opened once per process and manifest (a dask worker prepares many of its
    videos, and outlives a run when the cluster is not the run's: a local set rebuilt there is opened
    again; a remote one's changed shard fails its sha256 in the cache)."""
    from shards.remote import is_url

    if is_url(root):
        return _opened(root.rstrip("/"), 0, 0, cache)
    try:
        st = os.stat(os.path.join(root, "manifest.json"))
    except OSError:
        return _opened(root, 0, 0, None)  # ClipSet says what is missing
    return _opened(os.path.abspath(root), st.st_ino, st.st_mtime_ns, None)


@functools.lru_cache(maxsize=8)
def _opened(root: str, inode: int, mtime_ns: int, cache):
    from shards.clips import ClipSet

    return ClipSet(root, cache)


def clip_set_options(clips: str, cache=None) -> dict:
    """The options a clip set was built with, as ExtractConfig names them, and its crop side. A remote
    set's cache must hold every shard of its split (one CacheError, before any work)."""
    opened = open_clip_set(clips, cache)
    options = opened.manifest["options"]
    split = f"Split{options['split']}"
    phases = opened.phases(split)
    opened.check_cache_room(split, phases, reader="extract-features reads every video of the split, in class order, "
                            "from shards in any order")
    found = {option: options[option] for option in CLIP_SET_OPTIONS}
    return {**found, "lr_size": tuple(found["lr_size"]), "side": options["side"]}


def plan_source(videos: str | None, splits: str | None, cfg) -> VideoPlan:
    """The videos of the split, in plan order (class, then video): from the split files and the video
    folder, or from the clip set's sample tables; either way its warnings are printed (videos
    build-clips skipped among them)."""
    if not cfg.clips:
        return checked_plan(videos, splits, cfg.split, cfg.validation, cfg.on_error)
    clips, split = open_clip_set(cfg.clips, cfg.clip_cache), f"Split{cfg.split}"
    jobs, warnings = [], []
    for phase in clips.phases(split):
        for index, row in enumerate(clips.videos(split, phase)):
            jobs.append(ClipJob(row["class"], row["video"], clips.root, phase, split, index, row["units"],
                                row.get("frames", row["units"] * CLIP_FRAMES), clips.cache))
        warnings += [f"{s['path']}: skipped by build-clips ({s['reason']})"  # (a video, or a split-file problem)
                     for s in clips.manifest["splits"][split][phase]["skipped"]]
    source = clips.manifest["source"]
    warnings = source.get("warnings", []) + warnings
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return VideoPlan(sorted(jobs, key=lambda j: (j.class_name, j.video)), [], source.get("unused", []), warnings)


def clip_set_digest(clips: str, cache=None) -> str:
    """The clip set's identity (its manifest's digest): features.json records it, --resume compares it."""
    from shards.manifest import manifest_digest

    return manifest_digest(open_clip_set(clips, cache).manifest)


def source_inputs(videos: str | None, splits: str | None, cfg) -> dict:
    """features.json's "inputs": the video and split folders, or the clip set (and its manifest's digest)."""
    if not cfg.clips:
        return {"videos": os.path.abspath(videos), "splits": os.path.abspath(splits)}
    return {"clips": open_clip_set(cfg.clips, cfg.clip_cache).root,
            "clips_digest": clip_set_digest(cfg.clips, cfg.clip_cache)}


def prepare_from_clips(job: ClipJob, side: int) -> PreparedVideo:
    """One video's four center-cropped clip stacks, read from its clip set: its units' frames end to
    end, the tiny LR ones upsampled, then cropped and cut as prepare_video does (clip_stacks)."""
    from shards.clips import STREAMS

    clips = open_clip_set(job.path, job.cache)
    samples = [clips.read(job.split, job.phase, unit) for unit in clips.video_units(job.split, job.phase, job.index)]
    streams = {s: np.concatenate([sample[s] for sample in samples]) for s in STREAMS}
    size = tuple(clips.clips["size"])
    streams["lr_rgb"] = np.stack([upsample_lr(frame, size) for frame in streams["lr_rgb"]])
    return PreparedVideo(job.class_name, job.video, clip_stacks(streams, job.units, side),
                         {"frames": job.frames, "units": job.units}, job)
