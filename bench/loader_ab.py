"""The shard loader of this checkout against another commit's, in alternating processes.

    python -m bench.train                      # once: builds the real-length shards it reads
    python -m bench.loader_ab 3f4c737 [--rounds 4] [--workers 2] [--shards bench/_work/shards-train-hmdb51]

This machine's speed drifts by 1.5x within an hour, so two runs of bench/train.py an hour apart
cannot tell a 20% change from the drift. Here the two versions take turns: each round starts one
process per version (the other commit checked out in a temporary git worktree), each times its
loader over 6 epochs of the same shards (the seed's global batch: 128 videos as LR and HR, 8
streams) and reports its best epoch after the first; then the next round. Prints every round and
the range of both. --cold: one epoch per process, after the page cache is dropped (root only).
--workers N: each loader with N DataLoader workers (the hand-off between processes) instead of in-process."""

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(root: str, shards: str, epochs: int, cold: bool, workers: int = 0) -> None:
    """Time the loader of the code at `root` (its own modules, not this checkout's): the child runs as a
    file, not a module, so that nothing of this checkout is on its path before `root`."""
    sys.path.insert(0, root)
    from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, input_fields, phase_shards
    from shards.manifest import load_manifest
    from shards.memory import keep_freed_memory

    keep_freed_memory()
    inputs = TRAIN_INPUTS["lr+hr"]
    plan = StreamPlan(phase_shards(load_manifest(shards), shards, "Split1", ("Train",)), 8, 256 // 2 // 8)
    loader = StepLoader(ShardStream(plan, 0, 1, input_fields(inputs), seed=0), workers)
    gc.freeze()  # as train/ddp.py during its epochs (shards.memory.long_lived_frozen), for both trees
    rates = []
    for epoch in range(epochs):
        loader.dataset.set_position(epoch)
        t, n = time.perf_counter(), 0
        for _, batch in DevicePrefetcher(loader, inputs, "cpu"):
            n += len(batch["lengths"])
        rates.append(n / (time.perf_counter() - t))
    print(round(rates[0] if cold else max(rates[1:])))  # warm: the first epoch maps and parses the shards


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commit", nargs="?", help="the commit to compare against (anything `git worktree add` takes)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--shards", default=os.path.join(HERE, "bench/_work/shards-train-hmdb51"))
    ap.add_argument("--cold", action="store_true", help="one epoch per process from a dropped page cache")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of each loader (0: in-process)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shards = os.path.abspath(args.shards)
    if args.child:
        return child(args.child, shards, 1 if args.cold else args.epochs, args.cold, args.workers)
    if not args.commit:
        ap.error("name the commit to compare against")
    if args.cold:
        from bench.common import drop_caches  # in this process only: a child imports its own tree's modules
    if args.cold and not drop_caches():
        sys.exit("Error: --cold drops the page cache, which needs root (/proc/sys/vm/drop_caches)")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        sys.exit(f"Error: no shard set at {shards}; run `python -m bench.train` once to build it")
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", HERE, "worktree", "add", "-q", "--detach", other, args.commit], check=True)
        try:
            results = {args.commit: [], "this checkout": []}
            for r in range(args.rounds):
                for name, root in ((args.commit, other), ("this checkout", HERE)):
                    if args.cold:
                        drop_caches()  # the child maps the shards after this
                    out = subprocess.run([sys.executable, __file__, "--child", root, "--shards", shards,
                                          "--epochs", str(args.epochs), "--workers", str(args.workers)]
                                         + (["--cold"] if args.cold else []),
                                         check=True, capture_output=True, text=True)
                    results[name].append(int(out.stdout.split()[-1]))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,} seq/s" for k, v in results.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", other], check=False)
    for name, rates in results.items():
        which = "its one cold epoch" if args.cold else "best epoch"
        print(f"{name}: {min(rates):,}-{max(rates):,} seq/s ({which} of each process)")
    old, new = results.values()
    print(f"this checkout / {args.commit}: {sorted(new)[len(new) // 2] / sorted(old)[len(old) // 2]:.2f}x (medians)")


if __name__ == "__main__":
    main()
