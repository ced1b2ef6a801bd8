"""One video -> the four uint8 clip stacks C3D reads: HR RGB, LR RGB, HR flow, LR flow.

HR: every decoded frame resized to 128x171 and center-cropped to 112x112 (C3D's input convention).
LR: every decoded frame area-downsampled to 12x16 (the paper's extreme low resolution), then brought
back to 128x171 (bilinear) and center-cropped like HR, so both resolutions show the same field of view.
Flow: between consecutive frames of each stream at 128x171, cropped the same way; the last frame
repeats the last flow, so the flow stream has as many frames (and units) as the RGB stream.
Units: floor(frames / 16) non-overlapping 16-frame clips, at least 1 (a short video repeats its last frame).
"""

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from shards.errors import BadVideoError

from ingest.c3d.network import CLIP_FRAMES, INPUT_SIDE
from .flow import cv_flow_function, flow_to_image, raft_flow

STREAM_ORDER = ("hr_rgb", "lr_rgb", "hr_flow", "lr_flow")


@dataclass(frozen=True)
class FrameOptions:
    lr_size: tuple = (12, 16)  # (H, W) of the extremely low resolution copy
    side: int = INPUT_SIDE  # C3D input side; the published weights need 112
    flow: str = "dis"
    flow_bound: float = 20.0  # pixels of the 128x171 frame mapped to the ends of 0..255

    @property
    def resized(self) -> tuple:
        """(H, W) every frame is resized to before the center crop: 128x171 for side 112."""
        return round(self.side * 128 / INPUT_SIDE), round(self.side * 171 / INPUT_SIDE)


@dataclass
class PreparedVideo:
    class_name: str
    video: str
    clips: dict  # stream -> uint8 (units, 16, side, side, 3)
    info: dict = field(default_factory=dict)  # frames, units, fps, size, declared_frames
    job: object = None  # the VideoJob it was prepared for


def decode_frames(path: str, class_name: str, video: str):
    """Yield each frame as RGB uint8 (H, W, 3), upright; the first item is the stream info dict (which
    gets "rotation" once the first frame says it).

    A frame with display rotation (a phone's MP4, filmed sideways) is turned upright as a player would
    show it, before anything is resized. Any pixel format FFmpeg knows (grayscale, 4:2:2, odd sizes)
    is converted to RGB. A file that is not
    a video, holds no frame, changes frame size or ends before its header's frame count is a
    BadVideoError naming the file."""
    import av

    def bad(problem):
        return BadVideoError(class_name, video, path, problem)

    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise bad(f"not a readable video ({e.strerror or type(e).__name__})") from None
    with container:
        if not container.streams.video:
            raise bad("not a video: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        info = {"fps": round(float(rate), 3), "declared_frames": int(stream.frames or 0)}
        yield info
        size, n = None, 0
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.height, frame.width)
                    rotation = getattr(frame, "rotation", 0) or 0  # degrees counter-clockwise to show it upright (PyAV >= 13)
                    info["rotation"] = int(round(rotation / 90)) % 4 * 90
                elif (frame.height, frame.width) != size:
                    raise bad(f"frame size changes from {size[1]}x{size[0]} to {frame.width}x{frame.height} at frame {n}")
                n += 1
                image = frame.to_ndarray(format="rgb24")
                yield np.ascontiguousarray(np.rot90(image, info["rotation"] // 90)) if info["rotation"] else image
        except av.FFmpegError as e:
            raise bad(f"undecodable at frame {n} ({e.strerror or type(e).__name__})") from None
        declared = int(stream.frames or 0)
        if n == 0:
            raise bad("no frames could be decoded (empty or truncated file)")
        if declared and declared - n > max(2, declared // 50):  # a few missing frames are common in AVI files
            raise bad(f"truncated: decoded {n} of the {declared} frames its header promises")


def center_crop(frames: np.ndarray, side: int) -> np.ndarray:
    """The centered side x side window of frames (..., H, W, channels)."""
    h, w = frames.shape[-3:-1]
    top, left = (h - side) // 2, (w - side) // 2
    return frames[..., top:top + side, left:left + side, :]


def upsample_lr(tiny: np.ndarray, size: tuple) -> np.ndarray:
    """An LR frame (lr_h, lr_w, 3) back at the frame size (h, w): what C3D's LR streams see."""
    import cv2

    return cv2.resize(tiny, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def clip_stacks(streams: dict, units: int, side: int) -> dict:
    """{stream: uint8 (units, 16, side, side, 3)} of the four streams' frames at the frame size (LR RGB
    upsampled), center-cropped and cut into units: what C3D reads."""
    shape = (units, CLIP_FRAMES, side, side, 3)
    return {name: np.ascontiguousarray(center_crop(streams[name], side)).reshape(shape) for name in STREAM_ORDER}


def video_streams(path: str, class_name: str, video: str, opts: FrameOptions, raft=None, lr_up: bool = True) -> tuple:
    """Decode `path` into its four streams before any crop: (info, {stream: uint8 (frames, ...)}), with
    as many frames as its units cover: hr_rgb, lr_rgb (tiny: at opts.lr_size), lr_up (the tiny frames
    back at the resized size; lr_up=False: not stacked, for a caller that keeps the tiny ones),
    hr_flow, lr_flow (flow images at the resized size). `raft`: the loaded model for --flow raft."""
    import cv2

    frames = decode_frames(path, class_name, video)
    info = next(frames)
    h, w = opts.resized
    lr_h, lr_w = opts.lr_size
    resized, tiny = {"hr": [], "lr": []}, []  # stream -> RGB frames at h x w; the LR frames at lr_h x lr_w
    for frame in frames:
        if "size" not in info:
            info["size"] = list(frame.shape[:2])
        shrink = frame.shape[0] >= h and frame.shape[1] >= w
        resized["hr"].append(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
        tiny.append(cv2.resize(frame, (lr_w, lr_h), interpolation=cv2.INTER_AREA))
        resized["lr"].append(upsample_lr(tiny[-1], (h, w)))
    n = len(tiny)
    units = max(1, n // CLIP_FRAMES)
    used = units * CLIP_FRAMES  # frames the units cover (a short video: its frames, then repeats of the last)
    info.update(frames=n, units=units)
    to_full = 171 / w  # flow in pixels of the 128x171 frame, whatever --crop-size

    def padded(stack):
        return np.stack(stack + [stack[-1]] * (used - len(stack)))

    streams = {"lr_rgb": padded(tiny[:used])}
    for stream, images in resized.items():
        images = images[: used + 1]  # the frame after the last unit still gives that unit its last flow
        if stream == "hr" or lr_up:
            streams["hr_rgb" if stream == "hr" else "lr_up"] = padded(images[:used])
        flow = [flow_to_image(motion * to_full, opts.flow_bound) for motion in consecutive_flows(images, opts, raft)]
        # the last frame has no successor: it repeats the last flow (a one-frame video: no motion)
        streams[f"{stream}_flow"] = padded(flow[:used] or [flow_to_image(np.zeros((h, w, 2), np.float32), opts.flow_bound)])
    return info, streams


def prepare_video(path: str, class_name: str, video: str, opts: FrameOptions, raft=None) -> PreparedVideo:
    """Decode `path` and build its four center-cropped clip stacks (see the module docstring)."""
    info, streams = video_streams(path, class_name, video, opts, raft)
    streams["lr_rgb"] = streams.pop("lr_up")
    return PreparedVideo(class_name, video, clip_stacks(streams, info["units"], opts.side), info)


def consecutive_flows(images: list, opts: FrameOptions, raft=None, pairs_per_batch: int = 32):
    """Flow (h, w, 2) from each frame to the next, for RGB frames at h x w."""
    if opts.flow != "raft":
        import cv2

        flow_fn = cv_flow_function(opts.flow)
        gray = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in images]
        for prev, nxt in zip(gray, gray[1:]):
            yield flow_fn(prev, nxt)
        return
    import torch

    device = next(raft.parameters()).device
    frames = torch.from_numpy(np.stack(images)).to(device)  # (T, h, w, 3) uint8
    for start in range(0, len(images) - 1, pairs_per_batch):
        stop = min(start + pairs_per_batch, len(images) - 1)
        yield from raft_flow(raft, frames[start:stop], frames[start + 1:stop + 1]).cpu().numpy()
