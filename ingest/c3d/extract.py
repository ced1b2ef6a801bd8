"""extract-features: HMDB51-style videos + split files -> the seed's C3D feature tree, with features.json.

Videos are independent dask tasks (decode, resize, downsample, flow: CPU work); their clips stream back
in order to this process, where C3D runs batched across videos on the chosen device. Each finished
video's four .npy files are renamed into place and journaled, so --resume continues where a killed run
stopped; features.json, written last, describes the whole tree.
"""

import json
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import numpy as np

from shards.atomic import atomic_write, remove_dead_temps, remove_quietly, write_json_atomic
from shards.errors import BadVideoError
from shards.lock import FileLock, hold_output, lock_path
from shards.manifest import file_sha256
from shards.parallel import GPU, gpu_worker_count, start_workers
from shards.progress import Progress

from ingest.videos.flow import METHODS, check_method
from ingest.videos.frames import FrameOptions
from ingest.videos.splits import PHASE_OF_LABEL

from .network import CHANNELS, INPUT_SIDE, POOL5, WeightsError, load_c3d, random_c3d, weights_conventions
from .jobs import balanced_share, finish_jobs, header_frame_counts
from .sources import clip_set_digest, clip_set_options, open_clip_set, plan_source, source_inputs
from .tasks import chunk_tasks, chunks, ordered_results, prepare_task, resolve_here
from .tree import (FEATURES_JSON, Journal, check_output, job_journals, make_folders, output_paths,
                   read_features_json)

RANDOM_NOTE = "random C3D weights (--random-c3d): for tests and demos only, not features to report results on"


@dataclass
class ExtractConfig:
    split: int = 1  # HMDB51 split K: reads <class>_test_split<K>.txt, writes Split<K>/
    validation: str = "label0"  # label-0 videos -> Validation ("label0") or left out ("none")
    lr_size: tuple = (12, 16)  # (H, W) of the extremely low resolution copy
    side: int | None = None  # C3D input side (None: a fine-tuned --c3d-weights' own, else 112, what the published weights need)
    flow: str = "dis"  # dis | farneback | tvl1 | raft
    flow_bound: float = 20.0  # pixels mapped to the ends of the flow image's 0..255
    raft_weights: str | None = None  # torchvision RAFT state_dict, for flow "raft"
    c3d_weights: str | None = None  # Sports-1M C3D state_dict (c3d-pytorch's c3d.pickle)
    c3d_flow_weights: str | None = None  # C3D for the flow streams (default: c3d_weights)
    random_c3d: int | None = None  # seed of random C3D weights (tests and demos), instead of c3d_weights
    pool5: str | None = None  # pool5 windows: caffe (as the Sports-1M weights were trained) | port (c3d-pytorch); None: a fine-tuned --c3d-weights' own, else caffe
    device: str = "auto"  # where C3D (and RAFT) run: auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # C3D compute dtype: auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16
    batch_size: int = 0  # clips per C3D batch (0: 64 on a GPU, 8 on the CPU); part of the options
    on_error: str = "fail"  # a bad video stops the run, or is skipped and listed in features.json
    workers: int = 0  # local dask worker processes for decoding and flow (0: one per core)
    scheduler: str | None = None  # a dask.distributed scheduler address instead of local workers
    c3d_workers: int = 0  # local workers with a GPU resource each, running C3D themselves (one per GPU)
    clips: str | None = None  # a clip set (build-clips) to read the clips from instead of the videos (sources.py)
    cache_dir: str | None = None  # a remote clip set's shards are downloaded once into this folder (shards.cache)
    cache_limit: str | None = None
    num_jobs: int = 1  # independent jobs sharing the split (jobs.py); each runs with its job_index
    job_index: int = 0
    finish: bool = False  # check the num_jobs jobs' journals and write features.json
    resume: bool = False  # continue an interrupted run of the same options
    overwrite: bool = False  # replace this split's tree in `out`
    progress: bool = True
    # resolved at the start (not user options)
    resolved: dict = field(default_factory=dict, repr=False)
    clip_cache: object = field(default=None, init=False, repr=False)  # the ShardCache of a remote --clips

    def __post_init__(self):
        if self.clips:
            self.adopt_clip_set()
        if self.split not in (1, 2, 3):
            raise ValueError(f"--split must be 1, 2 or 3 (HMDB51's three splits), got {self.split}")
        if self.validation not in ("label0", "none"):
            raise ValueError(f"--validation must be label0 or none, got {self.validation!r}")
        if len(self.lr_size) != 2 or min(self.lr_size) < 1:
            raise ValueError(f"--lr-size must be HxW with both sides >= 1, got {self.lr_size}")
        if self.flow not in METHODS:
            raise ValueError(f"--flow must be one of {', '.join(METHODS)}, got {self.flow!r}")
        if (self.c3d_weights is None) == (self.random_c3d is None):
            raise ValueError("give --c3d-weights FILE (the Sports-1M C3D, c3d.pickle) or, for tests and demos only, "
                             "--random-c3d SEED" if self.c3d_weights is None else
                             "--c3d-weights and --random-c3d exclude each other")
        if self.c3d_flow_weights and self.random_c3d is not None:
            raise ValueError("--c3d-flow-weights needs --c3d-weights (not --random-c3d)")
        self.adopt_weights_conventions()
        if self.pool5 not in POOL5:
            raise ValueError(f"--pool5 must be one of {', '.join(POOL5)}, got {self.pool5!r}")
        if not 16 <= self.side <= INPUT_SIDE:
            raise ValueError(f"--crop-size must be 16..{INPUT_SIDE}, got {self.side}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.batch_size < 0 or self.on_error not in ("fail", "skip") or self.flow_bound <= 0:
            raise ValueError("--batch-size >= 0, --on-error fail|skip and --flow-bound > 0 are required")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.c3d_workers < 0 or (self.c3d_workers and self.scheduler):
            raise ValueError("--c3d-workers N (>= 0) starts local GPU workers; a --scheduler's workers run C3D "
                             "themselves when they declare a GPU resource (dask-worker --resources GPU=1)")
        if not 0 <= self.job_index < self.num_jobs:
            raise ValueError(f"--job-index {self.job_index} is out of range for --num-jobs {self.num_jobs} "
                             f"(0..{self.num_jobs - 1})")
        if self.finish and (self.num_jobs < 2 or self.resume or self.overwrite):
            raise ValueError("--finish checks the journals of --num-jobs N > 1 jobs; without --resume or --overwrite")

    def adopt_clip_set(self) -> None:
        """--clips: the split, validation, LR size and flow the clip set was built with, and its crop side
        (a fine-tuned --c3d-weights must have been trained at it)."""
        from shards.cache import ShardCache

        self.clip_cache = ShardCache.from_options(self.cache_dir, self.cache_limit)
        found = clip_set_options(self.clips, self.clip_cache)
        side = found.pop("side")
        if self.side is not None and self.side != side:
            raise ValueError(f"--crop-size {self.side}: the clip set {self.clips} holds frames for --crop-size {side}")
        for path in dict.fromkeys(p for p in (self.c3d_weights, self.c3d_flow_weights) if p and self.random_c3d is None):
            trained = weights_conventions(path)
            if trained is not None and trained["crop_size"] != side:
                raise ValueError(f"--clips {self.clips} holds frames for --crop-size {side}; {path} was fine-tuned with "
                                 f"--crop-size {trained['crop_size']} (build the clips with --crop-size "
                                 f"{trained['crop_size']})")
        for option, value in found.items():
            setattr(self, option, value)
        self.side = side

    def adopt_weights_conventions(self) -> None:
        """--crop-size and --pool5 from C3Ds fine-tuned by elr-train-c3d (their checkpoints say how they
        ran), else 112 and caffe; a value given that differs from a checkpoint's is refused, naming it."""
        given = {"crop_size": self.side, "pool5": self.pool5}
        for path in dict.fromkeys(p for p in (self.c3d_weights, self.c3d_flow_weights) if p and self.random_c3d is None):
            found = weights_conventions(path)
            if found is None:
                continue
            for option, value in given.items():
                if value is not None and value != found[option]:
                    raise WeightsError(f"--{option.replace('_', '-')} {value}: {path} was fine-tuned with "
                                       f"--{option.replace('_', '-')} {found[option]}")
                given[option] = found[option]
        self.side = given["crop_size"] if given["crop_size"] is not None else INPUT_SIDE
        self.pool5 = given["pool5"] if given["pool5"] is not None else "caffe"

    @property
    def frame_options(self) -> FrameOptions:
        return FrameOptions(lr_size=tuple(self.lr_size), side=self.side, flow=self.flow, flow_bound=self.flow_bound)

    def record_options(self) -> dict:
        """The options that decide the output bytes: stored in features.json, compared on --resume."""
        keep = ("split", "validation", "lr_size", "side", "flow", "flow_bound", "random_c3d", "on_error", "pool5")
        options = {k: v for k, v in asdict(self).items() if k in keep}
        options["lr_size"] = list(self.lr_size)
        options["channels"] = CHANNELS  # the order frames reach C3D in (older trees: RGB, unrecorded)
        if self.clips:  # the clip set decides the frames: a --resume over another one is refused
            options["clips_digest"] = clip_set_digest(self.clips, self.clip_cache)
        return {**options, **self.resolved}


def library_versions() -> dict:
    import av
    import cv2
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "av": av.__version__, "ffmpeg_libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "opencv": cv2.__version__}


def load_networks(cfg: ExtractConfig) -> tuple:
    """({"rgb": C3D, "flow": C3D}, weights record); the flow network is the RGB one unless given."""
    if cfg.random_c3d is not None:
        net = random_c3d(cfg.random_c3d, cfg.side, cfg.pool5)
        return {"rgb": net, "flow": net}, {"random_c3d": cfg.random_c3d, "note": RANDOM_NOTE}
    rgb = load_c3d(cfg.c3d_weights, cfg.side, cfg.pool5)
    weights = {"rgb": {"file": os.path.abspath(cfg.c3d_weights), "sha256": file_sha256(cfg.c3d_weights)}}
    flow = rgb
    if cfg.c3d_flow_weights and os.path.abspath(cfg.c3d_flow_weights) != os.path.abspath(cfg.c3d_weights):
        flow = load_c3d(cfg.c3d_flow_weights, cfg.side, cfg.pool5)
        weights["flow"] = {"file": os.path.abspath(cfg.c3d_flow_weights), "sha256": file_sha256(cfg.c3d_flow_weights)}
    else:
        weights["flow"] = weights["rgb"]
    return {"rgb": rgb, "flow": flow}, weights


def extract_features(videos: str, splits: str, out: str, cfg: ExtractConfig, client=None) -> dict:
    """Write `out/Split<K>/...` and `out/features.json`; returns this split's features.json record.
    Job I of N (cfg.num_jobs > 1) writes its share and journal only and returns {"job": ...}; the
    --finish step checks them all and writes features.json (jobs.py)."""
    if cfg.finish:
        plan = plan_source(videos, splits, cfg)
        split = f"Split{cfg.split}"
        inputs = source_inputs(videos, splits, cfg)
        return finish_jobs(out, split, plan, cfg,
                           lambda header, entries, timing: write_record(inputs, out, plan, header, entries, timing))
    if cfg.num_jobs > 1:
        journal = Journal(out, f"Split{cfg.split}", (cfg.job_index, cfg.num_jobs))
        command = f"extract-features --job-index {cfg.job_index}"
        # the jobs share the folder (a --finish or a one-job run takes it alone); each holds its journal
        with FileLock(lock_path(out), command, subject=os.path.abspath(out), shared=True), \
                FileLock(journal.path + ".lock", command, subject=journal.path):
            return _extract(videos, splits, out, cfg, client)
    with hold_output(out, "extract-features"):
        remove_dead_temps(out)  # we hold the lock: whoever left them is dead
        return _extract(videos, splits, out, cfg, client)


class Waits:
    """Iterate `items` (job, result), timing what the consumer waits for each after the first:
    first_at: seconds from `t0` to the first (start-up: weights, cluster, the first video)."""

    def __init__(self, items, t0: float):
        self.items, self.t0, self.first_at, self.waited = items, t0, None, 0.0

    def __iter__(self):
        while True:
            asked = time.perf_counter()
            item = next(self.items, None)
            if self.first_at is None:
                self.first_at = time.perf_counter() - self.t0
            else:
                self.waited += time.perf_counter() - asked
            if item is None:
                return
            yield item


def c3d_here(workers, todo, networks, cfg, t0: float) -> tuple:
    """((job, (info, features) | BadVideoError) in job order, Waits): the workers prepare the videos,
    C3D runs in this process, batched across them; the Waits time how long C3D waited for a video."""
    from elr.model import resolve_device

    from .batching import FeatureBatcher

    device = resolve_device(cfg.device)
    batcher = FeatureBatcher(networks, device, cfg.resolved["batch_size"], cfg.resolved["dtype"])
    client = workers.client
    window = 2 * max(1, len(client.scheduler_info()["workers"])) + 2
    # a cluster this run started shares this machine's cores with C3D; another one is left as it is
    tasks = ((job, prepare_task, job, cfg.frame_options, cfg.raft_weights, str(device), workers.local) for job in todo)
    prepared = Waits(ordered_results(client, tasks, window), t0)

    def videos():
        try:
            for job, result in prepared:
                if isinstance(result, BadVideoError):
                    yield job, result
                    continue
                batcher.add(result)
                yield from ((v.job, (v.info, features)) for v, features in batcher.done())
        finally:
            prepared.items.close()  # cancels what is still queued while the client is up
        batcher.flush()
        yield from ((v.job, (v.info, features)) for v, features in batcher.done())

    return videos(), prepared


def c3d_on_workers(client, todo, networks, weights, cfg, t0: float) -> tuple:
    """((job, (info, features) | BadVideoError) in job order, Waits): chunks of videos that workers with
    a GPU resource prepare and run C3D on; the Waits time how long this process waited for them."""
    groups = chunks(todo, header_frame_counts(todo), cfg.resolved["batch_size"])
    [shared] = client.scatter([networks], broadcast=True)  # the weights travel once to each worker
    key = json.dumps(weights, sort_keys=True)
    window = 2 * max(1, gpu_worker_count(client)) + 1
    tasks = chunk_tasks(groups, shared, key, cfg, cfg.c3d_workers > 0)
    done = Waits(ordered_results(client, tasks, window, resources={GPU: 1}), t0)

    def videos():
        try:
            for _, results in done:
                yield from results
        finally:
            done.items.close()

    return videos(), done


def _extract(videos: str, splits: str, out: str, cfg: ExtractConfig, client) -> dict:
    t0 = time.perf_counter()
    split = f"Split{cfg.split}"
    plan = plan_source(videos, splits, cfg)
    jobs = plan.jobs
    mine = jobs if cfg.num_jobs == 1 else balanced_share(jobs, cfg.num_jobs, cfg.job_index)
    if not cfg.clips:  # (a clip set's flow was computed when it was built)
        check_method(cfg.flow, cfg.raft_weights)
    networks, weights = load_networks(cfg)
    with ExitStack() as held:
        # C3D runs here, or on the workers where they declare GPUs (or --c3d-workers started them); a
        # cluster of our own starts once the output is checked (a refused run does not wait for it)
        workers = None
        if cfg.c3d_workers or cfg.scheduler or client is not None:
            workers = held.enter_context(start_workers(cfg.workers, cfg.scheduler, client, cfg.c3d_workers))
        on_workers = cfg.c3d_workers > 0 or (workers is not None and gpu_worker_count(workers.client) > 0)
        if on_workers:
            cfg.resolved = workers.client.submit(resolve_here, cfg.device, cfg.dtype, cfg.batch_size,
                                                 cfg.c3d_workers > 0, resources={GPU: 1}, pure=False).result()
        else:
            cfg.resolved = resolve_here(cfg.device, cfg.dtype, cfg.batch_size)
        header = {**cfg.record_options(), "weights": weights}
        as_job = (cfg.job_index, cfg.num_jobs) if cfg.num_jobs > 1 else None
        journal = Journal(out, split, as_job)
        if as_job:
            header["job"] = list(as_job)
        entries = check_output(out, split, header, cfg, journal)
        if cfg.overwrite:
            start_over(out, split, cfg.num_jobs)
            remove_quietly(journal.path)
        make_folders(out, split, jobs, sorted({job.class_name for job in jobs}))
        if not entries:
            journal.start(header)
        finished = {e["id"] for e in entries}
        todo = [job for job in mine if job.id not in finished]
        if cfg.clip_cache is not None:  # a remote clip set: this job's shards into the cache, 4 at a time
            open_clip_set(cfg.clips, cfg.clip_cache).download(split, sorted({job.phase for job in todo}),
                                                              progress=cfg.progress,
                                                              videos=[(job.phase, job.index) for job in todo])
        if workers is None:
            workers = held.enter_context(start_workers(cfg.workers))

        units_done = 0
        if on_workers:
            results, waits = c3d_on_workers(workers.client, todo, networks, weights, cfg, t0)
        else:
            results, waits = c3d_here(workers, todo, networks, cfg, t0)
        with Progress(total=len(mine), initial=len(mine) - len(todo), unit="video", file=sys.stderr, leave=False,
                      desc=f"extract {split}" + (f" job {cfg.job_index}/{cfg.num_jobs}" if as_job else ""),
                      disable=not cfg.progress) as bar:
            try:
                for job, result in results:
                    if isinstance(result, BadVideoError):  # --on-error fail stops here
                        if cfg.on_error == "fail":
                            raise result
                        journal.append({"id": job.id, "phase": job.phase, "skipped": str(result)})
                    else:
                        info, features = result
                        for stream, path in output_paths(out, split, job).items():
                            with atomic_write(path) as f:
                                np.save(f, features[stream], allow_pickle=False)
                        journal.append({"id": job.id, "phase": job.phase, **info})
                        units_done += info["units"]
                    bar.update(1)
                    busy = max(time.perf_counter() - t0 - waits.first_at, 1e-9)
                    bar.set_postfix_str(f"{units_done / busy:.1f} units/s, data wait {waits.waited / busy:.0%}")
            finally:
                results.close()  # cancels the tasks still queued, while the client is up
    timing = {"seconds": round(time.perf_counter() - t0, 3), "startup_seconds": round(waits.first_at or 0, 3),
              "data_wait_seconds": round(waits.waited, 3), "videos": len(todo), "units": units_done,
              "c3d": "workers" if on_workers else "here"}
    if as_job:
        journal.append({"finished": timing})
        return {"job": cfg.job_index, "num_jobs": cfg.num_jobs, "videos": len(mine), **timing}
    _, entries = journal.read()
    record = write_record(source_inputs(videos, splits, cfg), out, plan, header, entries, timing)
    remove_quietly(journal.path)
    return record


def start_over(out: str, split: str, num_jobs: int) -> None:
    """--overwrite: forget this split's features.json record and the journals of other runs. One job of
    several keeps the tree and the other jobs' journals (they write beside it; its own files are
    replaced as it goes)."""
    if num_jobs == 1:
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)
    doc = read_features_json(out)
    if doc["splits"].pop(split, None) is not None:
        write_json_atomic(os.path.join(out, FEATURES_JSON), doc)
    stale = [Journal(out, split).path] + [p for n, paths in job_journals(out, split).items() if n != num_jobs
                                           for p in paths]
    for path in stale:
        remove_quietly(path)


def write_record(inputs: dict, out: str, plan, header: dict, entries: list, timing: dict) -> dict:
    """Write this split's record into features.json (under the output's lock); returns it. `inputs`:
    the video and split folders, or the clip set (sources.source_inputs)."""
    skipped = {e["id"]: e["skipped"] for e in entries if "skipped" in e}
    written = [j for j in plan.jobs if j.id not in skipped]
    record = {
        **{k: v for k, v in header.items() if k != "job"},
        "versions": library_versions(), "inputs": inputs,
        "classes": sorted({job.class_name for job in plan.jobs}),
        "phases": {p: n for p in PHASE_OF_LABEL.values() if (n := sum(j.phase == p for j in written))},
        "videos": {e["id"]: {k: v for k, v in e.items() if k != "id"} for e in entries if "skipped" not in e},
        "skipped": {**skipped, **{os.path.relpath(p, inputs["videos"]): f"{p}: {m}" for p, m in plan.problems}},
        "unused": plan.unused,
        "warnings": plan.warnings,
        "last_run": timing,  # this invocation (a resumed run: its part; --finish: the jobs')
    }
    if record["random_c3d"] is None:
        del record["random_c3d"]
    doc = read_features_json(out)
    doc["splits"][f"Split{header['split']}"] = record
    write_json_atomic(os.path.join(out, FEATURES_JSON), doc)
    return record
