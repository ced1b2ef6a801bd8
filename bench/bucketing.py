"""Does length bucketing cost accuracy when lengths depend on class (real HMDB51)? Accuracy and padding, both ways.

    python -m bench.bucketing [--seeds 0 1 2] [--epochs 12] [--lengths hmdb51 uniform]
                              [--loaders shuffled bucketed unbucketed seed]

For each length model, one HMDB51-shaped demo tree (51 classes, --videos-per-class per phase), then
training runs per seed and loader: `shuffled` (train/ddp.py's default: micro-batches cut from shuffle
windows of 256 videos), `bucketed` (--length-bucketing: each window sorted by length first),
`unbucketed` (a window of one micro-batch: no mixing across micro-batches) and `seed`: the seed's
own training loop (its
per-file data layer, every (video, resolution) an item of a shuffled DataLoader, batches padded to
the split's longest video, the same model, RMSprop and learning rate). Every run is one process (a
step's videos do not depend on the number of processes, elr/data/plan.py). Prints, per row, the padding
share a padded layout would waste and the best LR test accuracy over the last 4 epochs (single
epochs swing a lot at this size), per seed and on average.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from shards.build import BuildConfig, build_shards
from shards.demo import DemoConfig, make_demo


def run(shards, out, seed, epochs, buffer, bucket, args):
    """(best LR test accuracy of the last 4 epochs, mean padding share) of a train/ddp.py run."""
    from train.ddp import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(shards=shards, out=out, epochs=epochs, test_every=1, seed=seed, hidden=args.hidden,
                      batch_size=args.batch_size, shuffle_buffer=buffer, length_bucketing=bucket, loader_workers=0,
                      quiet=True)
    train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return max(r["test_acc"] for r in history[-4:]), float(np.mean([r["padding"] for r in history]))


def run_seed_loop(root, seed, epochs, args):
    """The same, for the seed's training loop (one process): its data layer and padded batches."""
    from bench.train import SeedDataLayer
    from elr.model import TwoStreamGRU

    torch.manual_seed(seed)
    train_set = SeedDataLayer(os.path.join(root, "Split1"), ("Train", "Validation"))  # as train/ddp.py too
    test_set = SeedDataLayer(os.path.join(root, "Split1"), "Test")
    test_set.items = [item for item in test_set.items if "_lr_features/" in item[0]]  # tested on LR only
    n_classes = len(os.listdir(os.path.join(root, "Split1", "Train_lr_features")))
    model = TwoStreamGRU(args.dim, args.hidden, n_classes)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    accs, padding = [], []
    for _ in range(epochs):
        model.train()
        for rgb, flow, lengths, labels in DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                                     generator=order):
            padding.append(1 - float(lengths.sum()) / (len(lengths) * train_set.max_length))
            loss = F.cross_entropy(model(rgb, flow, lengths), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        right = 0
        with torch.no_grad():
            for rgb, flow, lengths, labels in DataLoader(test_set, batch_size=args.batch_size):
                right += int((model(rgb, flow, lengths).argmax(1) == labels).sum())
        accs.append(right / len(test_set))
    return max(accs[-4:]), float(np.mean(padding))


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
    ap.add_argument("--loaders", nargs="+", default=["shuffled", "bucketed", "unbucketed"],
                    choices=["shuffled", "bucketed", "unbucketed", "seed"])
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
        for name in args.loaders:
            if name == "seed":
                results = [run_seed_loop(root, s, args.epochs, args) for s in args.seeds]
            else:
                buffer = micro if name == "unbucketed" else 256
                results = [run(shards, os.path.join(args.work, lengths, f"run-{name}-{s}"), s, args.epochs,
                               buffer, name == "bucketed", args) for s in args.seeds]
            accs = [100 * a for a, _ in results]
            print(f"| {lengths} | {name} | {100 * np.mean([p for _, p in results]):.1f}% | "
                  f"{', '.join(f'{a:.1f}' for a in accs)} | {np.mean(accs):.1f}% |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
