"""Micro-batches between where they are read and the trainer: built (collate), and handed over in one of
three modes, each a small class: InProcess (no hand-off), Places (workers send where videos lie in the
shard files) and Rings (workers copy into shared, page-locked rings)."""

import numpy as np
import torch

from shards.tario import mapped_bytes


def collate(samples, fields, stream: int, step: int, concat: bool = True, arena=None) -> dict:
    """A micro-batch: lengths, labels and keys, and per field the videos' (units, D) sequences end to end.

    Nothing is padded: the step's GRUs read packed sequences (elr.model.pack_units), so padding would
    only be copied, moved to the device and skipped. concat=True (in a DataLoader worker): each field
    is one (total units, D) tensor, and all are views of one block: written into the worker's `arena`
    when it has room (only the block's place travels, see elr.arena), else one shared-memory segment.
    concat=False (in-process): each field is the list of the samples' own arrays, views of the shard
    maps; the step assembly copies them, once."""
    lengths = [s[fields[0]].shape[0] for s in samples]
    counts = torch.tensor([lengths, [s["meta"]["label"] for s in samples]])  # (2, B): lengths, labels
    batch = {"stream": stream, "step": step, "keys": [s["__key__"] for s in samples],
             "lengths": counts[0], "labels": counts[1]}
    if not concat:
        batch.update({f: [s[f] for s in samples] for f in fields})
        return batch
    first = samples[0][fields[0]]
    shape = (len(fields), sum(lengths), first.shape[1])
    region = arena[1].reserve(int(np.prod(shape)) * first.dtype.itemsize) if arena else None
    block = arena[1].array(region[0], shape, first.dtype) if region else np.empty(shape, dtype=first.dtype)
    for j, f in enumerate(fields):
        np.concatenate([s[f] for s in samples], out=block[j])
    if region:
        arena[1].commit(region[1])
        # no tensors in what crosses: the DataLoader would give each one its own shared-memory segment
        batch.update(ring=(arena[0], region[0], region[1], shape, first.dtype.str),
                     lengths=counts[0].numpy(), labels=counts[1].numpy())
        return batch
    tensors = torch.from_numpy(block)
    batch.update({f: tensors[j] for j, f in enumerate(fields)})
    return batch


def as_spans(samples: list, batch: dict, fields):
    """A micro-batch (collate's in-process form) with each field's arrays replaced by where they lie in
    the shard files (file, byte offset, units): what a worker sends for the "spans" hand-off, a few bytes
    a video. None unless every sample says where it lies (a remote shard's do not): then it is copied."""
    files, rows = {}, []
    for s in samples:
        at = s.get("__at__")
        if at is None:
            return None
        k = files.setdefault(at[0], len(files))
        rows.append([k, *at[1]])
    rows = np.array(rows, dtype=np.int64)  # (videos, 1 + fields): the file, then each field's offset (decode order)
    placed = {f: (rows[:, 0], rows[:, 1 + i], [len(a) for a in batch[f]], batch[f][0].dtype.str, batch[f][0].shape[1])
              for i, f in enumerate(fields)}
    out = {k: v for k, v in batch.items() if k not in placed}
    # no tensors in what crosses: the DataLoader would give each one its own shared-memory segment
    out.update(spans=(list(files), placed), lengths=batch["lengths"].numpy(), labels=batch["labels"].numpy())
    return out


def from_spans(mb: dict) -> dict:
    """The inverse of as_spans, in the training process: each field's arrays viewed in this process's
    own maps of the same files (mapped on first use and kept, as in-process reading does)."""
    files, placed = mb.pop("spans")
    maps = [mapped_bytes(file) for file in files]
    for f, (file, offset, units, dtype, dim) in placed.items():
        dtype = np.dtype(dtype)
        mb[f] = [np.ndarray((n, dim), dtype, maps[k], o) for k, o, n in zip(file.tolist(), offset.tolist(), units)]
    mb["lengths"], mb["labels"] = torch.from_numpy(mb["lengths"]), torch.from_numpy(mb["labels"])
    return mb


# ---- the hand-off modes: chosen once per loader (StepLoader), each packs where a micro-batch is read
# (a DataLoader worker, or the training process), receives it in the trainer and releases it once
# the step has its own copy. A packed micro-batch says its form by the key it carries ("spans",
# "ring"); a mode falls back to plain shared-memory tensors for what it cannot carry.


class InProcess:
    """No hand-off: the training process reads its own steps, and a micro-batch holds the samples' own
    arrays (views of the shard maps), joined once by the step assembly."""
    steps_per_item = 1

    def pack(self, samples, fields, stream: int, step: int, worker: int) -> dict:
        return collate(samples, fields, stream, step, concat=False)

    def receive(self, mb: dict, fields) -> dict:
        return mb

    def release(self, mb: dict) -> None:
        pass


class Rings:
    """Workers copy each micro-batch into their own shared-memory ring (elr.arena; page-locked on CUDA,
    so the copy to the GPU reads it where it lies) and send only its place; where a ring has no room,
    or there are none, the micro-batch travels as one shared-memory tensor. Rings are sized for one
    step a DataLoader item (StepLoader._arenas)."""
    steps_per_item = 1

    def __init__(self, arenas: list):
        self.arenas = arenas  # one per DataLoader worker, or none

    def pack(self, samples, fields, stream: int, step: int, worker: int) -> dict:
        return collate(samples, fields, stream, step, arena=(worker, self.arenas[worker]) if self.arenas else None)

    def receive(self, mb: dict, fields) -> dict:
        """View the block where the worker wrote it (its fields stay until release)."""
        if "ring" in mb:
            worker, offset, _, shape, dtype = mb["ring"]
            block = self.arenas[worker].tensor(offset, shape, np.dtype(dtype))
            mb.update({f: block[j] for j, f in enumerate(fields)})
            mb["lengths"], mb["labels"] = torch.from_numpy(mb["lengths"]), torch.from_numpy(mb["labels"])
        return mb

    def release(self, mb: dict) -> None:
        """Give a ring block back to its worker; the micro-batch's fields, views of it, go with it."""
        place = mb.pop("ring", None)
        if place is not None:
            arena = self.arenas[place[0]]
            arena.free(max(place[2], int(arena.counters[1])))
            for key in [k for k, v in mb.items() if isinstance(v, torch.Tensor) and v.dim() == 2]:
                del mb[key]


# Steps a worker sends in one DataLoader item when it sends places: each item costs the trainer
# ~0.4 ms on 2 busy cores; 4 took 2 workers from 80% to 87% of the in-process rate here, and delay an
# epoch's first step by 4 of a worker's steps (a few ms, places only)
SPAN_STEPS = 4


class Places(Rings):
    """Workers send only where each video lies in the shard files (as_spans), and the trainer views the
    same files through its own kept maps (from_spans): the step is still copied once, by the trainer,
    while the reading and decoding happen in the workers. Videos without a place (a remote shard's)
    go through the rings, or as shared-memory tensors."""

    @property
    def steps_per_item(self) -> int:
        return 1 if self.arenas else SPAN_STEPS  # rings are sized for one step an item

    def pack(self, samples, fields, stream: int, step: int, worker: int) -> dict:
        return (as_spans(samples, collate(samples, fields, stream, step, concat=False), fields)
                or super().pack(samples, fields, stream, step, worker))

    def receive(self, mb: dict, fields) -> dict:
        return from_spans(mb) if "spans" in mb else super().receive(mb, fields)
