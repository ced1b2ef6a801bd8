"""A rank's steps: the micro-batches of its streams (ShardStream), read in this process or by DataLoader
workers that hand them over (StepLoader, elr.data.handoff)."""

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from elr.arena import Arena
from shards.errors import ELRError

from .handoff import InProcess, Places, Rings
from .plan import StreamPlan, stream_microbatches

IN_PROCESS = InProcess()


class ShardStream(IterableDataset):
    """This rank's micro-batches, in the order the step assembler expects (the epoch plan: elr.data.plan)."""

    def __init__(self, plan: StreamPlan, rank: int, world_size: int, fields, seed: int, buffer: int = 256,
                 bucket: bool = False):
        if world_size > plan.n_streams:
            raise ValueError(f"{world_size} ranks for {plan.n_streams} streams: a rank reads whole streams")
        self.plan, self.rank, self.world, self.fields = plan, rank, world_size, tuple(fields)
        self.seed, self.buffer, self.bucket = seed, buffer, bucket
        # streams rank, rank + W, ...: where W does not divide the streams, ranks hold one more or one
        # fewer (8 on 3: 3, 3, 2) and still run the same steps; the trainer weighs each rank's loss by
        # its share of the global batch (see train/ddp.py), so the update is the same
        self.streams = list(range(rank, plan.n_streams, world_size))
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
        """Read in this process: one item (the micro-batches of this rank's streams) per step."""
        return self.items(IN_PROCESS)

    def items(self, handoff):
        """Lists of micro-batches packed by `handoff`, in step order: a DataLoader worker k of K reads
        every K-th of the rank's streams and sends `handoff.steps_per_item` steps in an item (an item
        costs the trainer ~0.4 ms); every worker sends the same steps, so the DataLoader's round-robin
        completes the steps in order."""
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.streams[k::n_workers]
        epoch, start_step = self.epoch, self.start_step
        gens = [stream_microbatches(self.plan, epoch, self.seed, v, self.fields, self.buffer, self.bucket)
                for v in mine]
        per_item, item = handoff.steps_per_item, []
        for step in range(self.plan.steps_per_epoch):
            for v, gen in zip(mine, gens):
                samples = next(gen)
                if step >= start_step:
                    item.append(handoff.pack(samples, self.fields, v, step, k))
            if item and ((step + 1 - start_step) % per_item == 0 or step + 1 == self.plan.steps_per_epoch):
                yield item
                item = []


class _HandedOver(IterableDataset):
    """What the DataLoader iterates (and its workers receive a copy of): a stream with its hand-off."""

    def __init__(self, dataset: ShardStream, handoff):
        self.dataset, self.handoff = dataset, handoff

    def __iter__(self):
        return self.dataset.items(self.handoff)


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
    micro-batches over in one of two modes (`handoff`, elr.data.handoff). "spans" (Places, the default
    without pinned memory, i.e. on CPU): a worker sends only where each video lies in the shard files,
    and this process views the same files through its own kept maps, so the step is still copied
    once, here, while the reading and decoding happen in the workers. "arena" (Rings, the default with
    pin_memory, i.e. on CUDA): a worker copies its micro-batches into its own shared-memory ring
    (elr.arena), page-locked so that copies to the GPU read it directly and this process copies
    nothing on the host. Videos a worker cannot place (a remote shard's) go through the rings either way.
    Whoever consumes a step calls release(group) once it holds its own copy (DevicePrefetcher does).
    The workers live as long as the loader: a new process would fault in every page of the shard
    maps and its arena again each epoch (measured: most of an epoch's time at HMDB51's size).
    0: the training process reads each step when it needs it, with no hand-off between processes."""

    PREFETCH = 2  # DataLoader items each worker may have ready ahead (an item: one step or more)

    def __init__(self, dataset: ShardStream, num_workers: int = 2, pin_memory: bool = False,
                 arena_bytes: int | None = None, handoff: str | None = None):
        self.dataset, self.pin_memory, self.arena_bytes = dataset, pin_memory, arena_bytes
        self.num_workers = worker_count(len(dataset.streams), num_workers)
        self.mode = handoff or ("arena" if pin_memory else "spans")
        self._start_workers()

    def _start_workers(self) -> None:
        self.handoff = (Places if self.mode == "spans" else Rings)(self._arenas()) if self.num_workers else IN_PROCESS
        self.loader = DataLoader(_HandedOver(self.dataset, self.handoff), batch_size=None, collate_fn=_as_is,
                                 num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                 prefetch_factor=self.PREFETCH if self.num_workers else None)
        self.finished = True  # the last epoch ran to its end (else its workers hold undelivered blocks)

    def _arenas(self) -> list:
        """A ring per worker, with room for the steps it may have ready (PREFETCH items of one step),
        plus two steps' worth held by the trainer (one being assembled, one being copied to the GPU),
        twice over for uneven lengths; none where every micro-batch goes as places, or /dev/shm is small."""
        ds, plan, size = self.dataset, self.dataset.plan, self.arena_bytes
        if self.mode == "spans" and not any(s.is_remote for s in plan.shards):
            size = 0  # every micro-batch goes as places: no ring to fill
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
            return []  # the ordinary DataLoader hand-off: shared-memory tensors
        arenas = [Arena(size) for _ in range(self.num_workers)]
        if self.pin_memory:
            for a in arenas:
                a.pin()
        return arenas

    def __len__(self):
        return self.dataset.plan.steps_per_epoch - self.dataset.start_step

    def __iter__(self):
        if self.num_workers and not self.finished:  # an epoch left mid-way: start afresh
            self._start_workers()
        per_step, steps, step = len(self.dataset.streams), {}, self.dataset.start_step
        self.finished = False
        try:
            for item in self.loader:
                for mb in item:
                    steps.setdefault(mb["step"], []).append(self.handoff.receive(mb, self.dataset.fields))
                while len(steps.get(step, ())) == per_step:  # the steps this item completed, in order
                    yield sorted(steps.pop(step), key=lambda b: b["stream"])
                    step += 1
        except ELRError as e:
            raise worker_error(e) from None
        self.finished = True

    def release(self, group) -> None:
        """Give what a step's micro-batches hold (ring blocks) back to the workers: call once the step
        has its own copy."""
        for mb in group:
            self.handoff.release(mb)


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
