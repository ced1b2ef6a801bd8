"""The epoch plan: which shards make each virtual stream, and the micro-batches cut from its shuffle windows.

An epoch's sample sequence (tar shards in an order shuffled by (seed, epoch), samples in stored order)
is cut into `n_streams` contiguous virtual streams of equal length (+-1). Every global step takes one
micro-batch of `micro_batch` videos from every stream. Rank r owns streams r, r+W, ...; DataLoader
worker k of a rank owns every K-th of those. So:
  - the videos of a global step do not depend on the world size (1 x 8 and 2 x 4 train the same),
  - every rank runs exactly `steps_per_epoch` steps (a stream's last slots repeat its first videos),
  - a rank reads only the shards of its own streams,
  - resuming at step s regenerates the epoch and skips s steps: the same order as an uninterrupted run.
"""

import math
import random
from dataclasses import dataclass

from shards.shardset import ShardRef, ShardSet, iter_pieces


def phase_shards(manifest: dict, root: str, split: str, phases) -> list:
    """[ShardRef] of the tar shards of the given phases (training reads Train and Validation), in
    manifest order."""
    return ShardSet(root, manifest).tar_shards(split, phases)


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
