"""build-shards: plan the layout, write tar and Zarr shards with dask, publish the set atomically.

The output grows in `<out>.building/` (files under temporary names until complete, a journal of
finished tasks in `_build/`), and is renamed to `<out>` only after `manifest.json` is written.
A killed build is continued with `resume=True`: finished shards whose hash checks out are kept.
"""

import json
import math
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from . import __version__
from .errors import BadVideoError, OutputExistsError, SourceLayoutError
from .atomic import remove_dead_temps, write_json_atomic, write_text_atomic
from .lock import hold_output
from .manifest import (DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, file_sha256, load_manifest, store_manifest,
                       unlisted_files)
from .parallel import run_here, run_tasks, start_workers
from .schema import STREAMS
from .source import discover
from .tasks import Scanned, scan_batch, skip_record, tar_task, zarr_task

FORMATS = ("webdataset", "zarr")


@dataclass
class BuildConfig:
    out: str | None = None  # output folder; default: <data_root>-shards beside the data root
    splits: tuple = ()  # only these Split* folders; empty: all
    formats: tuple = FORMATS  # which copies to write
    shard_bytes: int = 256 << 20  # target size of one tar shard
    min_shards: int = 8  # at least this many tar shards per phase (when it has as many videos), one per reader
    seed: int = 0  # shuffles videos across shards
    dtype: str = "float32"  # storage dtype; float32 is lossless for C3D features
    on_error: str = "fail"  # fail: stop at the first bad video; skip: leave it out and list it in the manifest
    workers: int = 0  # local dask worker processes; 0: one per core
    scheduler: str | None = None  # address of an existing dask.distributed scheduler
    resume: bool = False  # continue an interrupted build in <out>.building
    overwrite: bool = False  # replace an existing shard set (it stays in place until the new one is complete)
    zarr_chunk_units: int = 512  # units per Zarr chunk, the smallest read (8 MB at dim 4096: zarr is slow on small chunks)
    zarr_shard_units: int = 2048  # units per Zarr shard file (one writer task each)
    direct_io: bool = True  # write shard files around the page cache where possible (shards/directio.py)
    progress: bool = field(default=True, repr=False)

    def __post_init__(self):
        self.formats, self.splits = tuple(self.formats), tuple(self.splits)
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.shard_bytes <= 0 or self.min_shards < 1 or self.workers < 0:
            raise ValueError("shard_bytes must be > 0, min_shards >= 1 and workers >= 0")
        if self.zarr_chunk_units < 1 or self.zarr_shard_units % self.zarr_chunk_units:
            raise ValueError("zarr_shard_units must be a positive multiple of zarr_chunk_units")

    def recorded(self) -> dict:
        """The options that shape the output (stored in the plan and the manifest)."""
        keep = ("splits", "formats", "shard_bytes", "min_shards", "seed", "dtype", "on_error",
                "zarr_chunk_units", "zarr_shard_units")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out(data_root: str) -> str:
    return os.path.abspath(data_root).rstrip(os.sep) + "-shards"


def build_shards(data_root: str, cfg: BuildConfig, client=None) -> dict:
    """Turn the seed's feature tree under `data_root` into a shard set; returns the manifest.

    `client`: an existing dask Client to run on (else cfg.scheduler, else a local cluster).
    """
    root = os.path.abspath(data_root)  # abspath keeps a symlinked data root as the user named it
    out = os.path.abspath(cfg.out) if cfg.out else default_out(root)

    def write(workers, staging, tree):
        units, dim, skipped = _scan(workers, tree, cfg)
        plan = _plan(tree, units, dim, skipped, cfg)
        return _write_all(workers.client, tree, plan, BuildJournal(staging, plan), dim, skipped, cfg, root, out)

    return staged_build(out, "build-shards", cfg, client, lambda: discover(root, cfg.splits), write)


def staged_build(out: str, command: str, cfg, client, prepare, write) -> dict:
    """How a shard set is built (build-shards, build-clips); returns its manifest. One writer holds
    <out> and <out>.building to the rename (shards.lock); an existing set is not clobbered
    (prepare_output); a build killed after its manifest is only published. Otherwise `prepare()`
    checks the input before any worker starts, and `write(workers, staging, prepared)` writes the
    shards into <out>.building and returns the manifest, which is stored (sample tables, then
    manifest.json) before the folder is renamed to <out>. Bad input (a BadVideoError) removes a
    staging folder this run created: nothing of it may look usable; an interrupted earlier build is kept.
    cfg: workers, scheduler, resume, overwrite."""
    with hold_output(out, command):
        staging = out + ".building"
        if prepare_output(out, staging, cfg):
            return load_manifest(out)
        if os.path.exists(os.path.join(staging, MANIFEST_NAME)):  # killed after the manifest, before the rename
            return publish(staging, out)
        prepared = prepare()
        created_staging = not os.path.isdir(staging)
        try:
            with start_workers(cfg.workers, cfg.scheduler, client) as workers:  # a local cluster starts meanwhile
                manifest = write(workers, staging, prepared)
        except BadVideoError:
            if created_staging:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        store_manifest(staging, manifest)
        return publish(staging, out)


def prepare_output(out: str, staging: str, cfg: BuildConfig) -> bool:
    """Refuse to clobber; returns True when there is nothing to do (resume of a finished build)."""
    complete = os.path.exists(os.path.join(out, MANIFEST_NAME))
    if os.path.isdir(out) and not complete and os.listdir(out):
        raise OutputExistsError(f"{out}: exists and is not a shard set (no {MANIFEST_NAME}); choose another --out")
    if os.path.isdir(staging):
        if cfg.resume:
            remove_dead_temps(staging)  # we hold the lock: their writers are dead
            return False
        if not cfg.overwrite:
            raise OutputExistsError(
                f"{staging}: an interrupted build is here; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(staging)
    if complete and cfg.resume and not cfg.overwrite:
        log(f"nothing to resume: {out} is complete")
        return True
    if complete and not cfg.overwrite:
        raise OutputExistsError(f"{out}: a shard set already exists; pass --overwrite to replace it")
    return False


def publish(staging: str, out: str) -> dict:
    """Rename the finished staging folder to `out`, with nothing in it that the manifest does not list
    (temporary files of tasks killed mid-write, on this machine or a lost dask worker)."""
    shutil.rmtree(os.path.join(staging, "_build"), ignore_errors=True)
    manifest = load_manifest(staging)  # read and validated once: the renamed folder holds the same file
    for rel in unlisted_files(staging, manifest):
        os.unlink(os.path.join(staging, rel))
    if os.path.isdir(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)
    return manifest


# ---- scan: headers only, in parallel ---------------------------------------------------------


def _scan(workers, tree, cfg):
    """Check every video's headers: {key: units}, the dataset dim, and {key: skip record}.

    On a local cluster the headers are read here, while its workers start (a pread each, 10 us a
    file: shipping batches to workers cost more); a remote cluster's workers read them in parallel."""
    videos = [v for vs in tree.phases.values() for v in vs]
    calls = [(scan_batch, videos[i:i + 256]) for i in range(0, len(videos), 256)]
    if workers.local:
        found = run_here(calls, "scan", len(videos), cfg.progress, count=len)
    else:
        found = run_tasks(workers.client, calls, "scan", len(videos), cfg.progress, count=len)
    results = [r for batch in found for r in batch]
    dims = Counter(r.dim for r in results if isinstance(r, Scanned))
    dim = max(sorted(dims), key=lambda d: dims[d]) if dims else 0
    units, skipped = {}, {}
    for v, result in zip(videos, results):
        if isinstance(result, Scanned) and result.dim != dim:
            result = BadVideoError(v.class_name, v.video, v.paths[0], f"has dim {result.dim}, the dataset's dim is {dim}")
        if isinstance(result, Scanned):
            units[v.key] = result.units
        elif cfg.on_error == "fail":
            raise result
        else:
            skipped[v.key] = skip_record(result)
    return units, dim, skipped


# ---- plan: which video goes to which shard --------------------------------------------------


def balanced_cut(sizes, n):
    """Split `sizes` into n contiguous non-empty groups of about equal total; returns boundaries."""
    total, cum, bounds = sum(sizes), np.cumsum(sizes), [0]
    for k in range(1, n):
        i = int(np.searchsorted(cum, total * k / n)) + 1
        bounds.append(min(max(i, bounds[-1] + 1), len(sizes) - (n - k)))
    return bounds + [len(sizes)]


def _plan(tree, units, dim, skipped, cfg):
    itemsize = np.dtype(cfg.dtype).itemsize
    label = {c: i for i, c in enumerate(tree.classes)}
    phases = {}
    for (split, phase), videos in tree.phases.items():
        order = [v for v in videos if v.key not in skipped]
        random.Random(f"{cfg.seed}:{split}:{phase}").shuffle(order)
        shards = []
        if order:
            sizes = [units[v.key] * dim * itemsize * len(STREAMS) + 4096 for v in order]
            n = max(math.ceil(sum(sizes) / cfg.shard_bytes), min(cfg.min_shards, len(order)))
            bounds = balanced_cut(sizes, min(n, len(order)))
            for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
                shards.append({"name": f"{split}/{phase}/{phase}-{i:06d}.tar",
                               "videos": [[v.key, label[v.class_name], units[v.key]] for v in order[a:b]]})
        phases[f"{split}/{phase}"] = {"shards": shards}
    by_key = {v.key: v for vs in tree.phases.values() for v in vs}
    return {"options": cfg.recorded(), "source_digest": tree.digest(), "dim": dim, "phases": phases,
            "_videos": by_key}


class BuildJournal:
    """`_build/` in the staging folder: the plan, and one record per finished task."""

    def __init__(self, staging, plan):
        self.staging, self.folder = staging, os.path.join(staging, "_build")
        self.checked = {}  # records written or verified in this run: their files are not hashed again
        saved_plan = {k: v for k, v in plan.items() if not k.startswith("_")}
        path = os.path.join(self.folder, "plan.json")
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f) != json.loads(json.dumps(saved_plan)):  # compare as JSON (tuples -> lists)
                    raise OutputExistsError(
                        f"{staging}: the source tree or options changed since the interrupted build; "
                        "pass --overwrite to start over"
                    )
        else:
            write_json_atomic(path, saved_plan)

    def _path(self, name):
        return os.path.join(self.folder, "done", name + ".json")

    def done(self, name):
        """The record of a finished task, if it exists and its files still hash the same."""
        if name in self.checked:
            return self.checked[name]
        path = self._path(name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        for f in record.get("files", []):
            full = os.path.join(self.staging, f["path"])
            if not os.path.exists(full) or file_sha256(full) != f["sha256"]:
                return None
        self.checked[name] = record
        return record

    def record(self, name, record):
        # compact: json's C encoder (indented output is encoded in Python, 20 ms a tar shard's record)
        write_text_atomic(self._path(name), json.dumps(record, sort_keys=True, separators=(",", ":")))
        self.checked[name] = record



# ---- orchestration --------------------------------------------------------------------------


def _write_all(client, tree, plan, journal, dim, skipped, cfg, root, out):
    videos, write_tar, write_zarr = plan["_videos"], "webdataset" in cfg.formats, "zarr" in cfg.formats
    # With --on-error fail the header scan has fixed every video's units, so the Zarr layout is known
    # now and both copies are written at once (the disk never idles between stages). With skip, a video
    # can still drop out in the tar stage (non-finite values), so Zarr waits for the validated list.
    concurrent = write_zarr and cfg.on_error == "fail"
    jobs = _tar_jobs(plan, journal, cfg)
    if concurrent:
        planned = {name: [tuple(v) for shard in phase["shards"] for v in shard["videos"]]
                   for name, phase in plan["phases"].items()}
        zarr_jobs, layouts = _zarr_jobs(plan, journal, planned, dim, cfg)
        jobs += zarr_jobs
    _run_jobs(client, journal, jobs, "write tar + zarr" if concurrent else "write tar" if write_tar else "validate", cfg)

    phases = {}
    for phase_name, phase in plan["phases"].items():
        split, phase_id = phase_name.split("/")
        records = [journal.done(s["name"]) for s in phase["shards"]]
        samples = [s for r in records for s in r["samples"]]
        entry = {"samples": samples,
                 "skipped": sorted([r for k, r in skipped.items()
                                    if (videos[k].split, videos[k].phase) == (split, phase_id)]
                                   + [s for r in records for s in r["skipped"]],
                                   key=lambda r: (r["class"], r["video"]))}
        if write_tar:
            entry["webdataset"] = {"shards": [
                {"path": f["path"], "samples": len(r["samples"]), "bytes": f["bytes"], "sha256": f["sha256"]}
                for r in records for f in r["files"]]}
        phases[phase_name] = entry
    if write_zarr:
        validated = {name: [(s["key"], s["label"], s["units"]) for s in e["samples"]] for name, e in phases.items()}
        if concurrent:
            assert validated == planned, "fail mode: the tar stage cannot drop videos"
        else:
            zarr_jobs, layouts = _zarr_jobs(plan, journal, validated, dim, cfg)
            _run_jobs(client, journal, zarr_jobs, "write zarr", cfg)
        _finish_zarr(journal, phases, layouts, cfg)

    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": __version__,
        "options": cfg.recorded(), "classes": tree.classes, "dim": dim, "dtype": cfg.dtype,
        "streams": list(STREAMS),
        "source": {"root": root, "digest": plan["source_digest"], "files": tree.n_files()},
        "splits": {},
    }
    for phase_name, entry in phases.items():
        split, phase_id = phase_name.split("/")
        if not entry["samples"]:
            raise SourceLayoutError(f"{root}/{split}: phase {phase_id} has no usable videos (all skipped)")
        manifest["splits"].setdefault(split, {})[phase_id] = entry
    return manifest


def _tar_jobs(plan, journal, cfg):
    """[(journal name, call)] for every tar shard not yet finished (validation only without webdataset)."""
    videos, jobs = plan["_videos"], []
    for phase_name, phase in plan["phases"].items():
        # folders are made here, never in tasks: a task still running after a failed build was cleaned
        # up must find no folder to write into
        os.makedirs(os.path.join(journal.staging, phase_name), exist_ok=True)
        for shard in phase["shards"]:
            if journal.done(shard["name"]) is None:
                sources = [videos[k] for k, _, _ in shard["videos"]]
                jobs.append(Job(shard["name"], len(sources), (tar_task, journal.staging, shard, sources, cfg.dtype,
                                                             cfg.on_error, "webdataset" in cfg.formats, cfg.direct_io)))
    return jobs


@dataclass(frozen=True)
class Job:
    """One task of the build: its journal name, the videos it covers (for the progress bar), the call."""
    name: str
    videos: int
    call: tuple  # (function, *args) as run_tasks takes it


def _run_jobs(client, journal, jobs, desc, cfg):
    results = run_tasks(client, [job.call for job in jobs], desc, sum(job.videos for job in jobs), cfg.progress,
                        count=lambda r: r["count"], nbytes=lambda r: r["nbytes"])
    for job, record in zip(jobs, results):
        journal.record(job.name, record)


def _zarr_jobs(plan, journal, samples_by_phase, dim, cfg):
    """Create each phase store (unless the journal has it) and list the unfinished shard-range jobs."""
    from .zarrio import create_phase_store, shard_ranges  # zarr takes 0.3 s to import: only Zarr builds pay it

    videos, jobs, layouts = plan["_videos"], [], {}
    for phase_name, samples in samples_by_phase.items():  # samples: [(key, label, units)] in store order
        offsets = np.concatenate([[0], np.cumsum([units for _, _, units in samples])]).astype(np.int64)
        store_rel = f"{phase_name}.zarr"
        meta_name = f"{store_rel}/metadata"
        if journal.done(meta_name) is None:
            sources = [videos[key] for key, _, _ in samples]
            create_phase_store(os.path.join(journal.staging, store_rel), dim, cfg.dtype, offsets,
                               [label for _, label, _ in samples], [key for key, _, _ in samples],
                               cfg.zarr_chunk_units, cfg.zarr_shard_units,
                               {"split": sources[0].split, "phase": sources[0].phase,
                                "classes": [v.class_name for v in sources], "videos": [v.video for v in sources]})
            journal.record(meta_name, {"files": []})
        ranges = shard_ranges(int(offsets[-1]), cfg.zarr_shard_units)
        layouts[phase_name] = (store_rel, offsets, ranges)
        for start, stop in ranges:
            name = f"{store_rel}/{start:012d}"
            if journal.done(name) is not None:
                continue
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            last = int(np.searchsorted(offsets, stop, side="left"))
            pieces = [(videos[samples[i][0]], int(offsets[i])) for i in range(first, last)]
            jobs.append(Job(name, len(pieces), (zarr_task, journal.staging, store_rel, start, stop, pieces, dim,
                                                cfg.dtype, cfg.direct_io)))
    return jobs, layouts


def _finish_zarr(journal, phases, layouts, cfg):
    """Add each store's file list (with hashes) and every sample's position to the phase entries."""
    from .zarrio import store_files

    for phase_name, (store_rel, offsets, ranges) in layouts.items():
        data_files = {f["path"]: f for start, _ in ranges
                      for f in journal.done(f"{store_rel}/{start:012d}")["files"]}
        files = []
        for rel in store_files(os.path.join(journal.staging, store_rel)):
            path = f"{store_rel}/{rel}"
            full = os.path.join(journal.staging, path)
            files.append(data_files.get(path) or {"path": path, "bytes": os.path.getsize(full), "sha256": file_sha256(full)})
        entry = phases[phase_name]
        for i, s in enumerate(entry["samples"]):
            s["index"] = i
        entry["zarr"] = {"path": store_rel, "units": int(offsets[-1]), "chunk_units": cfg.zarr_chunk_units,
                         "shard_units": cfg.zarr_shard_units, "files": files}
