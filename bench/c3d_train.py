"""Fine-tuning C3D (elr-train-c3d) against C3D's own compute bound, and its loader against what the
device consumes, in one run.

    python -m bench.c3d_train [--device cpu|cuda] [--steps 3] [--batch 2] [--loader-workers 1]

A clip set of make-demo-videos clips is built once (4 classes, 240x320 videos, JPEG frames at
128x171: what C3D's published weights crop 112x112 from) under bench/_work/c3d-clips. Then:
  (m) C3D alone: forward + backward of the step's clips (--batch units x 2 streams, HR and LR RGB),
      already on the device as C3D's input, no optimizer: the compute bound of a step (timed before
      and after (t): the faster is the bound)
  (t) elr-train-c3d's own run (train.c3d.run, --max-steps): its steps as it times them (batch ready,
      input made on the device, forward, backward, gradient clipping, SGD), the first dropped
      (allocations, the loader's start); data wait is the time a step waited for its batch
  (l) the loader alone (ClipBatches through torch's DataLoader with --loader-workers): read, JPEG
      decode, crop, flip, the step's dropout masks; clips/s against (t)'s consumption
On a GPU (--device cuda) every row runs in bf16 with channels_last_3d, as elr-train-c3d does there.
Targets (issue 20): (t) >= 90% of (m) on the CPU, data wait < 5%.
"""

import argparse
import os
import subprocess
import sys
import time

import torch

from bench.common import WORK

CLIPS = os.path.join(WORK, "c3d-clips")


def build_clip_set(folder: str) -> str:
    """make-demo-videos -> build-clips at 112x112 crops (JPEG), once."""
    clips = os.path.join(folder, "clips")
    if os.path.exists(os.path.join(clips, "manifest.json")):
        return clips
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run([os.path.join(bin_dir, "elr-ingest"), "make-demo-videos", folder, "--classes", "4", "--train", "4",
                    "--validation", "1", "--test", "2", "--min-frames", "48", "--max-frames", "64"], check=True)
    subprocess.run([os.path.join(bin_dir, "elr-ingest"), "build-clips", f"{folder}/videos", "--splits",
                    f"{folder}/splits", "--out", clips, "-q"], check=True)
    return clips


def model_alone(classes: int, clips: int, steps: int, device, amp) -> float:
    """(m): clips/s of forward + backward on clips already on the device."""
    from ingest.c3d.network import c3d_classifier

    model = c3d_classifier(classes, 112, "caffe", None, 0).to(device)
    x = torch.randn(clips, 3, 16, 112, 112, device=device) * 60
    y = torch.randint(0, classes, (clips,), device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        float(loss.detach())  # waits for the device
        times.append(time.perf_counter() - t)
    return clips / (sum(times[1:]) / steps)


def trainer(clip_set: str, batch: int, steps: int, workers: int, device_name: str, out: str) -> tuple:
    """(t): (clips/s, data wait fraction) of elr-train-c3d's steps after its first."""
    import shutil

    from train.c3d import C3DTrainConfig, run

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cfg = C3DTrainConfig(clips=clip_set, out=out, random_c3d=0, batch_size=batch, epochs=1, max_steps=steps + 1,
                         loader_workers=workers, device=device_name, quiet=True)
    timings = run(cfg)["timings"][1:]
    wait, total, clips = (sum(t[i] for t in timings) for i in range(3))
    return clips / total, wait / total


def loader_alone(clip_set: str, batch: int, batches: int, workers: int, pin: bool) -> float:
    """(l): clips/s (units x 2 streams) the loader hands over, after its first batch."""
    from elr.data.clips import ClipBatches, clip_loader

    from shards.clips import ClipSet

    data = ClipBatches(ClipSet(clip_set), "Split1", "Train", ["hr_rgb", "lr_rgb"], 112, batch, seed=0, epoch=0,
                       dropout=0.5)  # the trainer's batches: with their dropout masks
    loader = iter(clip_loader(data, 0, workers, pin))
    next(loader)
    t, n = time.perf_counter(), 0
    for _ in range(min(batches, len(data) - 1)):
        n += len(next(loader)["unit"]) * 2
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of (m) and (t), after one untimed")
    ap.add_argument("--batch", type=int, default=2, help="units a step (2 clips each: HR and LR RGB)")
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--work", default=CLIPS)
    args = ap.parse_args()
    from shards.clips import ClipSet

    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    clip_set = build_clip_set(args.work)
    classes = len(ClipSet(clip_set).classes)
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} threads'}), "
          f"{'bf16, channels_last_3d' if amp else 'float32'}; a step: {args.batch} units x 2 streams = "
          f"{2 * args.batch} clips of 16x112x112", flush=True)
    # the machine's speed drifts: (m) is timed before and after (t), and the faster of the two is the bound
    before = model_alone(classes, 2 * args.batch, args.steps, device, amp)
    print(f"(m) C3D alone, forward + backward        {before:8.2f} clips/s", flush=True)
    t, wait = trainer(clip_set, args.batch, args.steps, args.loader_workers, args.device,
                      os.path.join(args.work, "run"))
    after = model_alone(classes, 2 * args.batch, args.steps, device, amp)
    m = max(before, after)
    print(f"(m) again, after (t)                     {after:8.2f} clips/s", flush=True)
    print(f"(t) elr-train-c3d steps                  {t:8.2f} clips/s = {t / m:.0%} of the faster (m) (target 90%); "
          f"data wait {wait:.1%} (target < 5%)", flush=True)
    loaded = loader_alone(clip_set, args.batch, 8 if device.type == "cpu" else 64, args.loader_workers,
                          device.type == "cuda")
    print(f"(l) loader alone, {args.loader_workers} worker(s)               {loaded:8.2f} clips/s = "
          f"{loaded / t:.1f}x what the steps consume", flush=True)


if __name__ == "__main__":
    main()
