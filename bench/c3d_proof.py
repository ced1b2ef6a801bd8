"""Does fine-tuning C3D help? On make-demo-videos clips, as a user runs the commands (issue 20, item 4).

    python -m bench.c3d_proof [--epochs 8] [--seeds 0 1 2] [--work bench/_work/c3d-proof]

1. make-demo-videos: 4 motions (slide right, slide left, rise, fall; --classes 8 adds grow, shrink
   and two drifts), 8 Train, 2 Validation and 6 Test videos a class, 48x64, 32-48 frames (2 or 3 units)
2. build-clips at 16x16 crops (random initial weights stand in for the Sports-1M C3D, as in the demo)
3. elr-train-c3d twice from --random-c3d 0: the RGB network (hr_rgb,lr_rgb) and the flow network
   (hr_flow,lr_flow), --no-flip (a mirror turns slide right into slide left), 4 units a step,
   --new-lr-mult 1 (the random network's fc7 is new too: at 10x its steps were noisier on these clips)
4. extract-features with the initial network (--random-c3d 0) and with the two best.pt
5. build-shards, then the coupled two-stream GRU (train/ddp.py) on each feature tree, once per seed;
   LR Test accuracy, best of the last 3 epochs, per seed
It prints fine-tuning's clip and video accuracy against chance, and the GRU's accuracy on each tree.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

from bench.common import WORK

BIN = os.path.dirname(sys.executable)


def run(*cmd):
    program = [sys.executable, cmd[0]] if cmd[0].endswith(".py") else [os.path.join(BIN, cmd[0])]
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(program + [str(c) for c in cmd[1:]], check=True)


def metrics(folder: str) -> list:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(WORK, "c3d-proof"))
    ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    ap.add_argument("--gru-epochs", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4, help="motions of make-demo-videos (8: with grow, shrink and "
                    "two drifts; mirror pairs among them either way)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GRU seeds")
    args = ap.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    run("elr-ingest", "make-demo-videos", w, "--classes", args.classes, "--train", 8, "--validation", 2, "--test", 6,
        "--size", "48x64", "--min-frames", 32, "--max-frames", 48)
    run("elr-ingest", "build-clips", f"{w}/videos", "--splits", f"{w}/splits", "--out", f"{w}/clips", "--crop-size", 16,
        "--flow-bound", 4, "-q")
    tuned = {}
    for name, streams in (("rgb", "hr_rgb,lr_rgb"), ("flow", "hr_flow,lr_flow")):
        run("elr-train-c3d", "--clips", f"{w}/clips", "--streams", streams, "--random-c3d", 0, "--no-flip",
            "--new-lr-mult", 1, "--epochs", args.epochs, "--batch-size", 4, "--out", f"{w}/c3d-{name}", "-q")
        tuned[name] = metrics(f"{w}/c3d-{name}")
    run("elr-ingest", "extract-features", f"{w}/videos", "--splits", f"{w}/splits", "--out", f"{w}/initial/HMDB51",
        "--random-c3d", 0, "--crop-size", 16, "--flow-bound", 4, "-q")
    run("elr-ingest", "extract-features", f"{w}/videos", "--splits", f"{w}/splits", "--out", f"{w}/tuned/HMDB51",
        "--c3d-weights", f"{w}/c3d-rgb/best.pt", "--c3d-flow-weights", f"{w}/c3d-flow/best.pt", "--flow-bound", 4, "-q")
    gru = {}
    for tree in ("initial", "tuned"):
        run("elr-ingest", "build-shards", f"{w}/{tree}/HMDB51", "-q")
        for seed in args.seeds:
            out = f"{w}/{tree}/gru-{seed}"
            run("train/ddp.py", "--shards", f"{w}/{tree}/HMDB51-shards", "--out", out, "--epochs", args.gru_epochs,
                "--test-every", 1, "--hidden", 64, "--batch-size", 16, "--seed", seed, "-q")
            gru.setdefault(tree, []).append(max(r["test_acc"] for r in metrics(out)[-3:]))

    print(f"\nfine-tuning C3D from random weights (16x16 crops; chance {1 / args.classes:.1%}): LR Test accuracy per epoch")
    for name, records in tuned.items():
        stream = f"lr_{name}"
        print(f"  {name:4s} clip " + " ".join(f"{r[f'test_{stream}_clip_acc']:.0%}" for r in records)
              + " | video " + " ".join(f"{r[f'test_{stream}_video_acc']:.0%}" for r in records)
              + f" | train clip {records[-1]['train_clip_acc']:.0%}")
    print("\nthe coupled two-stream GRU on each feature tree: LR Test accuracy, best of the last 3 epochs")
    for tree, accs in gru.items():
        print(f"  {tree:8s} " + " ".join(f"seed {s}: {a:.1%}" for s, a in zip(args.seeds, accs))
              + f" | mean {sum(accs) / len(accs):.1%}")
    print(f"\ntuned - initial: {(sum(gru['tuned']) - sum(gru['initial'])) / len(args.seeds):+.1%} (mean over seeds)")


if __name__ == "__main__":
    main()
