"""HMDB51's official split files -> which video goes to which phase of the seed's tree.

`<class>_test_split<K>.txt` lists every video of a class with a label: 1 train, 2 test, 0 unused by
the official protocol. The seed trains on Train and validates on Validation, so label 0 becomes
Validation unless `validation="none"`, which leaves those videos out.
"""

import os
import re
import sys
from dataclasses import dataclass

from shards.errors import ELRError

PHASE_OF_LABEL = {"1": "Train", "2": "Test", "0": "Validation"}
VIDEO_EXTENSIONS = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".flv", ".wmv", ".ogv"}


class SplitError(ELRError):
    """The split files and the video folder do not agree."""


@dataclass(frozen=True)
class VideoJob:
    class_name: str
    video: str  # file name without its last extension: the .npy stem of the seed's tree
    path: str
    phase: str

    @property
    def id(self) -> str:
        return f"{self.class_name}/{self.video}"


def split_files(splits_dir: str, split: int) -> dict:
    """{class: path of its split file} for split K."""
    if not os.path.isdir(splits_dir):
        raise SplitError(f"{splits_dir}: no such folder of split files")
    pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
    found = {}
    for name in sorted(os.listdir(splits_dir)):
        m = pattern.match(name)
        if m:
            found[m.group(1)] = os.path.join(splits_dir, name)
    if not found:
        raise SplitError(f"{splits_dir}: no split files for split {split} (expected <class>_test_split{split}.txt, "
                         "as in HMDB51's testTrainMulti_7030_splits)")
    return found


def read_split_file(path: str) -> dict:
    """{video file name: phase label '0'|'1'|'2'}; an unknown label or a malformed line names the line.

    The label is the last field, so names with spaces work (`my video (1).avi 1`). Names are decoded
    as the file system decodes them (os.fsdecode), so a name that is not UTF-8 still matches its file
    (and is then refused by `plan_videos`, which says how to rename it)."""
    labels = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = os.fsdecode(raw).strip()
            if not line:
                continue
            fields = line.rsplit(None, 1)
            if len(fields) != 2:
                raise SplitError(f"{path}:{number}: expected '<video file> <0|1|2>', found {shown(line)!r}")
            name, label = fields
            if label not in PHASE_OF_LABEL:
                raise SplitError(f"{path}:{number}: unknown label {label!r} for {shown(name)} (1 train, 2 test, 0 unused)")
            labels[name] = label
    return labels


def shown(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 as \\xNN escapes (never lone surrogates)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class VideoPlan:
    jobs: list  # VideoJob, sorted by class then video
    problems: list  # (path, message): videos to fail on or skip (the caller decides)
    unused: list  # "class/file" of label-0 videos left out with validation="none"
    warnings: list  # things that work but that a user would want to know (the same video in two classes)


def plan_videos(videos_dir: str, splits_dir: str, split: int = 1, validation: str = "label0") -> VideoPlan:
    """Every video of split K with its phase.

    Problems are videos a split file names but the folder lacks, or the folder has but no split file
    names, and names that are not UTF-8 (every tree, manifest and JSON file downstream is UTF-8)."""
    if validation not in ("label0", "none"):
        raise ValueError(f"--validation must be 'label0' or 'none', got {validation!r}")
    if not os.path.isdir(videos_dir):
        raise SplitError(f"{videos_dir}: no such folder of videos (expected <class>/<video>.avi)")
    files = split_files(splits_dir, split)
    folders = sorted(e.name for e in os.scandir(videos_dir) if e.is_dir() and not e.name.startswith("."))
    plan = VideoPlan([], [], [], [])
    for class_name in folders:
        if class_name not in files:
            plan.problems.append((shown(os.path.join(videos_dir, class_name)), "class folder named by no split file "
                                  f"(no {shown(class_name)}_test_split{split}.txt in {splits_dir})"))
    for class_name, split_path in files.items():
        folder = os.path.join(videos_dir, class_name)
        labels = read_split_file(split_path)
        present = set()
        if os.path.isdir(folder):
            present = {e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")}
        for name in sorted(present - set(labels)):
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                plan.problems.append((shown(os.path.join(folder, name)), f"named by no line of {split_path}"))
        for name, label in sorted(labels.items()):
            path = os.path.join(folder, name)
            if name not in present:
                plan.problems.append((shown(path), f"missing, but {split_path} names it"))
            elif not is_utf8(path):
                plan.problems.append((shown(path), "the name is not UTF-8, which the feature tree and its JSON "
                                      f"files need; rename the file and its line in {split_path} (e.g. convmv -f "
                                      "latin1 -t utf-8 --notest)"))
            elif label == "0" and validation == "none":
                plan.unused.append(f"{class_name}/{name}")
            else:
                plan.jobs.append(VideoJob(class_name, os.path.splitext(name)[0], path, PHASE_OF_LABEL[label]))
    stems, classes_of = {}, {}
    for job in plan.jobs:
        other = stems.setdefault(job.id, job.path)
        if other != job.path:
            plan.problems.append((job.path, f"same name without extension as {other}: both would write {job.id}.npy"))
        classes_of.setdefault(os.path.basename(job.path), []).append(job.class_name)
    for name, classes in sorted(classes_of.items()):
        if len(classes) > 1:  # the seed's tree keys videos by class, so both are extracted
            plan.warnings.append(f"{name} is a video of {len(classes)} classes ({', '.join(classes)}): a copy in "
                                 "the wrong folder? Both are extracted")
    return plan


def checked_plan(videos: str, splits: str, split: int, validation: str, on_error: str,
                 record: str = "features.json") -> VideoPlan:
    """plan_videos, its warnings printed; a problem in the split files stops here unless on_error is
    "skip" (the caller lists them in `record`), and so does a split without videos."""
    plan = plan_videos(videos, splits, split, validation)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if plan.problems and on_error == "fail":
        path, message = plan.problems[0]
        more = f" (and {len(plan.problems) - 1} more; --on-error skip lists them in {record})" if len(plan.problems) > 1 else ""
        raise SplitError(f"{path}: {message}{more}")
    if not plan.jobs:
        raise SplitError(f"{videos}: no video for split {split}")
    return plan
