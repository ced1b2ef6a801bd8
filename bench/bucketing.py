"""Does length bucketing cost accuracy when lengths depend on class (real HMDB51)? Accuracy and padding, both ways.

    python bench/bucketing.py [--seeds 0 1 2] [--epochs 12] [--lengths hmdb51 uniform]

For each length model, one HMDB51-shaped demo tree (51 classes, --videos-per-class per phase), then
training runs per seed and loader setting: `bucketed` (the default shuffle window) and `unbucketed`
(a window of one micro-batch: plain shuffled batches, as the seed's loader forms them). Prints, per
row, the padding share a padded layout would waste and the best LR test accuracy over the last 4
epochs (single epochs swing a lot at this size), per seed and on average.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/ (bench/train.py)

from shards.build import BuildConfig, build_shards  # noqa: E402
from shards.demo import DemoConfig, make_demo  # noqa: E402


def run(shards, out, seed, epochs, buffer, args):
    from train.ddp import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(shards=shards, out=out, epochs=epochs, test_every=1, seed=seed, hidden=args.hidden,
                      batch_size=args.batch_size, shuffle_buffer=buffer, loader_workers=0, quiet=True)
    train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return max(r["test_acc"] for r in history[-4:]), float(np.mean([r["padding"] for r in history]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench/_work/bucketing")
    ap.add_argument("--lengths", nargs="+", default=["hmdb51", "uniform"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--videos-per-class", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    micro = args.batch_size // 2 // 8  # lr+hr, 8 data streams
    print(f"| lengths | loader | padding | best of last 4 epochs, per seed {args.seeds} | mean |", flush=True)
    print("|---|---|---:|---|---:|", flush=True)
    for lengths in args.lengths:
        root = os.path.join(args.work, lengths, "HMDB51")
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
        make_demo(root, DemoConfig(videos_per_class=args.videos_per_class, dim=args.dim, lengths=lengths))
        shards = root + "-shards"
        build_shards(root, BuildConfig(out=shards, formats=("webdataset",), progress=False))
        for name, buffer in (("bucketed", 256), ("unbucketed", micro)):
            results = [run(shards, os.path.join(args.work, lengths, f"run-{name}-{s}"), s, args.epochs, buffer, args)
                       for s in args.seeds]
            accs = [100 * a for a, _ in results]
            print(f"| {lengths} | {name} | {100 * np.mean([p for _, p in results]):.1f}% | "
                  f"{', '.join(f'{a:.1f}' for a in accs)} | {np.mean(accs):.1f}% |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
