"""make-demo: a synthetic HMDB51-shaped feature tree in the seed's layout, learnable only from order.

Classes come in groups of three that share the same three motifs per stream, each class visiting
them in a different order: an order-blind classifier (mean pooling) is stuck at about 1/3 within a
group, a bidirectional RNN is not. HR units carry the motif at `hr_snr`, LR units at the lower
`lr_snr` (signal-to-noise after projecting on the motif), so HR coupling has something to teach.
Motifs and noise live in a `latent_dim` space embedded in `dim` by a fixed random orthonormal basis,
so the task is as hard at dim 4096 as at dim 32.
"""

import os
from dataclasses import dataclass

import numpy as np

from .schema import STREAMS
from .source import PHASES

HMDB51_CLASSES = (
    "brush_hair cartwheel catch chew clap climb climb_stairs dive draw_sword dribble drink eat fall_floor "
    "fencing flic_flac golf handstand hit hug jump kick kick_ball kiss laugh pick pour pullup punch push "
    "pushup ride_bike ride_horse run shake_hands shoot_ball shoot_bow shoot_gun sit situp smile smoke "
    "somersault stand swing_baseball sword sword_exercise talk throw turn walk wave"
).split()
ORDERS = ((0, 1, 2), (2, 1, 0), (1, 2, 0))  # motif order of the 1st, 2nd, 3rd class of a group
# Real HMDB51 video names carry these characters; keys must survive them.
NAME_STEMS = ("April_09", "Amazing_#3_(HD)", "Bob's.Best!", "Tom&Jerry+Co", "clip.v2.final", "Faith_Rewarded")


@dataclass
class DemoConfig:
    classes: int = 51  # number of classes (HMDB51's names first)
    videos_per_class: int = 4  # per class and per phase
    dim: int = 4096  # feature dim (C3D fc6 is 4096)
    min_units: int = 4  # shortest video, in C3D units (lengths "uniform")
    max_units: int = 16  # longest video (lengths "uniform")
    lengths: str = "uniform"  # uniform: min..max units; hmdb51: drawn from the video's class in real HMDB51
    latent_dim: int = 32  # dimension of the space motifs and noise live in (embedded into dim)
    hr_snr: float = 4.0  # HR signal-to-noise per unit
    lr_snr: float = 2.0  # LR signal-to-noise per unit (extremely low resolution: weaker)
    seed: int = 0

    def __post_init__(self):
        if self.classes < 2 or self.videos_per_class < 1 or self.dim < 1:
            raise ValueError("classes >= 2, videos_per_class >= 1 and dim >= 1 are required")
        if not 3 <= self.min_units <= self.max_units:
            raise ValueError("need 3 <= min_units <= max_units (three motifs per video)")
        if self.lengths not in ("uniform", "hmdb51"):
            raise ValueError(f"lengths must be 'uniform' or 'hmdb51', got {self.lengths!r}")


def hmdb51_units() -> dict:
    """{class: (units, videos)} of real HMDB51 (shards/data/hmdb51-units.tsv: all 6,766 clips, C3D units
    per video = floor(frames / 16), at least 1; frame counts from the public vt-vl-lab/video-data-aug
    rawframes lists), plus "*": all classes together."""
    table = {}
    with open(os.path.join(os.path.dirname(__file__), "data", "hmdb51-units.tsv")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, units, videos = line.split("\t")
                table.setdefault(name, []).append((int(units), int(videos)))
                table.setdefault("*", []).append((int(units), int(videos)))
    return {c: (np.array([u for u, _ in rows]), np.array([v for _, v in rows], dtype=float)) for c, rows in table.items()}


def class_names(n: int) -> list:
    return [HMDB51_CLASSES[i] if i < len(HMDB51_CLASSES) else f"action_{i:03d}" for i in range(n)]


def make_demo(out: str, cfg: DemoConfig) -> dict:
    """Write `<out>/Split1/...`; returns counts {phase: videos}."""
    rng = np.random.default_rng(cfg.seed)
    names = class_names(cfg.classes)
    histograms = hmdb51_units() if cfg.lengths == "hmdb51" else None
    n_groups = (cfg.classes + 2) // 3
    latent = min(cfg.latent_dim, cfg.dim)
    # motifs[stream_kind][group] -> (3, latent) unit vectors; rgb and flow have their own
    motifs = {kind: _unit(rng.standard_normal((n_groups, 3, latent))) for kind in ("rgb", "flow")}
    basis = np.linalg.qr(rng.standard_normal((cfg.dim, latent)))[0].T  # (latent, dim), orthonormal rows
    split = os.path.join(out, "Split1")
    counts = {}
    for phase in PHASES:
        os.makedirs(os.path.join(split, phase), exist_ok=True)
        for c, name in enumerate(names):
            os.makedirs(os.path.join(split, phase, name), exist_ok=True)  # the seed reads its class list here
            for i in range(cfg.videos_per_class):
                video = f"{NAME_STEMS[(c + i) % len(NAME_STEMS)]}_{name}_{phase[0].lower()}_nm_np1_{i}"
                if histograms is None:
                    t = int(rng.integers(cfg.min_units, cfg.max_units + 1))
                else:  # the class's own length distribution (classes beyond HMDB51's 51: all clips')
                    units, clips = histograms.get(name, histograms["*"])
                    t = int(rng.choice(units, p=clips / clips.sum()))
                for stream, array in _video(rng, motifs, basis, c, t, cfg).items():
                    folder = os.path.join(split, f"{phase}_{STREAMS[stream]}", name)
                    os.makedirs(folder, exist_ok=True)
                    np.save(os.path.join(folder, video + ".npy"), array)
        counts[phase] = cfg.classes * cfg.videos_per_class
    return counts


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _video(rng, motifs, basis, label, t, cfg):
    """Four aligned float32 [t, dim] arrays for one video of class `label`."""
    order = ORDERS[label % 3]
    if t >= 3:  # three segments of random length >= 1, in the class's motif order
        cuts = np.sort(rng.choice(np.arange(1, t), size=2, replace=False))
        segment = np.searchsorted(cuts, np.arange(t), side="right")  # (T,) in {0, 1, 2}
    else:  # 1 or 2 units (real HMDB51 has many): the first motifs of the order, which still tell the classes apart
        segment = np.arange(t)
    out = {}
    for kind in ("rgb", "flow"):
        pattern = motifs[kind][label // 3][[order[s] for s in segment]]  # (T, latent) unit vectors
        for res, snr in (("hr", cfg.hr_snr), ("lr", cfg.lr_snr)):
            noise = rng.standard_normal(pattern.shape)  # N(0,1) per latent dim: its projection on a motif is N(0,1)
            out[f"{res}_{kind}"] = ((snr * pattern + noise) @ basis).astype(np.float32)  # (T, dim)
    return out
