"""Micro-batches between a loader worker and the trainer: built (collate), sent as places (as_spans) or
in a worker's ring (elr.arena), received (from_spans) and given back (free_step)."""

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
        batch.update(arena=(arena[0], region[0], region[1], shape, first.dtype.str),
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


def free_step(group) -> None:
    """Give a step's arena blocks back to their workers; their fields are gone from the micro-batches."""
    for mb in group:
        arena_end = mb.pop("_free", None)
        if arena_end:
            arena, end = arena_end
            arena.free(max(end, int(arena.counters[1])))
            for key in [k for k, v in mb.items() if isinstance(v, torch.Tensor) and v.dim() == 2]:
                del mb[key]
