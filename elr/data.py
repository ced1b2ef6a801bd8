"""Streaming shard loaders: virtual data streams, shuffle windows (length-sorted on request), equal steps per rank.

An epoch's sample sequence (tar shards in an order shuffled by (seed, epoch), samples in stored order)
is cut into `n_streams` contiguous virtual streams of equal length (+-1). Every global step takes one
micro-batch of `micro_batch` videos from every stream. Rank r owns streams r, r+W, ...; DataLoader
worker k of a rank owns every K-th of those. So:
  - the videos of a global step do not depend on the world size (1 x 8 and 2 x 4 train the same),
  - every rank runs exactly `steps_per_epoch` steps (a stream's last slots repeat its first videos),
  - a rank reads only the shards of its own streams,
  - resuming at step s regenerates the epoch and skips s steps: the same order as an uninterrupted run.
"""

import functools
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from elr.arena import Arena
from shards import remote
from shards.errors import ELRError, ManifestError
from shards.manifest import join_path, parse_rows
from shards.schema import LR
from shards.tario import iter_decoded_samples, mapped_bytes


@dataclass(frozen=True)
class ShardRef:
    """One tar shard as a loader sees it."""
    url: str  # local path or any fsspec URL
    samples: int
    spans: tuple | None = None  # each sample's (offset, bytes) in the shard: range reads of remote shards
    bytes: int | None = None  # the shard's size, as the manifest records it
    rows: tuple | None = None  # (table URL, start, end): where its spans are, read when first needed

    def sample_spans(self):
        return self.spans if self.spans is not None or self.rows is None else _spans_from_table(*self.rows)


@functools.lru_cache(maxsize=4096)
def _spans_from_table(table: str, start: int, end: int) -> tuple:
    """A remote shard's sample spans, from its rows of the sample table (a version 2 set)."""
    rows = parse_rows(remote.read_bytes(table, start, end), table)
    return tuple((r["offset"], r["bytes"]) for r in rows) if all("offset" in r for r in rows) else None


def phase_entry(manifest: dict, root: str, split: str, phase: str) -> dict:
    entry = manifest["splits"].get(split, {}).get(phase)
    if entry is None:
        have = ", ".join(f"{s}/{p}" for s in sorted(manifest["splits"]) for p in manifest["splits"][s])
        raise ManifestError(f"{root}: no {split}/{phase} in this shard set (it has {have})")
    return entry


def phase_shards(manifest: dict, root: str, split: str, phases) -> list:
    """[ShardRef] of the tar shards of the given phases, in manifest order."""
    shards = []
    for phase in phases:
        entry = phase_entry(manifest, root, split, phase)
        if "webdataset" not in entry:
            raise ManifestError(f"{root}: {split}/{phase} has no tar shards (built with --format zarr)")
        spans, listed = {}, entry["webdataset"]["shards"]
        for s in entry.get("samples", ()):  # version 1, or tables loaded
            if "offset" in s:
                spans.setdefault(s["shard"], []).append((s["offset"], s["bytes"]))
        for i, s in enumerate(listed):
            found = spans.get(os.path.basename(s["path"]))
            rows = None
            if "table" in entry and remote.is_url(root):  # only remote shards need spans (range reads)
                end = listed[i + 1]["table_offset"] if i + 1 < len(listed) else entry["table"]["bytes"]
                rows = (join_path(root, entry["table"]["path"]), s["table_offset"], end)
            shards.append(ShardRef(join_path(root, s["path"]), s["samples"],
                                   tuple(found) if found and len(found) == s["samples"] else None, s["bytes"], rows))
    return shards


@dataclass
class StreamPlan:
    """How one epoch is cut: computed from the manifest alone, identical on every rank."""
    shards: list  # [ShardRef]
    n_streams: int  # virtual streams (a multiple of the world size)
    micro_batch: int  # videos per stream per step

    def __post_init__(self):
        self.shards = [s if isinstance(s, ShardRef) else ShardRef(*s) for s in self.shards]  # (url, samples) too

    @property
    def n_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.n_samples / self.n_streams) / self.micro_batch)

    def stream_pieces(self, epoch: int, seed: int, stream: int) -> list:
        """[(ShardRef, skip, take)] that make up `stream` in `epoch`."""
        order = list(range(len(self.shards)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        n, v = self.n_samples, self.n_streams
        lo, hi = stream * n // v, (stream + 1) * n // v
        pieces, start = [], 0
        for i in order:
            shard, count = self.shards[i], self.shards[i].samples
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                pieces.append((shard, a - start, b - a))
            start += count
        return pieces


def iter_pieces(pieces, fields, keep: bool = False):
    """Decoded samples of [(ShardRef, skip, take)]; keep: see iter_decoded_samples."""
    for shard, skip, take in pieces:
        yield from iter_decoded_samples(shard.url, skip, take, shard.sample_spans(), fields, keep)


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


def stream_microbatches(plan: StreamPlan, epoch: int, seed: int, stream: int, fields, buffer: int,
                        bucket: bool = False):
    """Exactly `steps_per_epoch` micro-batches of stream `stream`, cut from shuffle windows of `buffer`
    videos; bucket=True sorts each window by length first (micro-batches of like lengths)."""
    m, steps = plan.micro_batch, plan.steps_per_epoch
    slots = steps * m
    rng = random.Random(f"{seed}:{epoch}:{stream}")
    buffer = max(m, buffer // m * m)  # a whole number of micro-batches

    def slots_filled():
        head, n = [], 0
        # keep=True: every epoch reads the same videos, so a process decodes each once (nothing here
        # changes a sample)
        for sample in iter_pieces(plan.stream_pieces(epoch, seed, stream), fields, keep=True):
            if len(head) < slots:
                head.append(sample)
            n += 1
            yield sample
        for i in range(slots - n):  # rounding: repeat the stream's first videos
            yield head[i % len(head)]

    def cut(window):
        rng.shuffle(window)
        if bucket:
            window.sort(key=lambda s: s[fields[0]].shape[0])  # stable: equal lengths stay shuffled
        batches = [window[i:i + m] for i in range(0, len(window), m)]
        rng.shuffle(batches)
        return batches

    window = []
    for sample in slots_filled():
        window.append(sample)
        if len(window) == buffer:
            yield from cut(window)
            window = []
    if window:
        yield from cut(window)


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
        if ds.handoff == "spans" and not any(remote.is_url(s.url) for s in plan.shards):
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


def free_step(group) -> None:
    """Give a step's arena blocks back to their workers; their fields are gone from the micro-batches."""
    for mb in group:
        arena_end = mb.pop("_free", None)
        if arena_end:
            arena, end = arena_end
            arena.free(max(end, int(arena.counters[1])))
            for key in [k for k, v in mb.items() if isinstance(v, torch.Tensor) and v.dim() == 2]:
                del mb[key]


def padded_units(micro_batches) -> tuple:
    """(real units, units of a padded layout of the micro-batches, each to its longest video).

    They measure how well bucketing matches lengths; nothing is padded here (see collate)."""
    real = sum(int(mb["lengths"].sum()) for mb in micro_batches)
    return real, sum(len(mb["lengths"]) * int(mb["lengths"].max()) for mb in micro_batches)


def padding_fraction(micro_batches) -> float:
    """Share of a padded layout of the micro-batches that would be padding."""
    real, total = padded_units(micro_batches)
    return 1.0 - real / total


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
    """On CUDA, copy step i+1 to the GPU on a side stream while step i computes; on CPU, pass through."""

    def __init__(self, steps, inputs: dict, device):
        self.steps, self.inputs, self.device = steps, inputs, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _load(self, group):
        if not self.cuda:
            batch = merge_to_device(group, self.inputs, self.device)
            free_step(group)  # the step has its own copy
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
                pending[2].synchronize()  # issued a step ago: done; the arena blocks it read are free
                free_step(pending[0])
            group, batch, _ = pending
            nxt = next(it, None)
            pending = self._load(nxt) if nxt is not None else None  # next copy overlaps this step's compute
            yield group, batch


def phase_samples(manifest: dict, root: str, split: str, phase: str, part: int = 0, parts: int = 1,
                  fields=LR, fmt: str = "auto"):
    """Samples (shards.schema) of one share of a phase: every video in exactly one of `parts` shares.

    From the Zarr copy (fmt "zarr", or "auto" for a local set that has one): a contiguous range of
    videos, reading only `fields`. From the tar shards: every parts-th shard."""
    entry = phase_entry(manifest, root, split, phase)
    use_zarr = fmt == "zarr" or (fmt == "auto" and "zarr" in entry and not remote.is_url(root))
    if not use_zarr:
        shards = phase_shards(manifest, root, split, [phase])[part::parts]
        yield from iter_pieces([(s, 0, s.samples) for s in shards], fields)
        return
    if "zarr" not in entry:
        raise ManifestError(f"{root}: {split}/{phase} has no Zarr copy (built with --format webdataset)")
    if remote.is_url(root):
        raise ManifestError(f"{root}: the Zarr copy is read from local sets only; use --format webdataset")
    from shards.zarrio import ZarrPhaseReader  # zarr takes 0.3 s to import: training never reads Zarr

    reader = ZarrPhaseReader(os.path.join(root, entry["zarr"]["path"]))
    n = len(reader)
    yield from reader.iter_range(n * part // parts, n * (part + 1) // parts, fields=fields)


def batches(samples, fields, batch: int):
    """Ordered, unpadded batches (collate) of a sample iterator."""
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch:
            yield collate(chunk, fields, 0, 0)
            chunk = []
    if chunk:
        yield collate(chunk, fields, 0, 0)
