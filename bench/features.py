"""How fast does extract-features turn videos into C3D features, against its bounds, in one run?

    python -m bench.features [--videos 8] [--device cpu|cuda] [--rounds 2] [--jobs 1 2]

On HMDB51-sized synthetic videos (240x320, 48-80 frames, MPEG-4 AVI, written by make-demo-videos):
  (a) FFmpeg's own decode of the files: a PyAV decode loop, no conversion, no processing
  (b) our per-video preparation (decode, RGB, 128x171 + 12x16 copies, DIS flow for both, crops),
      one process, one thread: frames/s per core and its ratio to (a)
  (c) C3D alone on in-memory batches of 112x112 clips (the compute bound), at the extraction batch size,
      measured before and after (d) and averaged
  (d) the whole extract-features run (dask workers preparing, C3D batched across videos): clips/s and its
      share of (c), with and without start-up, and the share of time C3D waited for data; then the projected hours for all of HMDB51 (6,766 videos, 632,581 frames; units
      per class from shards/data/hmdb51-units.tsv) on this machine.
  (j) the same videos as N independent jobs (--num-jobs N, each started as its own command with
      cores/N threads and one preparing worker), then --finish, best of --rounds alternating rounds:
      wall time per video (start-up and --finish included), whether the tree
      equals the one job's byte for byte, and the hours HMDB51, UCF101 and Kinetics-400 take at that rate;
      on a GPU (--device cuda) the rows for N GPUs scale the one-GPU rate (independent jobs share nothing).
C3D runs with PyTorch's default initial weights saved as a weights file: zero-padded borders and the
same shapes cost exactly what the Sports-1M weights cost (--random-c3d's replicated borders cost more).
"""

import argparse
import os
import shutil
import time

HMDB51_VIDEOS, HMDB51_FRAMES = 6766, 632_581
# The environment as this script started: a dask LocalCluster sets OMP/MKL_NUM_THREADS=1 in its
# parent's os.environ (for the workers it spawns), and torch in a child started later would then run
# on one thread (MKL_NUM_THREADS=1 caps torch.get_num_threads())
START_ENV = dict(os.environ)
# units = videos x floor(mean frames / 16): UCF101 13,320 clips of 7.21 s mean at 25 fps (186 frames);
# Kinetics-400 ~306,245 clips of 10 s at ~30 fps (300 frames)
OTHER_SETS = {"UCF101": 13_320 * (186 // 16), "Kinetics-400": 306_245 * (300 // 16)}


def hmdb51_units() -> int:
    from shards.demo import hmdb51_units as table

    units, videos = table()["*"]
    return int((units * videos).sum())


def decode_only(paths) -> tuple:
    import av

    frames, t = 0, time.perf_counter()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = 1
            frames += sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - t


def prepare_only(paths) -> tuple:
    import cv2

    from ingest.videos.frames import FrameOptions, prepare_video

    cv2.setNumThreads(1)
    frames, t = 0, time.perf_counter()
    for path in paths:
        frames += prepare_video(path, "c", os.path.basename(path), FrameOptions()).info["frames"]
    return frames, time.perf_counter() - t


def c3d_flops(side: int = 112) -> float:
    """Floating-point operations (a multiply and an add each) of C3D up to fc6 for one clip."""
    from ingest.c3d.network import CONVS, pool5_features

    t, s, macs = 16, side, 0
    for name, (cin, cout) in CONVS.items():
        macs += t * s * s * cout * cin * 27
        if name in ("conv1", "conv2", "conv3b", "conv4b"):  # the pool after it (pool1 keeps time)
            t, s = (t if name == "conv1" else t // 2), s // 2
    return 2 * (macs + pool5_features(side) * 4096)


def dense_rate(device, seconds: float = 10) -> float:
    """FLOP/s of float32 torch.mm of 4096 x 4096 matrices on the same threads: what the cores give
    dense arithmetic, the bar C3D's convolutions are held to."""
    import torch

    a = torch.randn(4096, 4096, device=device)
    b = torch.randn(4096, 4096, device=device)
    torch.mm(a, b)  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        torch.mm(a, b)
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * 2 * 4096 ** 3 / (time.perf_counter() - t)


def c3d_bound(device, batch_size: int, dtype: str, seconds: float = 20, memory_format=None) -> float:
    """Clips/s of C3D alone on batches already in (device) memory, in the batcher's layout by default."""
    import torch

    from ingest.c3d.batching import FeatureBatcher
    from ingest.c3d.network import C3D, clips_to_input

    layout = {} if memory_format is None else {"memory_format": memory_format}
    torch.manual_seed(0)
    batcher = FeatureBatcher({"rgb": C3D()}, device, batch_size, dtype, **layout)
    clips = torch.randint(0, 256, (batch_size, 16, 112, 112, 3), dtype=torch.uint8, device=device)

    net = batcher.networks["rgb"]
    with torch.no_grad(), batcher.autocast:
        x = clips_to_input(clips, batcher.mean).contiguous(memory_format=batcher.memory_format)
        net(x)  # warm-up
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            net(x)
            n += batch_size
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def run_jobs(work: str, videos: str, splits: str, weights: str, n: int, device: str) -> float:
    """N extract-features jobs started at once, then --finish; returns the wall time."""
    import subprocess
    import sys

    out = f"{work}/jobs-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ingest.cli", "extract-features", videos, "--splits", splits, "--out", out,
           "--c3d-weights", weights, "--device", device, "--workers", "1", "-q"]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    env = {**START_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    t = time.perf_counter()
    if n == 1:
        subprocess.run(cmd, check=True, env=env)
    else:
        procs = [subprocess.Popen(cmd + ["--num-jobs", str(n), "--job-index", str(i)], env=env) for i in range(n)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a job of {n} failed")
        subprocess.run(cmd + ["--num-jobs", str(n), "--finish"], check=True, env=env)
    return time.perf_counter() - t


def tree_bytes(out: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(f"{out}/Split1") for f in fs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench/_work/features")
    ap.add_argument("--videos", type=int, default=8, help="synthetic videos (240x320, 48-80 frames)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="dask workers preparing videos in (d)")
    ap.add_argument("--rounds", type=int, default=2, help="best of N for (a), (b) and (j)")
    ap.add_argument("--jobs", type=int, nargs="*", default=[1, 2], help="job counts for (j); none: skip (j)")
    args = ap.parse_args()

    import torch

    from ingest.videos.demo import DemoVideosConfig, make_demo_videos
    from ingest.c3d.extract import ExtractConfig, extract_features
    from ingest.c3d.network import C3D
    from elr.model import resolve_device

    device = resolve_device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    batch = 64 if device.type == "cuda" else 8
    shutil.rmtree(args.work, ignore_errors=True)
    per_class = max(1, args.videos // 2)
    make_demo_videos(f"{args.work}/demo", DemoVideosConfig(classes=2, train=per_class, validation=0, test=1))
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(f"{args.work}/demo/videos") for f in fs)

    decoded = min((decode_only(paths) for _ in range(args.rounds)), key=lambda r: r[1])
    prepared = min((prepare_only(paths) for _ in range(args.rounds)), key=lambda r: r[1])
    rate_a, rate_b = decoded[0] / decoded[1], prepared[0] / prepared[1]
    bound_before = c3d_bound(device, batch, dtype)
    contiguous = c3d_bound(device, batch, dtype, memory_format=torch.contiguous_format)
    dense = dense_rate(device)

    torch.manual_seed(0)
    weights = f"{args.work}/c3d-default-init.pt"
    torch.save(C3D().state_dict(), weights)
    t = time.perf_counter()
    record = extract_features(f"{args.work}/demo/videos", f"{args.work}/demo/splits", f"{args.work}/HMDB51",
                              ExtractConfig(c3d_weights=weights, device=args.device, workers=args.workers,
                                            progress=False))
    wall = time.perf_counter() - t
    units = sum(v["units"] for v in record["videos"].values())
    pipeline = 4 * units / wall
    bound_after = c3d_bound(device, batch, dtype)  # before and after (d): the machine drifts over minutes
    bound = (bound_before + bound_after) / 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device {name}, dtype {dtype}, C3D batch {batch}, {len(paths)} videos, {decoded[0]} frames, "
          f"{units} units, torch threads {torch.get_num_threads()}, prep workers {args.workers}")
    print(f"(a) FFmpeg decode alone (PyAV loop)       {rate_a:9.0f} frames/s  (1 process)")
    print(f"(b) decode + resize + 12x16 + DIS flow    {rate_b:9.0f} frames/s per core  = {rate_b / rate_a:.2f}x of (a)")
    flops = c3d_flops()
    print(f"(m) torch.mm 4096x4096 float32            {dense / 1e9:9.1f} GFLOP/s (the dense bar on these cores)")
    print(f"(c) C3D alone, batches in memory          {bound:9.2f} clips/s  = {bound / 4 * 16:.1f} frames/s (4 streams; "
          f"{bound_before:.2f} before (d), {bound_after:.2f} after), channels_last_3d")
    print(f"    {flops / 1e9:.1f} GFLOP a clip: {bound * flops / 1e9:.1f} GFLOP/s = {bound * flops / dense:.0%} of (m); "
          f"the contiguous layout {contiguous:.2f} clips/s = {contiguous * flops / dense:.0%} of (m) "
          f"(channels_last_3d / contiguous: {bound_before / contiguous:.2f}x)")
    print(f"(d) extract-features, whole run           {pipeline:9.2f} clips/s  = {pipeline / bound:.0%} of (c) "
          f"({wall:.1f} s, start-up included)")
    run = record["last_run"]
    steady = 4 * units / (run["seconds"] - run["startup_seconds"])
    print(f"    after start-up ({run['startup_seconds']:.1f} s: weights, cluster, the first video) "
          f"{steady:9.2f} clips/s  = {steady / bound:.0%} of (c); C3D waited for data "
          f"{run['data_wait_seconds'] / (run['seconds'] - run['startup_seconds']):.1%} of that time")
    clips = 4 * hmdb51_units()
    print(f"HMDB51 ({HMDB51_VIDEOS:,} videos, {HMDB51_FRAMES:,} frames, {clips // 4:,} units, {clips:,} clips): "
          f"{clips / pipeline / 3600:.1f} h at (d) on this machine; preparation alone "
          f"{HMDB51_FRAMES / rate_b / 3600:.2f} core-hours")

    if not args.jobs:
        return
    videos, splits = f"{args.work}/demo/videos", f"{args.work}/demo/splits"
    walls = {}
    for r in range(args.rounds):  # alternating rounds, best of each: the machine drifts over minutes
        for n in (args.jobs if r % 2 == 0 else args.jobs[::-1]):
            walls[n] = min(walls.get(n, float("inf")), run_jobs(args.work, videos, splits, weights, n, args.device))
    first = tree_bytes(f"{args.work}/jobs-{args.jobs[0]}")
    sets = {"HMDB51": hmdb51_units(), **OTHER_SETS}
    for n, wall in walls.items():
        same = tree_bytes(f"{args.work}/jobs-{n}") == first and bool(first)
        rate = 4 * units / wall
        hours = ", ".join(f"{name} {4 * u / rate / 3600:,.1f} h" for name, u in sets.items())
        print(f"(j) {n} job{'s' if n > 1 else ' '} on this {'GPU' if device.type == 'cuda' else 'machine'}"
              f"{'':12} {wall / len(paths):7.2f} s a video, {rate:6.2f} clips/s, {walls[args.jobs[0]] / wall:.2f}x "
              f"of {args.jobs[0]} job; tree {'equals' if same else 'DIFFERS FROM'} {args.jobs[0]} job's byte for "
              f"byte; {hours}")
    if device.type == "cuda":
        rate = 4 * units / walls[1] if 1 in walls else 4 * units / walls[args.jobs[0]] * args.jobs[0]
        for gpus in (8, 64):
            hours = ", ".join(f"{name} {4 * u / (rate * gpus) / 3600:,.1f} h" for name, u in sets.items())
            print(f"(j) {gpus} GPUs, {gpus} jobs (the one-GPU rate x {gpus}){'':8} {hours}")
    else:
        print("(j) on N GPUs: unmeasured here (no GPU); `python -m bench.features --device cuda` prints these rows")


if __name__ == "__main__":
    main()
