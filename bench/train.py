"""Benchmark the training input pipeline against the seed's per-file loader, in one run.

    python -m bench.train [--work bench/_work] [--lengths hmdb51] [--steps 12] [--batch-size 256] [--device auto] [--amp off]

On one HMDB51-shaped tree (51 classes x 34 videos per phase, each video's length drawn from its
class in real HMDB51; --lengths uniform: the older 4-16 units) and its tar shards, measures in sequences/s:
  (a) our shard loader alone, in the training process and with 1 and 2 DataLoader workers (on CPU
      a worker sends where each video lies in the shards and the trainer joins the step; on CUDA it
      copies its micro-batches into page-locked shared rings, elr/arena.py, read by the GPU copy),
      alternating for --rounds; on CPU also the CUDA default's host side: 2 workers filling rings
      that the trainer views and gives back, with no join (there the GPU copy reads them)
  (b) full training steps with it
  (c) the seed's loader alone: one np.load per stream and sample, padded to the split's longest
      video (HMDB51DataLayer), and training steps with it
  (d) the model alone on batches already in memory (the compute bound)
  (e) one memory copy of every sequence's bytes: the ceiling of any loader that hands out new tensors
  (e2) the same copy with the mapped shards as its source (where an in-place loader reads them)
and, for what storage buys, (a) on the same videos stored as float16 (build-shards --dtype float16).
Loaders are timed over full epochs of Train: two in a row from a warm page cache (all files read
first: the loaders' own cost; the first epoch of a process also pays for parsing the tar headers
and growing the heap, later ones do not), and one from a cold cache (caches dropped: what a first
epoch on real data costs).
"""

import argparse
import gc
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.common import WORK, copy_ceiling, drop_caches, rate, warm
from bench.seed import SeedDataLayer, train_step
from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, auto_workers
from elr.data import input_fields, phase_shards
from elr.model import TwoStreamGRU, normalise_units, pack_units
from shards.build import BuildConfig, build_shards
from shards.demo import DemoConfig, make_demo
from shards.manifest import load_manifest
from shards.memory import keep_freed_memory
from shards.tario import forget_mapped_shards

INPUTS = TRAIN_INPUTS["lr+hr"]  # the seed's coupling: every video as an LR and an HR sequence
ARENA_ROW = "(a) 2 workers, rings as on CUDA, host side only"
FIELDS = input_fields(INPUTS)


def mapped_copy_rate(plan, reps: int = 3) -> float:
    """Sequences/s of one copy of every sequence of an epoch from where the in-process loader finds
    it (views of the mapped shards) into one reused buffer per model input: what (e) becomes when the
    source is the page cache (4 KiB pages, mapped) rather than the loader's own memory."""
    loader = StepLoader(ShardStream(plan, 0, 1, FIELDS, seed=0), 0)
    loader.dataset.set_position(1)
    groups = list(loader)
    steps = [[[a for f in fields for mb in group for a in mb[f]] for fields in INPUTS.values()] for group in groups]
    sequences = 2 * sum(len(mb["lengths"]) for group in groups for mb in group)  # each video: LR and HR
    buffers = {}

    def one_pass():
        for step in steps:
            for i, parts in enumerate(step):
                units = sum(len(p) for p in parts)
                if i not in buffers or len(buffers[i]) < units:
                    buffers[i] = np.empty((2 * units, parts[0].shape[1]), parts[0].dtype)
                np.concatenate(parts, out=buffers[i][:units])

    one_pass()
    t = time.perf_counter()
    for _ in range(reps):
        one_pass()
    return sequences * reps / (time.perf_counter() - t)


def epoch_rate(loader_factory, sequences_per_item, prepare=None, epoch=0):
    """Sequences/s of one full pass of a loader, after `prepare()` (if any) set the cache state."""
    if prepare:
        prepare()
    t, n = time.perf_counter(), 0
    for item in loader_factory(epoch):
        n += sequences_per_item(item)
    return rate(n, time.perf_counter() - t)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--lengths", choices=["hmdb51", "uniform"], default="hmdb51",
                    help="video lengths: per class as in real HMDB51, or uniform in 4..16 units")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="(d) and (b) alternate this many times; each step counts with its fastest round")
    ap.add_argument("--batch-size", type=int, default=256, help="sequences per step (LR and HR count separately)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--workers", type=int, default=-1, help="loader worker processes; -1: as train/ddp.py (0 on CPU)")
    ap.add_argument("--seed-workers", type=int, default=2, help="DataLoader workers of the seed's loader")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    ap.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                    help="reuse: keep freed memory (as train/ddp.py does; the seed's loader workers inherit it too)")
    return ap.parse_args()


class Bench:
    """One run's tree, shard sets (float32 and float16), device and loaders."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if args.device == "auto" else args.device)
        self.workers = args.workers if args.workers >= 0 else auto_workers(self.device)
        self.ctx = torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]) \
            if args.amp != "off" else torch.autocast(self.device.type, enabled=False)
        tag = "" if args.lengths == "uniform" else f"-{args.lengths}"  # the uniform tree keeps its old place
        self.root, self.shards = os.path.join(args.work, f"HMDB51{tag}"), os.path.join(args.work, f"shards-train{tag}")
        self.half = self.shards + "-float16"  # the same videos stored as float16 (build-shards --dtype float16)
        if not os.path.isdir(self.root):
            make_demo(self.root, DemoConfig(videos_per_class=34, lengths=args.lengths))
        for folder, dtype in ((self.shards, "float32"), (self.half, "float16")):
            if not os.path.exists(os.path.join(folder, "manifest.json")):
                build_shards(self.root, BuildConfig(out=folder, formats=("webdataset",), dtype=dtype, progress=False))
        self.manifest = load_manifest(self.shards)
        self.plan, self.half_plan = self.train_plan(self.shards), self.train_plan(self.half)
        self.loaders = {}  # one per (plan, workers, hand-off), kept across epochs as train/ddp.py keeps its own

    def train_plan(self, folder, streams=8):
        return StreamPlan(phase_shards(load_manifest(folder), folder, "Split1", ("Train",)), streams,
                          self.args.batch_size // 2 // streams)

    def ours(self, epoch=0, plan=None, workers=None, handoff=None):
        plan, workers = plan or self.plan, self.workers if workers is None else workers
        key = (id(plan), workers, handoff)
        if key not in self.loaders:
            self.loaders[key] = StepLoader(ShardStream(plan, 0, 1, FIELDS, seed=0), workers,
                                           pin_memory=self.device.type == "cuda", handoff=handoff)
        self.loaders[key].dataset.set_position(epoch)
        return DevicePrefetcher(self.loaders[key], INPUTS, self.device)

    def arena_steps(self, epoch):
        """The host side of the CUDA default on this CPU: 2 workers copy each step into their shared
        rings, and the trainer views the blocks and gives them back, as it does on CUDA once the side
        stream has copied them to the GPU (there the rings are also page-locked)."""
        steps = self.ours(epoch, workers=2, handoff="arena").steps
        for group in steps:
            yield group
            steps.release(group)

    def seed(self, epoch=0):
        ds = SeedDataLayer(os.path.join(self.root, "Split1"), "Train")
        return DataLoader(ds, batch_size=self.args.batch_size, shuffle=True, num_workers=self.args.seed_workers,
                          pin_memory=self.device.type == "cuda")


def ours_per_item(item):
    return len(item[1]["labels"])  # labels of the merged LR and HR rows


def seed_per_item(item):
    return len(item[2])


def normalised(batch, inplace):
    """((lengths, rgb, flow) with units normalised, labels) of a merged step, as train/ddp.py makes them."""
    return (batch["lengths"], normalise_units(batch["rgb"], inplace), normalise_units(batch["flow"], inplace)), \
        batch["labels"]


def loader_rows(b: Bench) -> dict:
    """(a), (c) and (e): the loaders alone, warm and cold, and the copy ceilings."""
    rows = {}
    warm(b.shards)
    warm(b.root)
    gc.freeze()  # setup's objects out of full collections, as train/ddp.py runs its epochs (long_lived_frozen)
    # Each loader's two epochs run back to back: the seed's DataLoader forks worker processes, and
    # after a fork every page of the parent's heap faults on its next write (copy-on-write).
    for epoch in (1, 2):
        rows[f"(a) shard loader alone, warm, epoch {epoch}"] = epoch_rate(b.ours, ours_per_item, epoch=epoch)
    handoffs = {f"(a) shard loader alone, {k} workers, warm, epoch 2": (lambda e, k=k: b.ours(e, workers=k), ours_per_item)
                for k in (0, 1, 2)}  # the hand-off between processes: in-process, 1 and 2 workers
    if b.device.type == "cpu":
        handoffs[ARENA_ROW] = (b.arena_steps, lambda group: 2 * sum(len(mb["lengths"]) for mb in group))
    for _ in range(b.args.rounds):  # alternating
        for key, (factory, per_item) in handoffs.items():
            for epoch in (1, 2):  # the second epoch counts (the first grows heaps and arenas)
                r = epoch_rate(factory, per_item, epoch=epoch)
            rows[key] = max(rows.get(key, 0.0), r)
    warm(b.half)
    for epoch in (1, 2):  # half the bytes to copy; epoch 1 only warms this set's maps and tables
        half_rate = epoch_rate(lambda e: b.ours(e, b.half_plan), ours_per_item, epoch=epoch)
    rows["(a) float16 shards, warm, epoch 2"] = half_rate
    for epoch in (1, 2):
        rows[f"(c) seed loader alone, warm, epoch {epoch}"] = epoch_rate(b.seed, seed_per_item, epoch=epoch)
    if drop_caches():  # the process's kept shard maps would hold their pages in the cache
        rows["(a) shard loader alone, cold"] = epoch_rate(b.ours, ours_per_item,
                                                          lambda: (forget_mapped_shards(), drop_caches()))
        rows["(c) seed loader alone, cold"] = epoch_rate(b.seed, seed_per_item, drop_caches)
    samples = b.manifest["splits"]["Split1"]["Train"]["samples"]
    mean_units = sum(s["units"] for s in samples) / len(samples)
    itemsize = np.dtype(b.manifest["dtype"]).itemsize
    rows["(e) one memory copy per sequence (ceiling)"] = copy_ceiling(int(2 * mean_units * b.manifest["dim"] * itemsize))
    rows["(e2) one copy per sequence from the mapped shards"] = mapped_copy_rate(b.plan)
    return rows


def training_rows(b: Bench) -> tuple:
    """(d) the model alone on the very steps (b) runs from the loader, and (c) training on the seed's
    loader; returns (rows, share of (b)'s step time waiting for data)."""
    args, device, n = b.args, b.device, b.args.steps
    warm(b.shards)
    warm(b.root)
    gc.freeze()  # again: the loader rows' kept maps and tables join setup's objects for the training rows
    torch.manual_seed(0)
    model = TwoStreamGRU(b.manifest["dim"], args.hidden, len(b.manifest["classes"])).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    # (d) runs the very steps (b) runs, from memory: batches differ in length, so any others would
    # not be the same amount of compute. This machine's speed drifts by 10-20% over minutes, so the
    # two alternate for --rounds and each counts with its fastest round. Steps are timed as training
    # runs them: no synchronisation between steps (on a GPU the host prepares the next step while the
    # device computes this one), one at the end.
    in_memory = [normalised(batch, False) for _, (_, batch) in zip(range(n), b.ours())]
    train_step(model, opt, pack_units(*in_memory[0][0]), in_memory[0][1], b.ctx)  # warm-up: allocator, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def compute_bound():
        """Seconds of steps 1..n-1 on batches in memory."""
        sync()
        t = time.perf_counter()
        for units, labels in in_memory[1:]:
            train_step(model, opt, pack_units(*units), labels, b.ctx)  # packing is the model's input step
        sync()
        return time.perf_counter() - t

    def fed_by_loader():
        """(seconds, of which the host waited for the loader) of steps 1..n-1; step 0 pays worker start-up."""
        it, waited = iter(b.ours()), 0.0
        next(it)
        sync()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            t = time.perf_counter()
            _, batch = next(it)
            waited += time.perf_counter() - t
            units, labels = normalised(batch, True)
            train_step(model, opt, pack_units(*units), labels, b.ctx)
        sync()
        return time.perf_counter() - t0, waited

    d_runs, b_runs = [], []
    for _ in range(args.rounds):
        d_runs.append(compute_bound())
        b_runs.append(fed_by_loader())
    in_memory.clear()  # free the batches before (c)
    b_best = min(b_runs)
    rows = {"(d) model alone (compute bound)": rate(args.batch_size * (n - 1), min(d_runs)),
            "(b) training steps, shard loader": rate(args.batch_size * (n - 1), b_best[0])}
    wait_share = b_best[1] / b_best[0]
    t = time.perf_counter()
    for i, (rgb, flow, lengths, labels) in zip(range(n), b.seed()):
        if i == 1:
            sync()
            t = time.perf_counter()
        if i >= 1:
            train_step(model, opt, (rgb.to(device), flow.to(device), lengths), labels.to(device), b.ctx)
    sync()
    rows["(c) training steps, seed loader"] = rate(args.batch_size * (n - 1), time.perf_counter() - t)
    return rows, wait_share


def report(b: Bench, rows: dict, wait_share: float) -> None:
    args, device = b.args, b.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{b.plan.n_samples} training videos, dim {b.manifest['dim']}, hidden {args.hidden}, batch {args.batch_size} "
          f"sequences, loader workers: ours {b.workers}, seed's {args.seed_workers}, device {name}, amp {args.amp}, "
          f"malloc {args.malloc}")
    print(f"{'measure':<52}{'seq/s':>10}")
    for k, v in rows.items():
        print(f"{k:<52}{v:>10.1f}")
    for cache in ("warm, epoch 1", "warm, epoch 2", "cold"):
        if f"(a) shard loader alone, {cache}" in rows:
            speedup = rows[f"(a) shard loader alone, {cache}"] / rows[f"(c) seed loader alone, {cache}"]
            print(f"(a) / (c) loader speed-up, {cache}: {speedup:.1f}x")
    inproc = rows["(a) shard loader alone, 0 workers, warm, epoch 2"]
    for k in (1, 2):
        print(f"(a) with {k} worker{'s' * (k > 1)} / in-process, warm, epoch 2: "
              f"{100 * rows[f'(a) shard loader alone, {k} workers, warm, epoch 2'] / inproc:.0f}%")
    if ARENA_ROW in rows:
        print(f"(a) the CUDA default's host side (2 workers, rings) / in-process, warm, epoch 2: "
              f"{100 * rows[ARENA_ROW] / inproc:.0f}%")
    half = rows["(a) float16 shards, warm, epoch 2"] / rows["(c) seed loader alone, warm, epoch 2"]
    print(f"(a) float16 shards / (c), warm, epoch 2: {half:.1f}x")
    ceiling = rows["(e) one memory copy per sequence (ceiling)"] / rows["(c) seed loader alone, warm, epoch 2"]
    print(f"(e) / (c) the most any loader that copies each byte once could gain here, warm: {ceiling:.1f}x")
    for k in ("(e) one memory copy per sequence (ceiling)", "(e2) one copy per sequence from the mapped shards"):
        print(f"(a) in-process / {k[:4].strip()}: {100 * inproc / rows[k]:.0f}%")
    print(f"(b) / (d) share of the compute bound: {100 * rows['(b) training steps, shard loader'] / rows['(d) model alone (compute bound)']:.0f}%")
    print(f"share of step time waiting for data (b): {100 * wait_share:.1f}%")


def main():
    args = parse_args()
    if args.malloc == "reuse":
        keep_freed_memory()
    b = Bench(args)
    rows = loader_rows(b)
    training, wait_share = training_rows(b)
    rows.update(training)
    report(b, rows, wait_share)


if __name__ == "__main__":
    main()
