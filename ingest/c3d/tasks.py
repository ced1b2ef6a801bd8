"""The work extract-features sends to dask workers: preparing videos (decode, resize, flow) for C3D in
the calling process, or, on workers with a GPU resource, preparing a chunk of videos and running C3D
there too, batched across the chunk, so a cluster of GPU machines needs one command.
"""

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from shards.errors import BadVideoError
from shards.parallel import drain_workers

from ingest.videos.frames import prepare_video

from .sources import ClipJob, prepare_from_clips


def prepare_task(job, frame_options, raft_weights=None, device="cpu", shares_cores=False):
    """Dask task: one video's clips, or the BadVideoError that says why not (a value: the caller skips
    the video or stops).
    shares_cores: the worker was started by this run, beside its C3D process."""
    import cv2

    cv2.setNumThreads(1)  # one video per worker process; the C3D process needs the cores too
    if shares_cores:
        _lower_priority()
    if isinstance(job, ClipJob):  # read from a clip set (extract-features --clips)
        return prepare_from_clips(job, frame_options.side)
    raft = None
    if frame_options.flow == "raft":
        raft = cached_raft(raft_weights, device)
    try:
        prepared = prepare_video(job.path, job.class_name, job.video, frame_options, raft)
    except BadVideoError as e:
        return e
    prepared.job = job
    return prepared


_RAFT = {}


def _lower_priority():
    """Preparing runs ahead of C3D by a window of videos: on cores shared with C3D's threads it should
    fill their gaps, not preempt them (one late thread stalls a whole parallel convolution). SCHED_IDLE
    runs it only on otherwise idle cores (Linux); elsewhere, nice 10."""
    if getattr(_lower_priority, "done", False):
        return
    _lower_priority.done = True
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(10)
        except OSError:
            pass


def cached_raft(path, device):
    if (path, device) not in _RAFT:
        from ingest.videos.flow import load_raft

        _RAFT[(path, device)] = load_raft(path).to(device)
    return _RAFT[(path, device)]


def ordered_results(client, tasks, window: int, resources: dict | None = None):
    """Yield (item, result) in the order of `tasks` [(item, fn, args...)], with up to `window` tasks
    submitted ahead (to workers that have `resources`)."""
    futures = deque()
    todo = iter(tasks)

    def submit():
        task = next(todo, None)
        if task is not None:
            item, fn, *args = task
            futures.append((item, client.submit(fn, *args, pure=False, resources=resources)))

    for _ in range(window):
        submit()
    try:
        while futures:
            item, future = futures.popleft()
            result = future.result()
            submit()
            yield item, result
    except BaseException:  # an error here, or the caller stopping early (GeneratorExit from close())
        if futures:
            client.cancel([f for _, f in futures])
            drain_workers(client)
        raise


# ---- C3D on the workers ----------------------------------------------------------------------------

CHUNK_BATCHES = 8  # a chunk fills this many batches of each network: its zero-padded last batch wastes < 1/8


def chunks(jobs: list, frames: list, batch_size: int) -> list:
    """Consecutive videos grouped so each group holds about CHUNK_BATCHES batches of clips per network
    (two streams per network, a unit per 16 frames of the header's count)."""
    target = CHUNK_BATCHES * batch_size / 2
    groups, units = [[]], 0
    for job, n in zip(jobs, frames):
        groups[-1].append(job)
        units += max(1, n // 16)
        if units >= target:
            groups.append([])
            units = 0
    return [g for g in groups if g]


def worker_device(requested: str, pick_by_name: bool):
    """The device C3D runs on here: --device as resolve_device reads it, on the first visible GPU
    (dask-cuda and per-GPU `dask-worker` processes see their own first), or, for the workers of a plain
    LocalCluster this run started (pick_by_name), on GPU <worker name> modulo the count."""
    import torch

    from elr.model import resolve_device

    index = 0
    if pick_by_name and torch.cuda.is_available():
        from dask.distributed import get_worker

        name = get_worker().name
        index = int(name) % torch.cuda.device_count() if str(name).isdigit() else 0
    return resolve_device(requested, index)


def resolve_here(device: str, dtype: str, batch_size: int, pick_by_name: bool = False) -> dict:
    """What C3D runs as here (a worker, or the calling process): device type, dtype and batch size."""
    place = worker_device(device, pick_by_name)
    dtype = dtype if dtype != "auto" else ("bfloat16" if place.type == "cuda" else "float32")
    if dtype == "bfloat16" and place.type != "cuda":
        raise ValueError("--dtype bfloat16 runs on a GPU only (--device cuda)")
    return {"device": place.type, "dtype": dtype, "batch_size": batch_size or (64 if place.type == "cuda" else 8)}


_BATCHERS = {}  # (weights key, device, dtype, batch size) -> FeatureBatcher, kept by the worker process


def c3d_chunk(jobs, networks, key: str, frame_options, raft_weights, device: str, resolved: dict, pick_by_name: bool):
    """Task on a GPU worker: prepare `jobs` (a thread per core, ahead of C3D) and run C3D over all their
    clips. Returns [(job, (info, {stream: features}) or BadVideoError)] in job order."""
    import cv2
    import torch

    from .batching import FeatureBatcher

    place = worker_device(device, pick_by_name)
    cache = (key, str(place), resolved["dtype"], resolved["batch_size"])
    if cache not in _BATCHERS:
        if place.type == "cuda":
            torch.cuda.set_device(place)
        _BATCHERS.clear()  # one set of weights on the device at a time
        _BATCHERS[cache] = FeatureBatcher(networks, place, resolved["batch_size"], resolved["dtype"])
    batcher = _BATCHERS[cache]
    cv2.setNumThreads(1)
    threads = max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))
    results = {}
    with ThreadPoolExecutor(threads) as pool:
        prepared = pool.map(lambda job: prepare_task(job, frame_options, raft_weights, str(place)), jobs)
        for job, video in zip(jobs, prepared):
            if isinstance(video, BadVideoError):
                results[job.id] = video
                continue
            batcher.add(video)
            results.update((v.job.id, (v.info, features)) for v, features in batcher.done())
        batcher.flush()
        results.update((v.job.id, (v.info, features)) for v, features in batcher.done())
    return [(job, results[job.id]) for job in jobs]


def chunk_tasks(groups, networks, key, cfg, pick_by_name):
    """ordered_results tasks (with resources={GPU: 1}) that run c3d_chunk."""
    return ((group, c3d_chunk, group, networks, key, cfg.frame_options, cfg.raft_weights, cfg.device, cfg.resolved,
             pick_by_name) for group in groups)
