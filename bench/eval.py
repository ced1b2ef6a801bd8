"""Benchmark sharded evaluation, in one run.

    python -m bench.eval [--work bench/_work] [--lengths hmdb51] [--hidden 512]

On the HMDB51-shaped tree of bench/train.py (51 classes x 34 videos, lengths drawn per class from real
HMDB51; --lengths uniform: 4-16 units), its Test phase (1734 videos), and a shard set with both
copies, measures videos/s of `elr-eval run` reading the Zarr copy (LR arrays only) and the tar shards,
against the seed's per-file loader (one np.load per stream and video, padded to the longest video)
feeding the same model; then the wall time of 1, 2 and 4 concurrent jobs plus the merge. Every
measurement starts from a warm page cache.
"""

import argparse
import os
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader

from bench.common import warm
from bench.seed import SeedDataLayer
from elr.model import TwoStreamGRU
from shards.build import BuildConfig, build_shards
from shards.demo import DemoConfig, make_demo
from shards.manifest import load_manifest
from train.evaluate import EvalConfig, merge, run_job


class SeedTestLayer(SeedDataLayer):
    """The seed's data layer for Test: LR items only."""

    def __init__(self, split_root):
        super().__init__(split_root, "Test")
        self.items = [it for it in self.items if "_lr_" in it[0]]


def seed_eval(root, model, workers):
    loader = DataLoader(SeedTestLayer(os.path.join(root, "Split1")), batch_size=64, num_workers=workers)
    n = 0
    with torch.no_grad():
        for rgb, flow, lengths, _ in loader:
            model(rgb, flow, lengths)
            n += len(lengths)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench/_work")
    ap.add_argument("--lengths", choices=["hmdb51", "uniform"], default="hmdb51")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tag = "" if args.lengths == "uniform" else f"-{args.lengths}"  # the uniform tree keeps its old place
    root, shards = os.path.join(args.work, f"HMDB51{tag}"), os.path.join(args.work, f"shards-eval{tag}")
    if not os.path.isdir(root):
        make_demo(root, DemoConfig(videos_per_class=34, lengths=args.lengths))
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        build_shards(root, BuildConfig(out=shards, progress=False))
    m = load_manifest(shards)
    n_test = len(m["splits"]["Split1"]["Test"]["samples"])
    torch.manual_seed(0)
    model = TwoStreamGRU(m["dim"], args.hidden, len(m["classes"])).eval()
    ckpt = os.path.join(args.work, "eval-model.pt")
    torch.save({"model": model.state_dict(), "classes": m["classes"]}, ckpt)
    out = os.path.join(args.work, "eval-out")

    rows = {}
    for label, fmt in (("elr-eval run, Zarr (LR arrays only)", "zarr"), ("elr-eval run, tar shards", "webdataset")):
        warm(shards)
        t = time.perf_counter()
        run_job(EvalConfig(shards, ckpt, out, device="cpu", fmt=fmt))
        rows[label] = n_test / (time.perf_counter() - t)
    warm(root)
    t = time.perf_counter()
    n = seed_eval(root, model, args.workers)
    rows["seed per-file loader + same model"] = n / (time.perf_counter() - t)

    scaling = {}
    cores = os.cpu_count() or 1
    for jobs in (1, 2, 4):
        warm(shards)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))}
        folder = os.path.join(args.work, f"eval-{jobs}")
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "train.eval_cli", "run", "--shards", shards, "--checkpoint",
                                   ckpt, "--num-jobs", str(jobs), "--job-index", str(i), "--out", folder, "--device",
                                   "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(jobs)]
        assert all(p.wait() == 0 for p in procs)
        merge(folder)
        scaling[jobs] = time.perf_counter() - t

    print(f"\nTest phase: {n_test} videos, dim {m['dim']}, hidden {args.hidden}, {cores} cores, CPU")
    print(f"{'reader':<40}{'videos/s':>10}{'x seed':>8}")
    base = rows["seed per-file loader + same model"]
    for k, v in rows.items():
        print(f"{k:<40}{v:>10.1f}{v / base:>8.2f}")
    print(f"\n{'concurrent jobs (+ merge)':<40}{'wall s':>10}{'speed-up':>10}")
    for jobs, t in scaling.items():
        print(f"{jobs:<40}{t:>10.1f}{scaling[1] / t:>10.2f}")


if __name__ == "__main__":
    main()
