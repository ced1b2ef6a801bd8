"""Streaming shard loaders, in rooms: the epoch plan (plan), the hand-off between loader workers and the
trainer (handoff), a rank's steps (loader), a step on the device (device), and batches for evaluation
(evaluation). Shard sets themselves are opened with shards.shardset.ShardSet. The names below are the
package's public face."""

from shards.schema import LR

from .device import (TORCH_DTYPES, TRAIN_INPUTS, DevicePrefetcher, concatenate_parallel, input_fields, merge_to_device,
                     padded_units, padding_fraction)
from .evaluation import batches
from .handoff import InProcess, Places, Rings, as_spans, collate, from_spans
from .loader import ShardStream, StepLoader, auto_workers, worker_count
from .plan import ShardRef, StreamPlan, iter_pieces, phase_shards, stream_microbatches

__all__ = ["LR", "TORCH_DTYPES", "TRAIN_INPUTS", "DevicePrefetcher", "InProcess", "Places", "Rings", "ShardRef",
           "ShardStream", "StepLoader", "StreamPlan", "as_spans", "auto_workers", "batches", "collate",
           "concatenate_parallel",
           "from_spans", "input_fields", "iter_pieces", "merge_to_device", "padded_units", "padding_fraction",
           "phase_shards", "stream_microbatches", "worker_count"]
