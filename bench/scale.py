"""Does the cost per video stay flat from a thousand videos to a hundred thousand (and, on paper, a million)?

    python -m bench.scale [--videos 1000 10000 100000] [--dim 16] [--shard-size 4MB] [--work bench/_work/scale]

For each size, an HMDB51-shaped tree (51 classes, the real per-class lengths) at a small feature dim,
so that what is measured is the index and the per-video bookkeeping, not the bytes. Shards are cut at
--shard-size 4MB so that each holds about as many videos (~740) as a 256 MB shard does at dim 4096;
with 256 MB shards at dim 16 a phase would be one shard of tens of thousands of videos. Timed, as a user
runs them (whole command lines, start-up included): `elr-ingest build-shards --format both`,
`elr-ingest verify`, `elr-ingest info`, `elr-eval run` (one job of 4) and `elr-eval merge`. And, in a
fresh process, what a training rank does before its first step (load and check the manifest, its
digest, the stream plan, the first step read from the shards) and what an evaluation job does before
its first batch: seconds and the index's Python memory (tracemalloc: still held after start-up, and
the peak during it). The last columns extrapolate 1M videos linearly from the largest size.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from bench.common import REPO


def cli(*args) -> float:
    """Seconds of one whole command line (the venv's console scripts), which must succeed."""
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    t = time.perf_counter()
    done = subprocess.run([exe, *args[1:]], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"Error: {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t


def probe(kind: str, shards: str) -> dict:
    """Start-up of a training rank or an evaluation job, in a fresh interpreter (imports not counted)."""
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--probe", kind, os.path.abspath(shards)],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"Error: probe {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run_probe(kind: str, shards: str) -> None:
    import tracemalloc

    from elr.data import TRAIN_INPUTS, ShardStream, StepLoader, StreamPlan, batches, input_fields
    from shards.schema import LR
    from shards.shardset import ShardSet

    tracemalloc.start()
    t = time.perf_counter()
    shard_set = ShardSet.open(shards)  # as train/ddp.py and elr-eval run open it
    shard_set.digest
    if kind == "train":  # rank 0 of 2, 8 streams, the seed's batch of 256 sequences: what train/ddp.py holds
        plan = StreamPlan(shard_set.tar_shards("Split1", ["Train"]), 8, 16)
        ds = ShardStream(plan, 0, 2, input_fields(TRAIN_INPUTS["lr+hr"]), seed=0)
        next(iter(StepLoader(ds, 0)))
        held = (shard_set, plan, ds)
    else:  # job 0 of 4 of elr-eval run, tar shards
        first = next(batches(shard_set.phase("Split1", "Test").samples(0, 4, LR, "webdataset"), LR, 64))
        held = (shard_set, first)
    seconds = time.perf_counter() - t
    current, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"seconds": seconds, "held_mb": current / 1e6, "peak_mb": peak / 1e6, "kept": len(held)}))


def make_checkpoint(path: str, dim: int, classes: int) -> None:
    import torch

    from elr.model import TwoStreamGRU, export_seed_state_dict

    torch.manual_seed(0)
    export_seed_state_dict(TwoStreamGRU(dim, 16, classes), path)


def measure(n: int, args) -> dict:
    from shards.demo import DemoConfig, make_demo

    work = os.path.join(args.work, str(n))
    root, shards, evals = (os.path.join(work, x) for x in ("HMDB51", "HMDB51-shards", "eval"))
    per_class = math.ceil(n / 153)  # 51 classes x 3 phases
    if not os.path.isdir(root):
        make_demo(root, DemoConfig(videos_per_class=per_class, dim=args.dim, lengths="hmdb51"))
    videos = 153 * per_class
    shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(shards + ".building", ignore_errors=True)  # a build this script was killed in
    row = {"videos": videos}
    row["build"] = cli("elr-ingest", "build-shards", root, "--out", shards, "--format", "both",
                       "--shard-size", args.shard_size)
    row["verify"] = cli("elr-ingest", "verify", shards)
    row["info"] = cli("elr-ingest", "info", shards)
    row["train"] = probe("train", shards)
    row["eval"] = probe("eval", shards)
    checkpoint = os.path.join(work, "weights.pth")
    make_checkpoint(checkpoint, args.dim, 51)
    shutil.rmtree(evals, ignore_errors=True)
    jobs = [cli("elr-eval", "run", "--shards", shards, "--checkpoint", checkpoint, "--num-jobs", "4",
                "--job-index", str(j), "--out", evals, "--device", "cpu") for j in range(4)]
    row["eval_job"] = max(jobs)
    row["merge"] = cli("elr-eval", "merge", evals)
    return row


def report(rows: list) -> None:
    print("\n| videos | build-shards | verify | info | eval job (1 of 4) | merge | train start-up | "
          "index held / peak | eval start-up | held / peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['videos']:,} | {r['build']:.1f} s | {r['verify']:.1f} s | {r['info']:.2f} s | "
              f"{r['eval_job']:.1f} s | {r['merge']:.2f} s | {r['train']['seconds']:.2f} s | "
              f"{r['train']['held_mb']:.1f} / {r['train']['peak_mb']:.1f} MB | {r['eval']['seconds']:.2f} s | "
              f"{r['eval']['held_mb']:.1f} / {r['eval']['peak_mb']:.1f} MB |")
    print("\nPer video (ms), and the ratio of the largest size to the smallest (target: within 1.5x):")
    first, last = rows[0], rows[-1]
    for name in ("build", "verify", "eval_job", "merge"):
        a, b = 1e3 * first[name] / first["videos"], 1e3 * last[name] / last["videos"]
        per_video = ", ".join(f"{1e3 * r[name] / r['videos']:.3f}" for r in rows)
        print(f"  {name:<10} {per_video}   x{b / a:.2f}")
    scale = 1e6 / last["videos"]
    print(f"\n1M videos, linear from {last['videos']:,}: train start-up {last['train']['seconds'] * scale:.1f} s, "
          f"index held {last['train']['held_mb'] * scale:.0f} MB per rank (peak {last['train']['peak_mb'] * scale:.0f} MB); "
          f"eval start-up {last['eval']['seconds'] * scale:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", nargs="+", type=int, default=[1000, 10000, 100000])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--shard-size", default="4MB", help="build-shards --shard-size (see above)")
    ap.add_argument("--work", default="bench/_work/scale")
    ap.add_argument("--probe", nargs=2, metavar=("KIND", "SHARDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return run_probe(*args.probe)
    rows = []
    for n in args.videos:
        rows.append(measure(n, args))
        print(json.dumps(rows[-1]), flush=True)
    report(rows)


if __name__ == "__main__":
    sys.exit(main())
