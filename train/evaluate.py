"""Sharded evaluation: independent jobs score slices of a test phase; merge checks and reports.

A part is `part-IIIII-of-JJJJJ.npz` (keys, labels, logits and a JSON stamp naming the checkpoint's and
the manifest's digests), written under a temporary name and renamed, so a re-run replaces it whole.
"""

import functools
import glob
import json
import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
from elr.data import batches
from elr.model import load_weights, resolve_device, score_batches
from shards.atomic import atomic_write, remove_dead_temps, temp_files
from shards.errors import ELRError
from shards.lock import FileLock, hold_alone, lock_path
from shards.manifest import file_sha256
from shards.cache import ShardCache
from shards.shardset import ShardSet
from shards.memory import keep_freed_memory
from shards.schema import LR


class EvalError(ELRError):
    """A part set that cannot be merged, or a checkpoint that does not fit the shard set."""


def part_path(out: str, job: int, num_jobs: int) -> str:
    return os.path.join(out, f"part-{job:05d}-of-{num_jobs:05d}.npz")


@contextmanager
def job_locks(out: str, part: str, hold_folder: bool):
    """A job shares the folder with the other jobs (a merge takes it alone) and holds its part alone.
    hold_folder=False: the caller holds the whole folder (one job that merges, or dask's client)."""
    with ExitStack() as held:
        if hold_folder:
            held.enter_context(FileLock(lock_path(out), "elr-eval run", subject=out.rstrip(os.sep), shared=True))
        held.enter_context(FileLock(part + ".lock", "elr-eval run", subject=part))
        remove_dead_temps(out, prefix=os.path.basename(part))  # this part's: their writer is dead
        yield


@dataclass
class EvalConfig:
    """One evaluation job: which checkpoint, on which share of which phase, written where."""
    shards: str  # the shard set: a folder or any fsspec URL
    checkpoint: str  # a train/ddp.py checkpoint or a seed state_dict (.pth)
    out: str  # folder of the parts and reports
    num_jobs: int = 1  # jobs sharing the phase
    job_index: int = 0  # this job
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    amp: str = "off"  # off, bf16 or fp16
    fmt: str = "auto"  # auto (Zarr where there is a local copy), zarr or webdataset
    split: str = "Split1"
    phase: str = "Test"
    batch: int = 64  # videos per forward pass
    cache_dir: str | None = None  # a remote set's shards downloaded once into this folder (shards.cache)
    cache_limit: str | None = None

    def __post_init__(self):
        if self.num_jobs < 1:
            raise ValueError(f"--num-jobs must be >= 1, got {self.num_jobs}")
        if not 0 <= self.job_index < self.num_jobs:
            raise EvalError(f"--job-index {self.job_index} is out of range for {self.num_jobs} jobs "
                            f"(0..{self.num_jobs - 1})")
        if self.batch < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch}")

    @property
    def part(self) -> str:
        return part_path(self.out, self.job_index, self.num_jobs)


def run_job(cfg: EvalConfig, hold_folder: bool = True) -> str:
    """Score job `cfg.job_index` of `cfg.num_jobs` and write its part; returns the part's path."""
    keep_freed_memory()
    shard_set = ShardSet.open(cfg.shards, cache=ShardCache.from_options(cfg.cache_dir, cfg.cache_limit))
    if shard_set.cache is not None:  # a shard read and the next one downloading
        shard_set.cache.check_room([s.bytes for s in shard_set.phase(cfg.split, cfg.phase).tar_shards()], 2)
    dev = resolve_device(cfg.device)
    model, classes = load_weights(cfg.checkpoint)
    if classes is not None and classes != shard_set.classes:
        raise EvalError(f"{cfg.checkpoint}: its classes differ from those of {cfg.shards}")
    if model.classifier.out_features != len(shard_set.classes) or model.rnn1.input_size != shard_set.dim:
        raise EvalError(f"{cfg.checkpoint}: model has {model.classifier.out_features} classes and input dim "
                        f"{model.rnn1.input_size}; the shard set has {len(shard_set.classes)} and {shard_set.dim}")
    with job_locks(cfg.out, cfg.part, hold_folder):  # after the checks: a mistake leaves no folder behind
        keys, labels, logits = [], [], []
        samples = shard_set.phase(cfg.split, cfg.phase).samples(cfg.job_index, cfg.num_jobs, LR, cfg.fmt)
        for b, out_logits in score_batches(model.to(dev).eval(), batches(samples, LR, cfg.batch), dev, cfg.amp):
            keys += b["keys"]
            labels.append(b["labels"].numpy())
            logits.append(out_logits.float().cpu().numpy())
        stamp = {"checkpoint": os.path.abspath(cfg.checkpoint), "checkpoint_sha256": file_sha256(cfg.checkpoint),
                 "manifest_sha256": shard_set.digest, "shards": cfg.shards, "split": cfg.split,
                 "phase": cfg.phase, "job_index": cfg.job_index, "num_jobs": cfg.num_jobs,
                 "classes": shard_set.classes}
        n_classes = len(shard_set.classes)
        arrays = {"keys": np.array(keys, dtype=str),
                  "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
                  "logits": np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
                  "stamp": np.array(json.dumps(stamp, sort_keys=True))}
        with atomic_write(cfg.part) as f:
            np.savez(f, **arrays)
    return cfg.part


def read_part(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in ("keys", "labels", "logits")}
            part["stamp"] = json.loads(str(z["stamp"]))
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"{path}: unreadable part ({e})") from None
    return part


def collect_parts(folder: str, shards: str | None = None) -> tuple:
    """Read and cross-check every part: (stamp, keys, labels, logits, shard set)."""
    paths = sorted(glob.glob(os.path.join(folder, "part-*.npz")))
    if not paths:
        raise EvalError(f"{folder}: no part-*.npz files")
    parts = [(p, read_part(p)) for p in paths]
    first_path, first = parts[0]
    ref = first["stamp"]
    for p, part in parts[1:]:
        s = part["stamp"]
        for field, what in (("checkpoint_sha256", "checkpoint"), ("manifest_sha256", "shard set"),
                            ("num_jobs", "number of jobs"), ("split", "split"), ("phase", "phase")):
            if s[field] != ref[field]:
                raise EvalError(f"{p}: stale part: its {what} differs from {first_path}'s "
                                f"({s[field]!r} vs {ref[field]!r}); re-run that job or remove the part")
    by_job = {}
    for p, part in parts:
        by_job.setdefault(part["stamp"]["job_index"], []).append(p)
    twice = {j: ps for j, ps in by_job.items() if len(ps) > 1}
    if twice:
        j, ps = sorted(twice.items())[0]
        raise EvalError(f"job {j} has {len(ps)} parts: {', '.join(ps)}")
    missing = [j for j in range(ref["num_jobs"]) if j not in by_job]
    if missing:
        raise EvalError(f"missing parts for jobs {', '.join(map(str, missing))} of {ref['num_jobs']}: "
                        f"expected {part_path(folder, missing[0], ref['num_jobs'])}")
    shard_set = ShardSet.open(shards or ref["shards"], samples=True)
    if shard_set.digest != ref["manifest_sha256"]:
        raise EvalError(f"{folder}: the parts were scored on another version of the shard set {shards or ref['shards']}")
    keys = np.concatenate([part["keys"] for _, part in parts])
    labels = np.concatenate([part["labels"] for _, part in parts])
    logits = np.concatenate([part["logits"] for _, part in parts])
    expected = shard_set.phase(ref["split"], ref["phase"]).expected_labels()
    unique, counts = np.unique(keys, return_counts=True)
    dup = unique[counts > 1]
    if len(dup):
        raise EvalError(f"{len(dup)} videos counted twice, e.g. {', '.join(dup[:3])}")
    absent = sorted(set(expected) - set(unique.tolist()))
    if absent:
        raise EvalError(f"{len(absent)} videos of {ref['split']}/{ref['phase']} not scored, e.g. {', '.join(absent[:3])}")
    extra = sorted(set(unique.tolist()) - set(expected))
    if extra:
        raise EvalError(f"{len(extra)} scored videos are not in {ref['split']}/{ref['phase']}, e.g. {', '.join(extra[:3])}")
    if any(expected[k] != int(label) for k, label in zip(keys, labels)):
        raise EvalError(f"{folder}: labels in the parts disagree with the manifest")
    order = np.argsort(keys)
    return ref, keys[order], labels[order], logits[order], shard_set


def merge(folder: str, shards: str | None = None, hold_folder: bool = True) -> dict:
    """Check the parts in `folder` against the manifest and write the reports; returns the scores.
    hold_folder=False: the caller holds the folder's lock."""
    from train.report import write_reports

    with hold_eval_folder(folder, "elr-eval merge") if hold_folder else nullcontext():
        stray = temp_files(folder)
        if stray:
            raise EvalError(f"{stray[0]}: a temporary file of a job killed while writing"
                            + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                            + "; re-run that job (it removes it) or delete it")
        stamp, keys, labels, logits, shard_set = collect_parts(folder, shards)
        return write_reports(folder, stamp, keys, labels, logits, shard_set.classes)


def hold_eval_folder(folder: str, command: str):
    """The folder alone (no job writing a part); refused with the running jobs named."""
    return hold_alone(folder, command, "part-*.npz", "elr-eval run jobs are still writing parts")


def run_on_dask(client, cfg: EvalConfig) -> dict:
    """All cfg.num_jobs jobs as dask tasks, then the merge."""
    from shards.parallel import run_tasks

    with hold_eval_folder(cfg.out, "elr-eval run"):
        calls = [(functools.partial(run_job, replace(cfg, job_index=i), hold_folder=False),) for i in range(cfg.num_jobs)]
        run_tasks(client, calls, "eval jobs", cfg.num_jobs, progress=False, unit="job")
        return merge(cfg.out, cfg.shards, hold_folder=False)


def run_and_merge(cfg: EvalConfig) -> dict:
    """One job over the whole phase, then the merge, holding the folder throughout."""
    with hold_eval_folder(cfg.out, "elr-eval run"):
        run_job(cfg, hold_folder=False)
        return merge(cfg.out, cfg.shards, hold_folder=False)


def run_as_ranks(cfg: EvalConfig) -> dict | None:
    """Under torchrun: every rank is a job, rank 0 merges once all parts are written; returns the
    scores on rank 0."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        run_job(replace(cfg, num_jobs=world, job_index=rank))
        dist.barrier()
        return merge(cfg.out, cfg.shards) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def run_eval(cfg: EvalConfig, scheduler: str | None = None):
    """Run as asked or as launched: every job as a task of a dask scheduler, torchrun's ranks as the
    jobs, or the one job `cfg` names (merging when it is the only one). Returns the scores where the
    merge ran here, else the part written (or None on a rank other than 0)."""
    if scheduler:
        from shards.parallel import dask_client

        with dask_client(scheduler=scheduler) as client:
            return run_on_dask(client, cfg)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return run_as_ranks(cfg)
    if cfg.num_jobs == 1:
        return run_and_merge(cfg)
    return run_job(cfg)
