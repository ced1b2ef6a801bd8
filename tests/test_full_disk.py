"""A full disk, for real (a small tmpfs), under every command that writes: one `Error:` line naming the
file being written, exit 1, and no temporary file or lock left behind."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_side_by_side

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kb): a folder on a tmpfs of that size (needs root and a kernel that lets us mount)."""
    mounts = []

    def make(kb: int):
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def assert_full_disk_error(result, disk):
    """One line naming a file on the full disk under its own name (not a temporary one)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("config {", "warning: "))]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    m = re.fullmatch(rf"Error: ({re.escape(str(disk))}/\S+): No space left on device", lines[0])
    assert m and ".partial-" not in m.group(1), lines[0]
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(disk) for f in fs if ".partial-" in f or f.endswith(".lock")]
    assert leftovers == [] and not any(p.endswith(".lock") for p in os.listdir(disk))
    return m.group(1)


def test_build_and_extract_on_a_full_disk_name_the_file(small_disk, demo_master, tmp_path, dask_client):
    from ingest.videos.demo import DemoVideosConfig, make_demo_videos

    make_demo_videos(str(tmp_path / "demo"), DemoVideosConfig(classes=2, train=3, test=2, validation=0, height=32,
                                                              width=32, min_frames=16, max_frames=16))
    build_disk, extract_disk = small_disk(100), small_disk(100)
    scheduler = ["--scheduler", dask_client.scheduler.address]
    build, extract = run_side_by_side([
        [os.path.join(BIN, "elr-ingest"), "build-shards", str(demo_master), "--out", str(build_disk / "shards"), "-q",
         *scheduler],
        [os.path.join(BIN, "elr-ingest"), "extract-features", str(tmp_path / "demo" / "videos"), "--splits",
         str(tmp_path / "demo" / "splits"), "--out", str(extract_disk / "HMDB51"), "--random-c3d", "0",
         "--crop-size", "16", "-q", *scheduler]], timeout=300, cwd=REPO, env=ENV)
    assert assert_full_disk_error(build, build_disk).startswith(f"{build_disk}/shards.building/")
    assert assert_full_disk_error(extract, extract_disk).startswith(f"{extract_disk}/HMDB51/Split1/")


def test_training_and_evaluation_on_a_full_disk_name_the_file(small_disk, built_master, tmp_path):
    from elr.model import TwoStreamGRU
    from shards.manifest import load_manifest

    m = load_manifest(str(built_master))
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": TwoStreamGRU(m["dim"], 8, len(m["classes"])).state_dict(), "classes": m["classes"]}, checkpoint)
    train_disk, run_disk = small_disk(12), small_disk(12)
    merge_disk = small_disk(48)  # the parts fit, the reports do not
    parts = tmp_path / "parts"
    for job in ("0", "1"):
        subprocess.run([os.path.join(BIN, "elr-eval"), "run", "--shards", str(built_master), "--checkpoint",
                        str(checkpoint), "--out", str(parts), "--num-jobs", "2", "--job-index", job, "--device", "cpu"],
                       check=True, capture_output=True, cwd=REPO, env=ENV)
    shutil.copytree(parts, merge_disk / "eval")
    train, job, merge = run_side_by_side([
        [os.path.join(BIN, "elr-train"), "--shards", str(built_master), "--out", str(train_disk / "run"), "--hidden", "64",
         "--batch-size", "8", "--data-streams", "2", "--epochs", "1", "--loader-workers", "0", "-q", "--device", "cpu"],
        [os.path.join(BIN, "elr-eval"), "run", "--shards", str(built_master), "--checkpoint", str(checkpoint),
         "--out", str(run_disk / "eval"), "--device", "cpu"],
        [os.path.join(BIN, "elr-eval"), "merge", str(merge_disk / "eval")]], timeout=300, cwd=REPO, env=ENV)
    assert assert_full_disk_error(train, train_disk) == f"{train_disk}/run/last.pt"
    assert not (train_disk / "run").exists()  # the failed run removes the folder it created
    assert assert_full_disk_error(job, run_disk) == f"{run_disk}/eval/part-00000-of-00001.npz"
    written = assert_full_disk_error(merge, merge_disk)
    assert os.path.basename(written) in ("report.json", "report.md", "predictions.csv", "confusion.png")


def test_a_cache_download_on_a_full_disk_names_the_cache_file(small_disk, tmp_path, monkeypatch):
    import hashlib

    from conftest import HttpServer
    from shards import remote
    from shards.cache import ShardCache

    served = tmp_path / "served"
    served.mkdir()
    data = os.urandom(64 << 10)
    (served / "x.tar").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    disk = small_disk(16)
    monkeypatch.setattr(remote, "RETRIES", 0)
    server = HttpServer(served).start()
    try:
        with pytest.raises(OSError) as e:
            ShardCache(str(disk / "cache"), 1 << 30).fetch(f"{server.url}/x.tar", sha, len(data))
    finally:
        server.stop()
    assert (e.value.errno, e.value.filename) == (28, str(disk / "cache" / f"{sha}.tar"))  # ENOSPC
    assert [f for f in os.listdir(disk / "cache") if ".partial-" in f or f.endswith(".tar")] == []
