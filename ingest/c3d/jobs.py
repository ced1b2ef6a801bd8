"""extract-features as N independent jobs (--num-jobs N --job-index I): one tree, every video once.

Every job plans the same split, probes every video's frame count from its header (about 1 ms a file)
and takes a share balanced by frames: the longest videos first, each to the job with the fewest frames
so far (HMDB51's lengths vary 18-1062 frames; by count, one job could get most of the long ones). A
job writes its videos' files and a journal of its own, so it resumes alone; `--finish` checks that
every planned video is in exactly one finished journal, with the same options and weights in every
job, and only then writes features.json. C3D's output for a clip depends on nothing else in its batch
(batching.py), so N jobs on one kind of device write the bytes one job writes.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from shards.atomic import remove_dead_temps, remove_quietly
from shards.errors import ELRError
from shards.lock import hold_alone
from shards.schema import STREAMS

from .tree import Journal, output_paths, options_differ, read_features_json


class JobsError(ELRError):
    """Jobs that cannot be finished: one missing or unfinished, options that differ, a video twice."""


@functools.lru_cache(maxsize=None)  # a job's share and its GPU workers' chunks read the same headers
def header_frames(path: str) -> int:
    """Frames a video's header declares (or duration x rate); 0 when it says neither or is unreadable
    (the job that gets it reports it properly)."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            if stream.duration and stream.average_rate:
                return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
    except (av.FFmpegError, IndexError, OSError):
        pass
    return 0


def header_frame_counts(jobs: list) -> list:
    """header_frames of every job's video, read 16 at a time (on a network file system the round trips
    overlap)."""
    with ThreadPoolExecutor(16) as pool:  # (a clip set's videos say theirs: sources.ClipJob)
        return list(pool.map(lambda job: getattr(job, "frames", None) or header_frames(job.path), jobs))


def balanced_share(jobs: list, num_jobs: int, index: int, frames: list | None = None) -> list:
    """The videos of job `index` of `num_jobs`, in plan order: the longest first to the lightest job
    (ties: the lower index), a video of unknown length counted as the median one. Deterministic in
    the plan and the headers, so every job computes the same shares on its own."""
    if frames is None:
        frames = header_frame_counts(jobs)
    known = sorted(f for f in frames if f > 0)
    typical = known[len(known) // 2] if known else 1
    weights = [f if f > 0 else typical for f in frames]
    load, owner = [0] * num_jobs, {}
    for i in sorted(range(len(jobs)), key=lambda i: (-weights[i], jobs[i].id)):
        lightest = min(range(num_jobs), key=lambda j: (load[j], j))
        load[lightest] += weights[i]
        owner[i] = lightest
    return [job for i, job in enumerate(jobs) if owner[i] == index]


def job_name(index: int, num_jobs: int) -> str:
    return f"job {index} of {num_jobs}"


def hold_jobs_folder(out: str, split: str):
    """`out` alone for --finish, refused while a job holds its journal (naming the jobs)."""
    return hold_alone(out, "extract-features --finish", f".{split}-features.job-*.jsonl",
                      "extract-features jobs are still running")


def read_jobs(out: str, split: str, num_jobs: int) -> tuple:
    """(the jobs' common header, every entry of every journal, the jobs' timings), or JobsError."""
    header, first, entries, timings = None, None, [], []
    for index in range(num_jobs):
        journal = Journal(out, split, (index, num_jobs))
        if not journal.exists():
            raise JobsError(f"{journal.path}: {job_name(index, num_jobs)} has not run (no journal); run it "
                            f"with --num-jobs {num_jobs} --job-index {index}")
        job_header, lines = journal.read()
        finished = [line["finished"] for line in lines if "finished" in line]
        if not finished:
            raise JobsError(f"{journal.path}: {job_name(index, num_jobs)} has not finished ({len(lines)} of its "
                            f"videos done); run it again with --num-jobs {num_jobs} --job-index {index} --resume")
        job_header = {k: v for k, v in job_header.items() if k != "job"}
        if header is None:
            header, first = job_header, index
        elif said := options_differ(header, job_header).replace("this run", f"job {index}"):
            raise JobsError(f"{journal.path}: jobs {first} and {index} ran with other options or weights: {said}; "
                            f"run job {index} again with --overwrite and the options of the others")
        entries += [dict(line, job=index) for line in lines if "finished" not in line]
        timings.append(finished[-1])
    return header, entries, timings


def check_coverage(out: str, split: str, planned: list, entries: list) -> list:
    """The entries in plan order, once each; JobsError when a planned video is in no journal or in
    two, a journal names a video the plan does not hold, or a finished video's file is missing."""
    by_id = {}
    for entry in entries:
        if entry["id"] in by_id:
            raise JobsError(f"{entry['id']}: extracted by jobs {by_id[entry['id']]['job']} and {entry['job']}; "
                            "run one of them again with --overwrite")
        by_id[entry["id"]] = entry
    planned_ids = [job.id for job in planned]
    missing = [i for i in planned_ids if i not in by_id]
    if missing:
        raise JobsError(f"{missing[0]}: planned but in no job's journal ({len(missing)} such videos); were the "
                        "split files or videos changed while the jobs ran?")
    extra = sorted(set(by_id) - set(planned_ids))
    if extra:
        raise JobsError(f"{extra[0]}: extracted by job {by_id[extra[0]]['job']} but not in the plan of the "
                        f"split files ({len(extra)} such videos); were they changed while the jobs ran?")
    written = set()
    for job in planned:
        if "skipped" in by_id[job.id]:
            continue
        for path in output_paths(out, split, job).values():
            if not os.path.isfile(path):
                raise JobsError(f"{path}: missing, though job {by_id[job.id]['job']} journaled {job.id} as done")
            written.add(os.path.abspath(path))
    stray = sorted(p for p in feature_files(out, split) if p not in written)
    if stray:
        raise JobsError(f"{stray[0]}: not written by these jobs ({len(stray)} such files): left from another "
                        "extraction; remove them")
    return [{k: v for k, v in by_id[i].items() if k != "job"} for i in planned_ids]


def feature_files(out: str, split: str):
    for phase_stream in os.scandir(os.path.join(out, split)):
        if not phase_stream.name.endswith(tuple(STREAMS.values())):
            continue
        for parent, _, files in os.walk(phase_stream.path):
            yield from (os.path.abspath(os.path.join(parent, f)) for f in files if f.endswith(".npy"))


def finish_jobs(out: str, split: str, plan, cfg, write_record) -> dict:
    """--finish: check the N jobs' journals against the plan, then write_record(header, entries,
    timing) writes features.json; the journals are removed. Returns the split's record."""
    with hold_jobs_folder(out, split):
        remove_dead_temps(out)  # no job holds the folder: whoever left them is dead
        if not Journal(out, split, (0, cfg.num_jobs)).exists() and split in read_features_json(out)["splits"]:
            raise JobsError(f"{out}: {split} is already complete (features.json); nothing to finish")
        header, entries, timings = read_jobs(out, split, cfg.num_jobs)
        mine = cfg.record_options()
        said = options_differ({k: header.get(k) for k in mine}, mine)
        if said:
            raise JobsError(f"{Journal(out, split, (0, cfg.num_jobs)).path}: the jobs ran with other options than "
                            f"this --finish: {said}")
        entries = check_coverage(out, split, plan.jobs, entries)
        timing = {"jobs": cfg.num_jobs, "videos": sum(t["videos"] for t in timings),
                  "units": sum(t["units"] for t in timings), "job_seconds": [t["seconds"] for t in timings]}
        record = write_record(header, entries, timing)
        for index in range(cfg.num_jobs):
            remove_quietly(Journal(out, split, (index, cfg.num_jobs)).path)
        return record


def run_as_ranks(extract, cfg):
    """Under torchrun: every rank is a job (on GPU LOCAL_RANK where --device is auto), and rank 0
    finishes once all are done. Returns rank 0's features.json record, a job summary on the others."""
    from dataclasses import replace
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = cfg.device
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    # the barrier waits for the slowest job: hours, not gloo's default 30 minutes
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        summary = extract(replace(cfg, num_jobs=world, job_index=rank, device=device))
        dist.barrier()
        if rank == 0:
            return extract(replace(cfg, num_jobs=world, job_index=0, finish=True, resume=False, overwrite=False))
        return summary
    finally:
        dist.destroy_process_group()
