"""HMDB51's official split files -> which video goes to which phase of the seed's tree.

`<class>_test_split<K>.txt` lists every video of a class with a label: 1 train, 2 test, 0 unused by
the official protocol. The seed trains on Train and validates on Validation, so label 0 becomes
Validation unless `validation="none"`, which leaves those videos out.
"""

import os
import re
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
    """{video file name: phase label '0'|'1'|'2'}; an unknown label or a malformed line names the line."""
    labels = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise SplitError(f"{path}:{number}: expected '<video file> <0|1|2>', found {line.strip()!r}")
            name, label = fields
            if label not in PHASE_OF_LABEL:
                raise SplitError(f"{path}:{number}: unknown label {label!r} for {name} (1 train, 2 test, 0 unused)")
            labels[name] = label
    return labels


def plan_videos(videos_dir: str, splits_dir: str, split: int = 1, validation: str = "label0"):
    """Every video of split K with its phase: (jobs sorted by class then video, problems, unused).

    `problems` are (path, message) for videos a split file names but the folder lacks, or the folder has
    but no split file names; the caller fails on them or skips them. `unused`: label-0 videos left out
    with validation="none"."""
    if validation not in ("label0", "none"):
        raise ValueError(f"--validation must be 'label0' or 'none', got {validation!r}")
    if not os.path.isdir(videos_dir):
        raise SplitError(f"{videos_dir}: no such folder of videos (expected <class>/<video>.avi)")
    files = split_files(splits_dir, split)
    folders = sorted(e.name for e in os.scandir(videos_dir) if e.is_dir() and not e.name.startswith("."))
    jobs, problems, unused = [], [], []
    for class_name in folders:
        if class_name not in files:
            problems.append((os.path.join(videos_dir, class_name),
                             f"class folder named by no split file (no {class_name}_test_split{split}.txt in {splits_dir})"))
    for class_name, split_path in files.items():
        folder = os.path.join(videos_dir, class_name)
        labels = read_split_file(split_path)
        present = set()
        if os.path.isdir(folder):
            present = {e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")}
        for name in sorted(present - set(labels)):
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                problems.append((os.path.join(folder, name), f"named by no line of {split_path}"))
        for name, label in sorted(labels.items()):
            path = os.path.join(folder, name)
            if name not in present:
                problems.append((path, f"missing, but {split_path} names it"))
            elif label == "0" and validation == "none":
                unused.append(f"{class_name}/{name}")
            else:
                jobs.append(VideoJob(class_name, os.path.splitext(name)[0], path, PHASE_OF_LABEL[label]))
    stems = {}
    for job in jobs:
        other = stems.setdefault(job.id, job.path)
        if other != job.path:
            problems.append((job.path, f"same name without extension as {other}: both would write {job.id}.npy"))
    return jobs, problems, unused
