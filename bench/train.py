"""Benchmark the training input pipeline against the seed's per-file loader, in one run.

    python bench/train.py [--work bench/_work] [--lengths hmdb51] [--steps 12] [--batch-size 256] [--device auto] [--amp off]

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
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ingest import warm  # noqa: E402
from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, auto_workers, free_step, input_fields  # noqa: E402
from elr.data import phase_shards  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from elr.model import TwoStreamGRU, normalise_units, pack_units  # noqa: E402
from shards.build import BuildConfig, build_shards  # noqa: E402
from shards.demo import DemoConfig, make_demo  # noqa: E402
from shards.memory import keep_freed_memory  # noqa: E402
from shards.tario import forget_mapped_shards  # noqa: E402

INPUTS = TRAIN_INPUTS["lr+hr"]  # the seed's coupling: every video as an LR and an HR sequence
ARENA_ROW = "(a) 2 workers, rings as on CUDA, host side only"
FIELDS = input_fields(INPUTS)


class SeedDataLayer(Dataset):
    """The seed's HMDB51DataLayer: every (video, resolution) is one item, read from its own files,
    L2-normalised per unit in numpy and zero-padded to the longest video of the split."""

    def __init__(self, split_root, phases):
        self.items, self.max_length = [], 0
        for phase in [phases] if isinstance(phases, str) else phases:  # the seed trains on Train + Validation
            base = os.path.join(split_root, phase)
            for label, c in enumerate(sorted(os.listdir(base))):
                for name in sorted(os.listdir(f"{base}_lr_features/{c}")):
                    length = np.load(f"{base}_lr_features/{c}/{name}", mmap_mode="r").shape[0]
                    for res in ("lr", "hr"):
                        self.items.append((f"{base}_{res}_features/{c}/{name}",
                                           f"{base}_{res}_optfl_features/{c}/{name}", length, label))
                    self.max_length = max(self.max_length, length)

    def _load(self, path):
        x = np.load(path, allow_pickle=False).astype(np.float32)
        x /= np.linalg.norm(x, axis=1)[:, None]
        out = torch.zeros(self.max_length, x.shape[1])
        out[: len(x)] = torch.from_numpy(x)
        return out

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rgb, flow, length, label = self.items[i]
        return self._load(rgb), self._load(flow), length, label


def train_step(model, opt, inputs, labels, ctx):
    """One optimiser step; `inputs` are the model's arguments, L2-normalised."""
    with ctx:
        logits = model(*inputs)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def rate(n_items, seconds):
    return n_items / seconds


def drop_caches() -> bool:
    """Empty the page cache (needs root); False where that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def copy_ceiling(bytes_per_sequence: int) -> float:
    """Sequences/s if a loader did nothing but copy each sequence's bytes once (memory bandwidth)."""
    src = np.ones(64 << 20, dtype=np.float32)  # 256 MiB: past the CPU caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(8):
        np.copyto(dst, src)
    return 8 * src.nbytes / (time.perf_counter() - t) / bytes_per_sequence


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench/_work")
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
    args = ap.parse_args()
    if args.malloc == "reuse":
        keep_freed_memory()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    workers = args.workers if args.workers >= 0 else auto_workers(device)
    ctx = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]) \
        if args.amp != "off" else torch.autocast(device.type, enabled=False)

    tag = "" if args.lengths == "uniform" else f"-{args.lengths}"  # the uniform tree keeps its old place
    root, shards = os.path.join(args.work, f"HMDB51{tag}"), os.path.join(args.work, f"shards-train{tag}")
    if not os.path.isdir(root):
        make_demo(root, DemoConfig(videos_per_class=34, lengths=args.lengths))
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        build_shards(root, BuildConfig(out=shards, formats=("webdataset",), progress=False))
    half = shards + "-float16"  # the same videos stored as float16 (build-shards --dtype float16)
    if not os.path.exists(os.path.join(half, "manifest.json")):
        build_shards(root, BuildConfig(out=half, formats=("webdataset",), dtype="float16", progress=False))
    manifest = load_manifest(shards)
    streams = 8

    def train_plan(folder):
        return StreamPlan(phase_shards(load_manifest(folder), folder, "Split1", ("Train",)), streams,
                          args.batch_size // 2 // streams)

    plan, half_plan = train_plan(shards), train_plan(half)
    n = args.steps

    loaders = {}  # one per (plan, workers, hand-off), kept across epochs as train/ddp.py keeps its own (and its workers)

    def our_loader(epoch=0, plan=plan, workers=workers, handoff=None):
        key = (id(plan), workers, handoff)
        if key not in loaders:
            loaders[key] = StepLoader(ShardStream(plan, 0, 1, FIELDS, seed=0), workers,
                                      pin_memory=device.type == "cuda", handoff=handoff)
        loaders[key].dataset.set_position(epoch)
        return DevicePrefetcher(loaders[key], INPUTS, device)

    def arena_steps(epoch):
        """The host side of the CUDA default on this CPU: 2 workers copy each step into their shared
        rings, and the trainer views the blocks and gives them back, as it does on CUDA once the side
        stream has copied them to the GPU (there the rings are also page-locked)."""
        for group in our_loader(epoch, workers=2, handoff="arena").steps:
            yield group
            free_step(group)

    def seed_loader(epoch=0):
        ds = SeedDataLayer(os.path.join(root, "Split1"), "Train")
        return DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.seed_workers,
                          pin_memory=device.type == "cuda")

    def normalised(batch, inplace):
        """((lengths, rgb, flow) with units normalised, labels) of a merged step, as train/ddp.py makes them."""
        return (batch["lengths"], normalise_units(batch["rgb"], inplace), normalise_units(batch["flow"], inplace)),\
            batch["labels"]

    rows = {}
    ours_per_item = lambda item: len(item[1]["labels"])  # noqa: E731  (labels of the merged LR and HR rows)
    seed_per_item = lambda item: len(item[2])  # noqa: E731
    warm(shards)
    warm(root)
    gc.freeze()  # setup's objects out of full collections, as train/ddp.py runs its epochs (long_lived_frozen)
    # Each loader's two epochs run back to back: the seed's DataLoader forks worker processes, and
    # after a fork every page of the parent's heap faults on its next write (copy-on-write).
    for epoch in (1, 2):
        rows[f"(a) shard loader alone, warm, epoch {epoch}"] = epoch_rate(our_loader, ours_per_item, epoch=epoch)
    handoffs = {f"(a) shard loader alone, {k} workers, warm, epoch 2": (lambda e, k=k: our_loader(e, workers=k), ours_per_item)
                for k in (0, 1, 2)}  # the hand-off between processes: in-process, 1 and 2 workers
    if device.type == "cpu":
        handoffs[ARENA_ROW] = (arena_steps, lambda group: 2 * sum(len(mb["lengths"]) for mb in group))
    for _ in range(args.rounds):  # alternating
        for key, (factory, per_item) in handoffs.items():
            for epoch in (1, 2):  # the second epoch counts (the first grows heaps and arenas)
                r = epoch_rate(factory, per_item, epoch=epoch)
            rows[key] = max(rows.get(key, 0.0), r)
    warm(half)
    for epoch in (1, 2):  # half the bytes to copy; epoch 1 only warms this set's maps and tables
        half_rate = epoch_rate(lambda e: our_loader(e, half_plan), ours_per_item, epoch=epoch)
    rows["(a) float16 shards, warm, epoch 2"] = half_rate
    for epoch in (1, 2):
        rows[f"(c) seed loader alone, warm, epoch {epoch}"] = epoch_rate(seed_loader, seed_per_item, epoch=epoch)
    if drop_caches():  # the process's kept shard maps would hold their pages in the cache
        rows["(a) shard loader alone, cold"] = epoch_rate(our_loader, ours_per_item,
                                                          lambda: (forget_mapped_shards(), drop_caches()))
        rows["(c) seed loader alone, cold"] = epoch_rate(seed_loader, seed_per_item, drop_caches)
    samples = manifest["splits"]["Split1"]["Train"]["samples"]
    mean_units = sum(s["units"] for s in samples) / len(samples)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    rows["(e) one memory copy per sequence (ceiling)"] = copy_ceiling(int(2 * mean_units * manifest["dim"] * itemsize))
    rows["(e2) one copy per sequence from the mapped shards"] = mapped_copy_rate(plan)
    warm(shards)
    warm(root)
    gc.freeze()  # again: the loader rows' kept maps and tables join setup's objects for the training rows

    torch.manual_seed(0)
    model = TwoStreamGRU(manifest["dim"], args.hidden, len(manifest["classes"])).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    # (d) runs the very steps (b) runs, from memory: batches differ in length, so any others would
    # not be the same amount of compute. This machine's speed drifts by 10-20% over minutes, so the
    # two alternate for --rounds and each step counts with its fastest round, for (d) and (b) alike.
    in_memory = [normalised(b, False) for _, (_, b) in zip(range(n), our_loader())]
    train_step(model, opt, pack_units(*in_memory[0][0]), in_memory[0][1], ctx)  # warm-up: allocator, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def compute_bound():
        """Seconds of each step 1..n-1 on batches in memory."""
        times = []
        for units, labels in in_memory[1:]:
            sync()
            t = time.perf_counter()
            train_step(model, opt, pack_units(*units), labels, ctx)  # packing is the model's input step
            sync()
            times.append(time.perf_counter() - t)
        return times

    def fed_by_loader():
        """(seconds, of which waiting for the batch) of each step 1..n-1; step 0 pays worker start-up."""
        times, it = [], iter(our_loader())
        next(it)
        for _ in range(n - 1):
            sync()
            t = time.perf_counter()
            _, batch = next(it)
            waited = time.perf_counter() - t
            units, labels = normalised(batch, True)
            train_step(model, opt, pack_units(*units), labels, ctx)
            sync()
            times.append((time.perf_counter() - t, waited))
        return times

    d_runs, b_runs = [], []
    for _ in range(args.rounds):
        d_runs.append(compute_bound())
        b_runs.append(fed_by_loader())
    in_memory.clear()  # free the batches before (c)
    d_best = [min(step) for step in zip(*d_runs)]
    b_best = [min(step) for step in zip(*b_runs)]  # (total, waited) of each step's fastest round
    rows["(d) model alone (compute bound)"] = rate(args.batch_size * (n - 1), sum(d_best))
    rows["(b) training steps, shard loader"] = rate(args.batch_size * (n - 1), sum(t for t, _ in b_best))
    wait_share = sum(w for _, w in b_best) / sum(t for t, _ in b_best)

    t = time.perf_counter()
    for i, (rgb, flow, lengths, labels) in zip(range(n), seed_loader()):
        if i == 1:
            sync()
            t = time.perf_counter()
        if i >= 1:
            train_step(model, opt, (rgb.to(device), flow.to(device), lengths), labels.to(device), ctx)
    sync()
    rows["(c) training steps, seed loader"] = rate(args.batch_size * (n - 1), time.perf_counter() - t)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{plan.n_samples} training videos, dim {manifest['dim']}, hidden {args.hidden}, batch {args.batch_size} "
          f"sequences, loader workers: ours {workers}, seed's {args.seed_workers}, device {name}, amp {args.amp}, "
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


if __name__ == "__main__":
    main()
