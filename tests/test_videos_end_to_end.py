"""From videos to a verdict, as a user runs it: make-demo-videos -> extract-features -> build-shards ->
train/ddp.py (2 processes) -> elr-eval; the model must beat chance by a wide margin."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run(program, *args, timeout=300):
    """A console script of the venv, or a .py file run by its python, as a user runs them."""
    cmd = [sys.executable, program] if program.endswith(".py") else [os.path.join(BIN, program)]
    result = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_videos_to_accuracy(tmp_path, dask_client):
    demo, scheduler = tmp_path / "demo", dask_client.scheduler.address
    run("elr-ingest", "make-demo-videos", demo, "--classes", 4, "--train", 8, "--validation", 0, "--test", 5,
        "--size", "48x64", "--min-frames", 16, "--max-frames", 24)  # one unit each
    # 16x16 crops and random C3D keep this to seconds on 2 cores; both are explicit, never a default
    run("elr-ingest", "extract-features", demo / "videos", "--splits", demo / "splits", "--out", demo / "HMDB51",
        "--random-c3d", 0, "--crop-size", 16, "--flow-bound", 4, "--scheduler", scheduler, "-q")
    run("elr-ingest", "build-shards", demo / "HMDB51", "--scheduler", scheduler, "-q")
    run("train/ddp.py", "--nproc", 2, "--shards", demo / "HMDB51-shards", "--out", demo / "run", "--epochs", 6,
        "--test-every", 6, "--hidden", 64, "--batch-size", 16, "--device", "cpu", "-q")
    run("elr-eval", "run", "--shards", demo / "HMDB51-shards", "--checkpoint", demo / "run" / "last.pt",
        "--out", demo / "eval")
    report = json.load(open(demo / "eval" / "report.json"))
    assert report["videos"] == 20 and report["top1"] >= 0.6  # chance: 0.25
