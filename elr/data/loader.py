"""A rank's steps: the micro-batches of its streams (ShardStream), read in this process or by DataLoader
workers that hand them over (StepLoader, elr.data.handoff)."""

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from elr.arena import Arena
from shards.errors import ELRError

from .handoff import as_spans, collate, from_spans
from .plan import StreamPlan, stream_microbatches


# Steps a worker sends in one DataLoader item with the "spans" hand-off: each item costs the trainer
# ~0.4 ms on 2 busy cores; 4 took 2 workers from 80% to 87% of the in-process rate here, and delay an
# epoch's first step by 4 of a worker's steps (a few ms, places only)
SPAN_STEPS = 4


class ShardStream(IterableDataset):
    """This rank's micro-batches, in the order the step assembler expects; see the module docstring."""

    def __init__(self, plan: StreamPlan, rank: int, world_size: int, fields, seed: int, buffer: int = 256,
                 bucket: bool = False):
        if plan.n_streams % world_size:
            raise ValueError(f"n_streams ({plan.n_streams}) must be a multiple of the world size ({world_size})")
        self.plan, self.rank, self.world, self.fields = plan, rank, world_size, tuple(fields)
        self.seed, self.buffer, self.bucket = seed, buffer, bucket
        self.streams = list(range(rank, plan.n_streams, world_size))
        self.arenas = []  # one per DataLoader worker (StepLoader sets them up)
        self.handoff = "arena"  # how workers hand micro-batches over; StepLoader decides (see there)
        # (epoch, first step) in shared memory: persistent DataLoader workers hold copies of this
        # object made when they started, and read the position of each epoch from here
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @property
    def start_step(self) -> int:
        return int(self.position[1])

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.position[0], self.position[1] = epoch, step

    def __iter__(self):
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info else (0, 1)
        arena = (k, self.arenas[k]) if info and len(self.arenas) == n_workers else None
        mine = self.streams[k::n_workers]
        epoch, start_step = self.epoch, self.start_step
        gens = [stream_microbatches(self.plan, epoch, self.seed, v, self.fields, self.buffer, self.bucket)
                for v in mine]
        spans = info is not None and self.handoff == "spans"
        # a worker sends one DataLoader item per step (an item costs the trainer ~0.4 ms), or per
        # SPAN_STEPS steps when it sends only places; the same steps from every worker, so the
        # DataLoader's round-robin still completes the steps in order. Where micro-batches go through
        # the rings, one step an item: the rings are sized for that (StepLoader._setup_arenas)
        per_item = SPAN_STEPS if spans and not self.arenas else 1
        bundle = []
        for step in range(self.plan.steps_per_epoch):
            for v, gen in zip(mine, gens):
                samples = next(gen)
                if step < start_step:
                    continue
                if spans:  # placed, or copied if it cannot be (see as_spans)
                    bundle.append(as_spans(samples, collate(samples, self.fields, v, step, concat=False), self.fields)
                                  or collate(samples, self.fields, v, step, arena=arena))
                elif info is not None:  # copied into the worker's ring for the hand-off
                    bundle.append(collate(samples, self.fields, v, step, arena=arena))
                else:  # in-process: the samples' own arrays, joined once by the step assembly
                    yield collate(samples, self.fields, v, step, concat=False)
            if bundle and ((step + 1 - start_step) % per_item == 0 or step + 1 == self.plan.steps_per_epoch):
                yield {"bundle": bundle}
                bundle = []


def worker_count(streams_per_rank: int, wanted: int) -> int:
    """The most DataLoader workers (<= wanted) that split the rank's streams evenly (so steps stay in order)."""
    return max(k for k in range(1, max(1, wanted) + 1) if streams_per_rank % k == 0) if wanted > 0 else 0


def auto_workers(device) -> int:
    """Loader worker processes for `--workers -1`: 2 beside a GPU, none on CPU (see StepLoader)."""
    return 2 if torch.device(device).type == "cuda" else 0


def _as_is(micro_batch):
    """DataLoader's item hook: keep in-process micro-batches' arrays as they are (no tensor conversion)."""
    return micro_batch


class StepLoader:
    """Iterates a rank's epochs: each item is the list of its streams' micro-batches for one step.
    Iterate it once per epoch, after dataset.set_position(epoch, step).

    num_workers > 0: DataLoader worker processes read and decode ahead and hand each step's
    micro-batches over in one of two ways (`handoff`). "spans" (the default without pinned memory,
    i.e. on CPU): a worker sends only where each video lies in the shard files, and this process
    views the same files through its own kept maps, so the step is still copied once, here, while
    the reading and decoding happen in the workers. "arena" (the default with pin_memory, i.e. on
    CUDA): a worker copies its micro-batches into its own shared-memory ring (elr.arena), page-locked
    so that copies to the GPU read it directly and this process copies nothing on the host. Videos
    a worker cannot place (a remote shard's) go through the rings either way.
    Whoever consumes a step calls free_step(group) once it holds its own copy (DevicePrefetcher does).
    The workers live as long as the loader: a new process would fault in every page of the shard
    maps and its arena again each epoch (measured: most of an epoch's time at HMDB51's size).
    0: the training process reads each step when it needs it, with no hand-off between processes."""

    PREFETCH = 2  # DataLoader items each worker may have ready ahead (an item: one step or more)

    def __init__(self, dataset: ShardStream, num_workers: int = 2, pin_memory: bool = False,
                 arena_bytes: int | None = None, handoff: str | None = None):
        self.dataset, self.pin_memory, self.arena_bytes = dataset, pin_memory, arena_bytes
        self.num_workers = worker_count(len(dataset.streams), num_workers)
        # spans: workers send where each video lies in the shard files, and the trainer joins the step
        # from its own maps (one copy in all, as in-process, while the reading and decoding happen in the
        # workers); arena: workers copy micro-batches into shared rings, which on CUDA are page-locked
        # and copied to the GPU from there, so the trainer copies nothing on the host
        dataset.handoff = handoff or ("arena" if pin_memory else "spans")
        self._start_workers()

    def _start_workers(self) -> None:
        if self.num_workers:
            self._setup_arenas()
        self.loader = DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                 prefetch_factor=self.PREFETCH if self.num_workers else None)
        self.finished = True  # the last epoch ran to its end (else its workers hold undelivered blocks)

    def _setup_arenas(self) -> None:
        """Room per worker for the steps it may have ready (PREFETCH items of one step), plus two steps'
        worth held by the trainer (one being assembled, one being copied to the GPU), twice over for
        uneven lengths."""
        ds, plan, size = self.dataset, self.dataset.plan, self.arena_bytes
        if ds.handoff == "spans" and not any(s.is_remote for s in plan.shards):
            size = 0  # every micro-batch goes as spans: no ring to fill
        if size is None:
            per_step = len(ds.streams) // self.num_workers
            known = [s for s in plan.shards if s.bytes]
            per_sample = (sum(s.bytes for s in known) / max(1, sum(s.samples for s in known))) if known else 1 << 20
            micro_batch = plan.micro_batch * per_sample * len(ds.fields) / 4  # a shard sample holds 4 streams
            size = int(min(2 << 30, max(64 << 20, 2 * micro_batch * per_step * (self.PREFETCH + 2))))
            # shared memory lives in /dev/shm, often small in containers; a write past it is a SIGBUS
            size = min(size, shm_free() // (4 * self.num_workers))
            size = size if size >= 1 << 20 else 0
        if not size:
            ds.arenas = []  # the ordinary DataLoader hand-off
            return
        ds.arenas = [Arena(size) for _ in range(self.num_workers)]
        if self.pin_memory:
            for a in ds.arenas:
                a.pin()

    def __len__(self):
        return self.dataset.plan.steps_per_epoch - self.dataset.start_step

    def __iter__(self):
        if self.num_workers and not self.finished:  # an epoch left mid-way: start afresh
            self._start_workers()
        per_step, steps, step = len(self.dataset.streams), {}, self.dataset.start_step
        self.finished = False
        try:
            for item in self.loader:
                for mb in item["bundle"] if "bundle" in item else (item,):
                    steps.setdefault(mb["step"], []).append(self._received(mb))
                while len(steps.get(step, ())) == per_step:  # the steps this item completed, in order
                    yield sorted(steps.pop(step), key=lambda b: b["stream"])
                    step += 1
        except ELRError as e:
            raise worker_error(e) from None
        self.finished = True

    def _received(self, mb: dict) -> dict:
        """A micro-batch as the DataLoader delivered it -> its fields as arrays or tensors in this process."""
        if "arena" in mb:  # view the block where the worker wrote it
            worker, offset, end, shape, dtype = mb.pop("arena")
            arena = self.dataset.arenas[worker]
            block = arena.tensor(offset, shape, np.dtype(dtype))
            mb.update({f: block[j] for j, f in enumerate(self.dataset.fields)})
            mb["lengths"], mb["labels"] = torch.from_numpy(mb["lengths"]), torch.from_numpy(mb["labels"])
            mb["_free"] = (arena, end)
        elif "spans" in mb:
            from_spans(mb)
        return mb


def worker_error(e: ELRError) -> ELRError:
    """A domain error as its worker raised it: the DataLoader re-raises it with the worker's whole
    traceback as its message, and a user's mistake is one line."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = text.rstrip().splitlines()[-1]  # "shards.errors.RemoteError: <the message>"
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return type(e)(last[len(prefix):] if last.startswith(prefix) else last)


def shm_free() -> int:
    """Bytes free in /dev/shm, where shared tensors live."""
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0
