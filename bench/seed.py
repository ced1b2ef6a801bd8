"""The seed's own data path, as baselines: its per-file HMDB51DataLayer and one optimiser step."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class SeedDataLayer(Dataset):
    """The seed's HMDB51DataLayer: every (video, resolution) is one item, read from its own files,
    L2-normalised per unit in numpy and zero-padded to the longest video of the split."""

    def __init__(self, split_root, phases):
        self.items, self.max_length = [], 0
        for phase in [phases] if isinstance(phases, str) else phases:  # the seed trains on Train + Validation
            base = os.path.join(split_root, phase)
            for label, c in enumerate(sorted(os.listdir(base))):
                for name in sorted(os.listdir(f"{base}_lr_features/{c}")):
                    length = np.load(f"{base}_lr_features/{c}/{name}", mmap_mode="r").shape[0]
                    for res in ("lr", "hr"):
                        self.items.append((f"{base}_{res}_features/{c}/{name}",
                                           f"{base}_{res}_optfl_features/{c}/{name}", length, label))
                    self.max_length = max(self.max_length, length)

    def _load(self, path):
        x = np.load(path, allow_pickle=False).astype(np.float32)
        x /= np.linalg.norm(x, axis=1)[:, None]
        out = torch.zeros(self.max_length, x.shape[1])
        out[: len(x)] = torch.from_numpy(x)
        return out

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rgb, flow, length, label = self.items[i]
        return self._load(rgb), self._load(flow), length, label


def train_step(model, opt, inputs, labels, ctx):
    """One optimiser step; `inputs` are the model's arguments, L2-normalised."""
    with ctx:
        logits = model(*inputs)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
