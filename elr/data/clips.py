"""Clips for fine-tuning C3D: a clip set's units in seeded batches, decoded by loader workers, made
into C3D's input on the device.

An epoch is a seeded permutation of the phase's units cut into global batches; step s of rank r of
W takes its W-th of batch s. A unit's crop and flip are drawn from (seed, epoch, unit) alone, so a
step holds the same clips whatever the world size, the loader workers or an interruption: resuming
at a step is exact. Host side (loader workers): decode, then for every stream stored at the frame
size a window crop and a horizontal flip (a flipped flow image's x channel mirrored about 128, its
no-motion value). Device side: LR RGB, stored at its low resolution, is upsampled to the frame size
(bilinear, as extract-features does on the CPU) and cropped and flipped the same way; a window
larger than the crop (a training crop smaller than the set's) is resized to it; frames become
C3D's B, G, R less the Sports-1M mean.
"""

import numpy as np
import torch
import torch.nn.functional as F

from shards.clips import STREAMS, ClipSet
from shards.errors import ELRError

from .loader import worker_error

LOW = "lr_rgb"  # the one stream stored at its low resolution


def epoch_order(units: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(units)


def unit_view(seed: int, epoch: int, unit: int, frame: tuple, window: int, train: bool, flips: bool = True) -> tuple:
    """(top, left, flip) of a unit's window: random for training (from seed, epoch and unit alone;
    flips=False: never flipped), the center without flip for evaluation."""
    h, w = frame
    if not train:
        return (h - window) // 2, (w - window) // 2, False
    rng = np.random.default_rng([seed, epoch, unit, 7])
    top, left, flip = int(rng.integers(0, h - window + 1)), int(rng.integers(0, w - window + 1)), rng.random() < 0.5
    return top, left, bool(flip and flips)


def dropout_keep(units, streams: int, seed: int, epoch: int, p: float, dim: int = 4096) -> torch.Tensor:  # C3D's fc6, fc7
    """(streams x units, 2, dim) bool: which of fc7's and fc8's inputs a clip keeps, drawn from (seed,
    epoch, unit, stream) alone, so a step drops the same features whatever the world size and however
    the run was interrupted. Drawn by the loader workers with the batch (the trainer only copies it)."""
    rows = [torch.rand(2, dim, generator=torch.Generator().manual_seed(hash((seed, epoch, int(u), s)) % (1 << 62)))
            for s in range(streams) for u in units]
    return torch.stack(rows) >= p


def mirror_flow_x(frames: np.ndarray) -> np.ndarray:
    """A horizontally flipped flow image's x channel: motion to the right becomes motion to the left
    (mirrored about 128, the image's zero)."""
    frames[..., 0] = np.minimum(256 - frames[..., 0].astype(np.int16), 255).astype(np.uint8)
    return frames


class ClipBatches(torch.utils.data.Dataset):
    """Item s: this rank's share of step s of the epoch, decoded and cropped on the host:
    {"unit", "label", "video": int64 (b,), "top", "left", "flip": (b,), stream: uint8 (b, 16, ...)},
    and with `dropout` > 0 "keep": the step's dropout masks (dropout_keep). For evaluation
    (train=False) item s is the s-th slice of the phase's units, strided over ranks."""

    def __init__(self, clips: ClipSet, split: str, phase: str, streams, window: int, batch: int, seed: int = 0,
                 epoch: int = 0, train: bool = True, rank: int = 0, world: int = 1, flips: bool = True,
                 dropout: float = 0.0):
        self.clips = clips
        self.split, self.phase, self.streams = split, phase, tuple(streams)
        self.window, self.batch, self.seed, self.epoch, self.train = window, batch, seed, epoch, train
        self.rank, self.world, self.flips, self.dropout = rank, world, flips, dropout if train else 0.0
        self.units = self.clips.units(split, phase)
        self.frame = tuple(self.clips.clips["size"])
        self.labels = np.array([row["label"] for row in self.clips.videos(split, phase)], np.int64)
        self.order = epoch_order(len(self.units), seed, epoch) if train else None  # the epoch's, drawn once

    def steps(self) -> int:
        if self.train:
            return len(self.units) // self.batch
        return -(-len(self.units) // (self.batch * self.world))

    def indices(self, step: int) -> np.ndarray:
        if self.train:
            share = self.batch // self.world
            start = step * self.batch + self.rank * share
            return self.order[start:start + share]
        everything = np.arange(self.rank, len(self.units), self.world)
        return everything[step * self.batch:(step + 1) * self.batch]

    def __len__(self):
        return self.steps()

    def __getitem__(self, step: int) -> dict:
        picked = self.indices(step)
        out = {"unit": torch.from_numpy(picked.astype(np.int64))}
        views = [unit_view(self.seed, self.epoch, int(u), self.frame, self.window, self.train, self.flips)
                 for u in picked]
        videos = np.array([self.units[u][2] for u in picked], np.int64)
        out.update(video=torch.from_numpy(videos), label=torch.from_numpy(self.labels[videos]),
                   top=torch.tensor([v[0] for v in views]), left=torch.tensor([v[1] for v in views]),
                   flip=torch.tensor([v[2] for v in views]))
        stacks = {s: [] for s in self.streams}
        for u, (top, left, flip) in zip(picked, views):
            sample = self.clips.read(self.split, self.phase, self.units[u], self.streams)
            for s in self.streams:
                frames = sample[s]
                if s != LOW:
                    frames = frames[:, top:top + self.window, left:left + self.window]
                    if flip:
                        frames = frames[:, :, ::-1]
                        if s.endswith("flow"):
                            frames = mirror_flow_x(frames.copy())
                stacks[s].append(np.ascontiguousarray(frames))
        out.update({s: torch.from_numpy(np.stack(v)) for s, v in stacks.items()})
        if self.dropout:
            out["keep"] = dropout_keep(picked, len(self.streams), self.seed, self.epoch, self.dropout)
        return out


def clip_loader(dataset: ClipBatches, start: int, workers: int, pin: bool):
    """Batches start.. of `dataset` through torch's DataLoader (pinned for a GPU); a damaged shard a
    worker meets is its one-line error, not the worker's traceback."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                                         num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None,
                                         persistent_workers=False)
    try:
        yield from loader
    except ELRError as e:
        raise worker_error(e) from None


def prefetched(batches, device: torch.device, keys: tuple):
    """Yield each batch with its `keys` on `device`. On CUDA the next batch's copy (from the pinned
    memory the DataLoader fills) runs on a side stream while the current step computes, as the
    feature loader's DevicePrefetcher does; elsewhere batches pass through."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def load(batch):
        with torch.cuda.stream(stream):
            return {k: v.to(device, non_blocking=True) if k in keys else v for k, v in batch.items()}

    it = iter(batches)
    pending = next(it, None)
    pending = load(pending) if pending is not None else None
    while pending is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)  # the copy is done before the step reads it
        for k in keys:
            if k in pending:  # (a batch without dropout masks has no "keep")
                pending[k].record_stream(current)  # its memory is not reused while the step still reads it
        batch, nxt = pending, next(it, None)
        pending = load(nxt) if nxt is not None else None  # overlaps the step that reads `batch`
        yield batch


def c3d_input(batch: dict, stream: str, frame: tuple, window: int, crop: int, mean: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """One stream of a batch as C3D's input on `device`: float (b, 3, 16, crop, crop), B, G, R less `mean`."""
    x = batch[stream].to(device, non_blocking=True)
    b, t = x.shape[:2]
    x = x.permute(0, 4, 1, 2, 3).float()  # (b, 3, 16, h, w), R, G, B
    if stream == LOW:
        x = F.interpolate(x.reshape(b, 3 * t, *x.shape[-2:]), size=frame, mode="bilinear", align_corners=False)
        x = x.round_().clamp_(0, 255)  # extract-features' LR frames are uint8 after the same upsampling
        tops, lefts, flips = batch["top"].tolist(), batch["left"].tolist(), batch["flip"].tolist()
        x = torch.stack([x[i, :, tp:tp + window, lf:lf + window].flip(-1) if fl else x[i, :, tp:tp + window, lf:lf + window]
                         for i, (tp, lf, fl) in enumerate(zip(tops, lefts, flips))]).reshape(b, 3, t, window, window)
    if window != crop:
        x = F.interpolate(x.reshape(b, 3 * t, window, window), size=(crop, crop), mode="bilinear", align_corners=False,
                          antialias=True).reshape(b, 3, t, crop, crop)
    return x.flip(1) - mean.to(device).view(1, 3, 1, 1, 1)


__all__ = ["STREAMS", "ClipBatches", "c3d_input", "clip_loader", "dropout_keep", "epoch_order", "mirror_flow_x",
           "prefetched", "unit_view"]
