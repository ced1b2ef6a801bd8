"""A step on the device: its micro-batches joined into one tensor per model input, and copied to the GPU
on a side stream while the previous step computes."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


# Model inputs of a training step, per --train-on: each input holds these fields' sequences, one
# after the other. With lr+hr every video is trained twice through the same weights, as its LR and
# its HR sequence (the paper's coupling): sequences 0..N-1 are LR, N..2N-1 are HR.
TRAIN_INPUTS = {
    "lr+hr": {"rgb": ("lr_rgb", "hr_rgb"), "flow": ("lr_flow", "hr_flow")},
    "lr": {"rgb": ("lr_rgb",), "flow": ("lr_flow",)},
    "hr": {"rgb": ("hr_rgb",), "flow": ("hr_flow",)},
}


def input_fields(inputs: dict) -> tuple:
    """The sample fields a layout of model inputs reads, LR before HR."""
    return tuple(f for group in zip(*inputs.values()) for f in group)


TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def merge_to_device(micro_batches, inputs: dict, device, non_blocking=False) -> dict:
    """Join a step's micro-batches into one (total units, D) tensor per model input, on `device`.

    `inputs` maps each input to the fields it stacks (see TRAIN_INPUTS): its sequences go end to end,
    field after field, in one concatenate into a tensor allocated once (pinned on CUDA, then one copy to
    the GPU); lengths and labels are repeated to match. pack_units turns the result into the GRUs' input."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    lengths = torch.cat([mb["lengths"] for mb in micro_batches])
    labels = torch.cat([mb["labels"] for mb in micro_batches])
    copies = len(next(iter(inputs.values())))
    out = {"lengths": lengths.repeat(copies),
           "labels": labels.repeat(copies).to(device, non_blocking=non_blocking)}
    units = copies * int(lengths.sum())
    joins = []  # (parts, destination) of the host-side copies, run together below
    for name, fields in inputs.items():
        # a field of a micro-batch: one block (from a worker) or its samples' arrays (in-process)
        blocks = [mb[f] for f in fields for mb in micro_batches]
        if cuda and all(isinstance(b, torch.Tensor) and b.is_pinned() for b in blocks):  # pinned arenas
            out[name], row = torch.empty((units, blocks[0].shape[1]), dtype=blocks[0].dtype, device=device), 0
            for b in blocks:
                out[name][row:row + len(b)].copy_(b, non_blocking=non_blocking)
                row += len(b)
        else:  # numpy's concatenate copies 1.6-1.8x faster than torch.cat here (many small parts)
            parts = [a for b in blocks for a in ([b.numpy()] if isinstance(b, torch.Tensor) else b)]
            host = torch.empty((units, parts[0].shape[1]), dtype=TORCH_DTYPES[parts[0].dtype], pin_memory=cuda)
            joins.append((parts, host.numpy()))
            out[name] = host
    concatenate_parallel(joins)
    if cuda:
        out.update({name: t.to(device, non_blocking=non_blocking) for name, t in out.items()
                    if name in inputs and t.device.type == "cpu"})
    return out


_COPY_POOLS = {}  # pid -> thread pool: a forked child gets its own (threads do not survive a fork)


def concatenate_parallel(joins):
    """np.concatenate(parts, out=out) for each (parts, out), all but the last on helper threads: numpy
    copies without the GIL, so a step's model inputs (RGB and flow) are copied on two cores at once."""
    if len(joins) < 2:
        for parts, dst in joins:
            np.concatenate(parts, out=dst)
        return
    pool = _COPY_POOLS.get(os.getpid())
    if pool is None:
        pool = _COPY_POOLS[os.getpid()] = ThreadPoolExecutor(len(joins) - 1, thread_name_prefix="elr-copy")
    pending = [pool.submit(np.concatenate, parts, out=dst) for parts, dst in joins[:-1]]
    np.concatenate(joins[-1][0], out=joins[-1][1])
    for f in pending:
        f.result()


class DevicePrefetcher:
    """On CUDA, copy step i+1 to the GPU on a side stream while step i computes; on CPU, pass through.
    `steps`: a StepLoader, whose release(group) gives back what a step held once it is copied."""

    def __init__(self, steps, inputs: dict, device):
        self.steps, self.inputs, self.device = steps, inputs, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _load(self, group):
        if not self.cuda:
            batch = merge_to_device(group, self.inputs, self.device)
            self.steps.release(group)  # the step has its own copy
            return group, batch, None
        with torch.cuda.stream(self.copy_stream):
            batch = merge_to_device(group, self.inputs, self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return group, batch, copied

    def __iter__(self):
        it = iter(self.steps)
        nxt = next(it, None)
        pending = self._load(nxt) if nxt is not None else None
        while pending is not None:
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
                for t in pending[1].values():
                    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                        t.record_stream(torch.cuda.current_stream(self.device))
                pending[2].synchronize()  # issued a step ago: done; the ring blocks it read are free
                self.steps.release(pending[0])
            group, batch, _ = pending
            nxt = next(it, None)
            pending = self._load(nxt) if nxt is not None else None  # next copy overlaps this step's compute
            yield group, batch


def padded_units(micro_batches) -> tuple:
    """(real units, units of a padded layout of the micro-batches, each to its longest video).

    They measure how well bucketing matches lengths; nothing is padded here (see collate)."""
    real = sum(int(mb["lengths"].sum()) for mb in micro_batches)
    return real, sum(len(mb["lengths"]) * int(mb["lengths"].max()) for mb in micro_batches)


def padding_fraction(micro_batches) -> float:
    """Share of a padded layout of the micro-batches that would be padding."""
    real, total = padded_units(micro_batches)
    return 1.0 - real / total
