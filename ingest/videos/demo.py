"""make-demo-videos: short synthetic clips in HMDB51's layout, told apart by how a shape moves.

OUT/videos/<class>/<video>.avi (MPEG-4 Part 2 in AVI, as HMDB51 ships) and OUT/splits/
<class>_test_split<K>.txt for K = 1, 2, 3 (1 train, 2 test, 0 the seed's validation). Each video is
a textured background with a coloured rectangle; its colour, size, start and speed vary per video,
its motion (the class) does not. At 12x16 pixels the rectangle is a few pixels wide and still moves.
"""

import os
from dataclasses import dataclass

import numpy as np

from shards.atomic import atomic_write

# class name -> (x velocity, y velocity, growth per frame), in frame widths/heights per clip
MOTIONS = {
    "slide_right": (0.7, 0, 0), "slide_left": (-0.7, 0, 0), "rise": (0, -0.7, 0), "fall": (0, 0.7, 0),
    "grow": (0, 0, 0.4), "shrink": (0, 0, -0.4), "drift_down_right": (0.5, 0.5, 0), "drift_up_left": (-0.5, -0.5, 0),
}


@dataclass
class DemoVideosConfig:
    classes: int = 6  # the first N motions of MOTIONS
    train: int = 8  # videos per class labelled 1 (Train) in split 1
    validation: int = 2  # labelled 0 (the seed's Validation)
    test: int = 4  # labelled 2 (Test)
    height: int = 240  # HMDB51's frame height
    width: int = 320
    min_frames: int = 48  # 3 C3D units
    max_frames: int = 80  # 5 units
    fps: int = 30
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.classes <= len(MOTIONS):
            raise ValueError(f"--classes must be 2..{len(MOTIONS)}, got {self.classes}")
        if min(self.train, self.test) < 1 or self.validation < 0:
            raise ValueError("--train and --test must be >= 1 and --validation >= 0 videos per class")
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ValueError(f"--size must be even and at least 16x16 (MPEG-4 needs even sides), "
                             f"got {self.height}x{self.width}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= --min-frames <= --max-frames, got {self.min_frames}..{self.max_frames}")


def render(rng: np.random.Generator, motion: tuple, frames: int, height: int, width: int) -> np.ndarray:
    """(frames, H, W, 3) uint8: a rectangle moving by `motion` over a smooth random background."""
    import cv2

    coarse = rng.integers(40, 200, (4, 5, 3)).astype(np.uint8)
    background = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    color = rng.integers(0, 256, 3)
    color[rng.integers(3)] = 255 if background.mean() < 128 else 0  # stands out from the background
    vx, vy, growth = motion
    size = rng.uniform(0.4, 0.55)  # of the frame's height
    speed = rng.uniform(0.8, 1.2)
    cx = 0.5 - vx * speed / 2 + rng.uniform(-0.1, 0.1)  # centre, as a fraction of the frame
    cy = 0.5 - vy * speed / 2 + rng.uniform(-0.1, 0.1)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        f = t / max(frames - 1, 1)
        s = size * (1 + growth * speed * (2 * f - 1) * 1.5)
        x, y = (cx + vx * speed * f) * width, (cy + vy * speed * f) * height
        half_h, half_w = s * height / 2, s * height / 2 * 1.3
        out[t] = background
        cv2.rectangle(out[t], (int(x - half_w), int(y - half_h)), (int(x + half_w), int(y + half_h)),
                      tuple(int(c) for c in color), thickness=-1)
    noise = rng.normal(0, 2, out.shape)  # a little sensor noise, so no two frames are equal
    return np.clip(out + noise, 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """Encode RGB frames as MPEG-4 in AVI, atomically."""
    import av

    with atomic_write(path) as f:
        with av.open(f, "w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": "3"}  # good quality: the motion survives encoding
            for image in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())


def make_demo_videos(out: str, cfg: DemoVideosConfig) -> int:
    """Write OUT/videos and OUT/splits; returns the number of videos."""
    rng = np.random.default_rng(cfg.seed)
    names = list(MOTIONS)[: cfg.classes]
    labels = ["1"] * cfg.train + ["0"] * cfg.validation + ["2"] * cfg.test  # split 1's labels
    n = 0
    for name in names:
        videos = []
        for i in range(len(labels)):
            video = f"demo_{name}_u_nm_np1_{i:02d}.avi"
            frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
            write_video(os.path.join(out, "videos", name, video),
                        render(rng, MOTIONS[name], frames, cfg.height, cfg.width), cfg.fps)
            videos.append(video)
            n += 1
        for k in (1, 2, 3):  # splits 2 and 3 rotate the labels, as HMDB51's splits differ
            rotated = labels[(k - 1) * cfg.test:] + labels[: (k - 1) * cfg.test]
            text = "".join(f"{v} {label} \n" for v, label in zip(videos, rotated))
            with atomic_write(os.path.join(out, "splits", f"{name}_test_split{k}.txt"), "w") as f:
                f.write(text)
    return n
