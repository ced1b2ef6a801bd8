"""build-clips: HMDB51-style videos + split files -> a clip set, every 16-frame unit as a tar sample.

Each unit of each video becomes one sample of four streams (shards.clips): HR RGB and both flow
images at the frame size C3D crops from (128x171 for 112 crops), LR RGB at its low resolution. The
videos of a phase are shuffled (seeded) and cut into shards of about --shard-size by their header
frame counts; a shard is one dask task that decodes, resizes and computes the flow of its videos
and writes the tar under a temporary name. The set grows in `<out>.building/` with a journal of
finished shards in `_build/` (recorded as each finishes: --resume keeps those whose hash checks
out) and is renamed to `<out>` once manifest.json is written, as build-shards does.
"""

import math
import os
import random
from dataclasses import asdict, dataclass, field

from shards import __version__
from shards.build import BuildJournal, Job, balanced_cut, staged_build
from shards.clips import STORAGE, STREAMS, encode_frames, member_name, stream_storage, unit_key
from shards.errors import BadVideoError, SourceLayoutError
from shards.manifest import FORMAT_NAME, FORMAT_VERSION
from shards.parallel import run_tasks
from shards.source import video_key
from shards.tarwrite import TarShardWriter
from shards.tasks import skip_record

from ingest.c3d.network import CLIP_FRAMES, INPUT_SIDE
from ingest.videos.flow import METHODS, check_method
from ingest.videos.frames import FrameOptions, video_streams
from ingest.videos.splits import checked_plan

# bytes a frame of all four streams takes at 128x171 (bench/clips.py: 188 KB a JPEG unit), for
# cutting phases into shards before anything is encoded
FRAME_BYTES = {"jpeg": 12_000, "png": 45_000, "raw": 3 * 128 * 171 * 3 + 12 * 16 * 3}


@dataclass
class ClipsConfig:
    out: str = ""  # the clip set's folder
    split: int = 1  # HMDB51 split K
    validation: str = "label0"  # label-0 videos -> Validation ("label0") or left out ("none")
    lr_size: tuple = (12, 16)  # (H, W) of the extremely low resolution copy
    side: int = INPUT_SIDE  # the crop C3D will take: frames are stored at side*128/112 x side*171/112
    flow: str = "dis"  # dis | farneback | tvl1 | raft
    flow_bound: float = 20.0
    raft_weights: str | None = None
    storage: str = "jpeg"  # jpeg | png | raw (shards/clips.py; bench/clips.py measures them)
    quality: int = 90  # JPEG quality
    shard_bytes: int = 128 << 20  # about this many bytes a tar shard
    min_shards: int = 8  # at least this many shards a phase (as many as it has videos): one task each
    seed: int = 0  # shuffles videos across shards
    on_error: str = "fail"  # a bad video stops the build, or is skipped and listed in the manifest
    workers: int = 0  # local dask worker processes (0: one per core)
    scheduler: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = field(default=True, repr=False)

    def __post_init__(self):
        self.lr_size = tuple(self.lr_size)
        if not self.out:
            raise ValueError("--out: give the clip set's folder")
        if self.split not in (1, 2, 3):
            raise ValueError(f"--split must be 1, 2 or 3 (HMDB51's three splits), got {self.split}")
        if len(self.lr_size) != 2 or min(self.lr_size) < 1:
            raise ValueError(f"--lr-size must be HxW with both sides >= 1, got {self.lr_size}")
        if self.flow not in METHODS:
            raise ValueError(f"--flow must be one of {', '.join(METHODS)}, got {self.flow!r}")
        if self.storage not in STORAGE:
            raise ValueError(f"--storage must be one of {', '.join(STORAGE)}, got {self.storage!r}")
        if not 16 <= self.side <= INPUT_SIDE:
            raise ValueError(f"--crop-size must be 16..{INPUT_SIDE}, got {self.side}")
        if not 1 <= self.quality <= 100 or self.flow_bound <= 0 or self.on_error not in ("fail", "skip"):
            raise ValueError("--quality 1..100, --flow-bound > 0 and --on-error fail|skip are required")
        if self.shard_bytes <= 0 or self.min_shards < 1 or self.workers < 0:
            raise ValueError("--shard-size must be > 0, --min-shards >= 1 and --workers >= 0")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    @property
    def frame_options(self) -> FrameOptions:
        return FrameOptions(lr_size=self.lr_size, side=self.side, flow=self.flow, flow_bound=self.flow_bound)

    def recorded(self) -> dict:
        """The options that shape the output (in the plan and the manifest; compared on --resume)."""
        keep = ("split", "validation", "lr_size", "side", "flow", "flow_bound", "storage", "quality",
                "shard_bytes", "min_shards", "seed", "on_error")
        options = {k: v for k, v in asdict(self).items() if k in keep}
        return {**options, "lr_size": list(self.lr_size), "formats": ["webdataset"]}


def build_clips(videos: str, splits: str, cfg: ClipsConfig, client=None) -> dict:
    """Write the clip set to cfg.out; returns its manifest (sample tables included)."""

    def prepare():
        plan = checked_plan(videos, splits, cfg.split, cfg.validation, cfg.on_error, record="manifest.json")
        check_method(cfg.flow, cfg.raft_weights)
        return plan

    def write(workers, staging, plan):
        layout = shard_plan(plan, cfg)
        return write_shards(workers.client, BuildJournal(staging, layout), layout, plan, videos, splits, cfg)

    return staged_build(os.path.abspath(cfg.out), "build-clips", cfg, client, prepare, write)


def shard_plan(plan, cfg: ClipsConfig) -> dict:
    """{"options", "videos", "phases": {"Split1/Train": {"shards": [{"name", "videos": [[id, key, label]]}]}}}:
    each phase's videos shuffled and cut into shards of about cfg.shard_bytes by header frame counts."""
    from ingest.c3d.jobs import header_frame_counts

    frames = dict(zip((job.id for job in plan.jobs), header_frame_counts(plan.jobs)))
    known = sorted(f for f in frames.values() if f > 0)
    typical = known[len(known) // 2] if known else CLIP_FRAMES
    h, w = cfg.frame_options.resized
    per_frame = FRAME_BYTES[cfg.storage] * h * w / (128 * 171)
    classes = sorted({job.class_name for job in plan.jobs})
    split = f"Split{cfg.split}"
    phases = {}
    for phase in ("Train", "Validation", "Test"):
        order = [job for job in plan.jobs if job.phase == phase]
        if not order:
            continue
        random.Random(f"{cfg.seed}:{split}:{phase}").shuffle(order)
        sizes = [max(frames[job.id] or typical, CLIP_FRAMES) * per_frame + 4096 for job in order]
        n = min(max(math.ceil(sum(sizes) / cfg.shard_bytes), cfg.min_shards), len(order))
        bounds = balanced_cut(sizes, n)
        phases[f"{split}/{phase}"] = {"shards": [
            {"name": f"{split}/{phase}/{phase}-{i:06d}.tar",
             "videos": [[job.id, video_key(split, phase, job.class_name, job.video), classes.index(job.class_name)]
                        for job in order[a:b]]}
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]}
    sources = [[job.id, job.phase, os.path.getsize(job.path)] for job in plan.jobs]
    return {"options": cfg.recorded(), "classes": classes, "videos": sources, "phases": phases}


def write_shards(client, journal, layout, plan, videos: str, splits: str, cfg: ClipsConfig) -> dict:
    """Run every unfinished shard's task (journaled as each finishes); the manifest of the whole set."""
    jobs_by_id = {job.id: job for job in plan.jobs}
    todo = []
    for phase_name, phase in layout["phases"].items():
        os.makedirs(os.path.join(journal.staging, phase_name), exist_ok=True)  # here, never in a task
        for shard in phase["shards"]:
            if journal.done(shard["name"]) is None:
                jobs = [jobs_by_id[video_id] for video_id, _, _ in shard["videos"]]
                todo.append(Job(shard["name"], len(jobs), (clip_shard_task, journal.staging, shard, jobs, cfg)))
    run_tasks(client, [job.call for job in todo], "build clips", sum(job.videos for job in todo), cfg.progress,
              count=lambda r: r["count"], nbytes=lambda r: r["nbytes"],
              each=lambda i, record: journal.record(todo[i].name, record))

    h, w = cfg.frame_options.resized
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": __version__, "content": "clips",
        "options": cfg.recorded(), "classes": layout["classes"], "streams": list(STREAMS),
        "clips": {"frames": CLIP_FRAMES, "size": [h, w], "lr_size": list(cfg.lr_size), "storage": cfg.storage,
                  "quality": cfg.quality if cfg.storage == "jpeg" else None, "channels": "rgb",
                  "flow_channels": "x, y, magnitude (128: no motion)", "flow": cfg.flow, "flow_bound": cfg.flow_bound},
        "source": {"videos": os.path.abspath(videos), "splits": os.path.abspath(splits),
                   "files": len(layout["videos"]), "unused": plan.unused, "warnings": plan.warnings},
        "splits": {},
    }
    problems = [{"class": "", "video": os.path.basename(path), "path": path, "reason": message}
                for path, message in plan.problems]
    for phase_name, phase in layout["phases"].items():
        split, phase_id = phase_name.split("/")
        records = [journal.done(shard["name"]) for shard in phase["shards"]]
        samples = [s for r in records for s in r["samples"]]
        if not samples:
            raise SourceLayoutError(f"{videos}: phase {phase_id} of {split} has no usable videos (all skipped)")
        manifest["splits"].setdefault(split, {})[phase_id] = {
            "samples": samples,
            "skipped": sorted([s for r in records for s in r["skipped"]], key=lambda r: (r["class"], r["video"])),
            "webdataset": {"shards": [{**f, "samples": len(r["samples"]), "units": r["units"]}
                                      for r in records for f in r["files"]]},
        }
    if problems:  # split-file problems skipped with --on-error skip: listed once, with the first phase
        first = next(iter(next(iter(manifest["splits"].values())).values()))
        first["skipped"] = problems + first["skipped"]
    return manifest


def clip_shard_task(staging: str, shard: dict, jobs: list, cfg: ClipsConfig) -> dict:
    """Dask task: prepare one shard's videos and write its tar (a temporary name until whole); returns
    its journal record. A bad video stops the build or, with on_error "skip", is listed and left out."""
    import cv2

    cv2.setNumThreads(1)  # one shard per worker process
    raft = None
    if cfg.flow == "raft":
        from ingest.c3d.tasks import cached_raft

        raft = cached_raft(cfg.raft_weights, "cpu")
    split, phase, name = shard["name"].split("/")
    samples, skipped, nbytes, units_total = [], [], 0, 0
    with TarShardWriter(os.path.join(staging, shard["name"])) as writer:
        for (video_id, key, label), job in zip(shard["videos"], jobs):
            try:
                info, streams = video_streams(job.path, job.class_name, job.video, cfg.frame_options, raft,
                                              lr_up=False)  # LR RGB is stored tiny
            except BadVideoError as e:
                if cfg.on_error == "fail":
                    raise
                skipped.append(skip_record(e))
                continue
            units = info["units"]
            for u in range(units):
                frames = slice(u * CLIP_FRAMES, (u + 1) * CLIP_FRAMES)
                members = {member_name(cfg.storage, s): [encode_frames(streams[s][frames], stream_storage(cfg.storage, s),
                                                                       cfg.quality)] for s in STREAMS}
                meta = {"label": label, "class": job.class_name, "video": job.video, "split": split,
                        "phase": phase, "unit": u, "units": units}
                nbytes += writer.write_members(unit_key(key, u), members, meta)[1]
            units_total += units
            samples.append({"key": key, "label": label, "units": units, "class": job.class_name,
                            "video": job.video, "shard": name, "frames": info["frames"]})
    info = writer.close()
    files = [{"path": shard["name"], "bytes": info["bytes"], "sha256": info["sha256"]}]
    return {"samples": samples, "skipped": skipped, "units": units_total, "nbytes": nbytes,
            "count": len(jobs), "files": files}

