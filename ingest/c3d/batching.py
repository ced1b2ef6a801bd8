"""C3D over the units of many videos at once: fixed-size batches on the extraction device.

Clips of consecutive videos share a batch, so a GPU never waits on one short video. Every batch has
exactly `batch_size` clips (the last one is padded with zeros) and C3D's output for a clip does not
depend on the other clips of its batch, so a video's features are the same bytes whatever it was
batched with: after --resume, or when workers finish in another order.
"""

from collections import deque
from contextlib import nullcontext

import numpy as np
import torch

from .network import C3D_MEAN_BGR, FEATURE_DIM, clips_to_input

NETWORK_OF_STREAM = {"hr_rgb": "rgb", "lr_rgb": "rgb", "hr_flow": "flow", "lr_flow": "flow"}


class FeatureBatcher:
    """`add(video)` the prepared videos in order; `done()` yields (video, {stream: float32 (units, 4096)})
    once all its clips have run; `flush()` runs what is left."""

    def __init__(self, networks: dict, device: torch.device, batch_size: int, dtype: str = "float32",
                 memory_format=torch.channels_last_3d):
        self.device, self.batch_size = device, batch_size
        self.cuda = device.type == "cuda"
        if self.cuda:  # the same bytes run to run (cuDNN's autotuner may pick another algorithm each time)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        # channels_last_3d: oneDNN's and cuDNN's fastest convolution layout (on 2 CPU cores, batch 8,
        # 112x112: 1.3x the contiguous layout, bench/features.py), with features equal within float rounding
        self.networks = {kind: net.to(device, memory_format=memory_format).eval() for kind, net in networks.items()}
        self.memory_format = memory_format
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
        self.mean = torch.tensor(C3D_MEAN_BGR, device=device)
        self.queue = {kind: deque() for kind in self.networks}  # kind -> deque of (entry, stream, unit, clip)
        self.in_flight = []  # (features on the device, targets) of the batch launched last
        self.pending = deque()  # entries in arrival order: [video, {stream: array}, clips left]

    def add(self, video) -> None:
        units = next(iter(video.clips.values())).shape[0]
        entry = [video, {s: np.empty((units, FEATURE_DIM), np.float32) for s in video.clips}, units * len(video.clips)]
        self.pending.append(entry)
        for stream, clips in video.clips.items():
            queue = self.queue[NETWORK_OF_STREAM[stream]]
            queue.extend((entry, stream, u, clips[u]) for u in range(units))
        for kind, queue in self.queue.items():
            while len(queue) >= self.batch_size:
                self._run(kind, [queue.popleft() for _ in range(self.batch_size)])

    def flush(self) -> None:
        for kind, queue in self.queue.items():
            while queue:
                self._run(kind, [queue.popleft() for _ in range(min(self.batch_size, len(queue)))])
        self._collect()

    def done(self):
        while self.pending and self.pending[0][2] == 0:
            video, features, _ = self.pending.popleft()
            video.clips = None  # free the uint8 clips early
            yield video, features

    def _run(self, kind: str, items: list) -> None:
        host = np.zeros((self.batch_size, *items[0][3].shape), np.uint8)  # zero clips pad the last batch
        for i, item in enumerate(items):
            host[i] = item[3]
        batch = torch.from_numpy(host)
        if self.cuda:  # pinned host memory: the copy overlaps the previous batch's compute
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast:
            x = clips_to_input(batch, self.mean).contiguous(memory_format=self.memory_format)  # (B, 3, 16, S, S)
            features = self.networks[kind](x)[: len(items)]  # (n, 4096)
        self._collect()  # the batch before this one: on a GPU its compute is done or nearly
        self.in_flight = [(features, [(entry, stream, unit) for entry, stream, unit, _ in items])]

    def _collect(self) -> None:
        for features, targets in self.in_flight:
            values = features.float().cpu().numpy()
            for row, (entry, stream, unit) in zip(values, targets):
                entry[1][stream][unit] = row
                entry[2] -= 1
        self.in_flight = []
