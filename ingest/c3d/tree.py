"""The feature tree extract-features writes: the seed's paths, features.json, the journal of a run in
progress, and what --resume and --overwrite may do with what a folder already holds."""

import glob
import json
import os
import re

from shards.atomic import atomic_write
from shards.errors import ELRError, OutputExistsError
from shards.schema import STREAMS

FEATURES_JSON = "features.json"
FORMAT = "elr-features/1"
# What a journal written before an option was recorded was made with: frames in R, G, B order and
# c3d-pytorch's pool5 (a --resume over such a run must start over: its features are not comparable)
LEGACY_OPTIONS = {"channels": "rgb", "pool5": "port"}


def output_paths(out: str, split: str, job) -> dict:
    """stream -> the seed's path of this video's features."""
    return {s: os.path.join(out, split, f"{job.phase}_{suffix}", job.class_name, job.video + ".npy")
            for s, suffix in STREAMS.items()}


def read_features_json(out: str) -> dict:
    path = os.path.join(out, FEATURES_JSON)
    if not os.path.exists(path):
        return {"format": FORMAT, "splits": {}}
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ELRError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ELRError(f"{path}: not a features.json of this tool (format {FORMAT})")
    return doc


class Journal:
    """<out>/.<split>-features.jsonl: the options, then one line per finished or skipped video.
    Job I of N (--num-jobs) keeps its own, .<split>-features.job-IIIII-of-NNNNN.jsonl, whose last line
    says the job finished."""

    def __init__(self, out: str, split: str, job: tuple | None = None):
        name = f".{split}-features.jsonl" if job is None else f".{split}-features.job-{job[0]:05d}-of-{job[1]:05d}.jsonl"
        self.path = os.path.join(out, name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> tuple:
        with open(self.path) as f:
            lines = [json.loads(line) for line in f if line.endswith("\n")]  # a torn last line is redone
        return lines[0], lines[1:]

    def start(self, header: dict) -> None:
        with atomic_write(self.path, "w") as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")

    def append(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


_JOB_JOURNAL = re.compile(r"\.(Split\d)-features\.job-(\d{5})-of-(\d{5})\.jsonl$")


def job_journals(out: str, split: str) -> dict:
    """{number of jobs: [journal paths]} of the extraction jobs (--num-jobs) found in `out` for `split`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out), f".{split}-features.job-*.jsonl"))):
        match = _JOB_JOURNAL.search(os.path.basename(path))
        if match:
            found.setdefault(int(match[3]), []).append(path)
    return found


def options_differ(old: dict, new: dict) -> str:
    """'' when the two headers agree, else the options that differ, said as `key old (this run: new)`."""
    old = {**LEGACY_OPTIONS, **old}
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} (this run: {new.get(k)!r})" for k in differ)


def check_output(out: str, split: str, header: dict, cfg, journal: Journal) -> list:
    """Decide what to do with what `out` already holds; returns the journal entries to keep (--resume).
    A job of several (cfg.num_jobs > 1) shares the tree with the others and keeps to its own journal."""
    done = read_features_json(out)["splits"].get(split)
    tree = os.path.join(out, split)
    single = Journal(out, split)
    other_jobs = {n: paths for n, paths in job_journals(out, split).items() if n != cfg.num_jobs}
    if cfg.overwrite:
        return []
    if other_jobs:
        n, paths = sorted(other_jobs.items())[0]
        raise OutputExistsError(f"{paths[0]}: {out} holds an extraction in {n} jobs; finish it with --num-jobs {n} "
                                f"(--resume each unfinished job, then --finish) or --overwrite to replace it")
    if cfg.num_jobs > 1 and single.exists():
        raise OutputExistsError(f"{single.path}: {out} holds an interrupted extraction in one job; --resume it "
                                "without --num-jobs, or --overwrite to replace it")
    if cfg.resume:
        if journal.exists():
            old, entries = journal.read()
            said = options_differ(old, header)
            if said:
                raise OutputExistsError(f"{journal.path}: the interrupted run used other options: {said}; "
                                        "run again without --resume, with --overwrite")
            return [e for e in entries if "finished" not in e]
        if done is not None:
            raise OutputExistsError(f"{out}: {split} is already complete (features.json); nothing to resume")
        if os.path.isdir(tree) and cfg.num_jobs == 1:  # the other jobs' files are expected there
            raise OutputExistsError(f"{tree}: holds files but no interrupted extraction to resume; --overwrite to replace")
        return []
    if cfg.num_jobs > 1:
        if done is not None or journal.exists():
            state = "already holds the features of" if done is not None else "holds this job's interrupted part of"
            raise OutputExistsError(f"{out}: {state} {split}; --resume to continue it or --overwrite to replace it")
        return []
    if done is not None or journal.exists():
        state = "already holds the features of" if done is not None else "holds an interrupted extraction of"
        raise OutputExistsError(f"{out}: {state} {split}; --resume to continue it or --overwrite to replace it")
    if os.path.isdir(tree) and any(os.scandir(tree)):
        raise OutputExistsError(f"{tree}: already holds a different tree (not written by extract-features); "
                                "--overwrite to replace it")
    return []


def make_folders(out: str, split: str, jobs, classes) -> None:
    """Every phase gets every class folder, empty or not: the seed reads its class list from <phase>/."""
    for phase in sorted({job.phase for job in jobs}):
        for class_name in classes:
            os.makedirs(os.path.join(out, split, phase, class_name), exist_ok=True)
            for suffix in STREAMS.values():
                os.makedirs(os.path.join(out, split, f"{phase}_{suffix}", class_name), exist_ok=True)
