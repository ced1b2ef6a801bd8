"""The loaders bench.peers times side by side: ours, LitData, Mosaic Streaming (MDS), plain WebDataset
and the seed's per-file loader, over the same videos, each handing out the same step."""

import multiprocessing
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.seed import SeedDataLayer
from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, input_fields
from elr.data import TORCH_DTYPES, concatenate_parallel, phase_shards
from shards.manifest import load_manifest
from shards.schema import STREAMS
from shards.source import discover

INPUTS = TRAIN_INPUTS["lr+hr"]
FIELDS = input_fields(INPUTS)  # lr_rgb, lr_flow, hr_rgb, hr_flow


# ---- the same videos, written the peers' ways


def source_videos(root):
    """[(key, label, {stream: path})] of the Train phase, in a fixed order."""
    tree = discover(root, ["Split1"])
    return [(v.key, tree.classes.index(v.class_name), dict(zip(STREAMS, v.paths)))
            for v in tree.phases[("Split1", "Train")]]


def read_video(item):
    key, label, paths = item
    return {"key": key, "label": label, **{f: np.load(paths[f], allow_pickle=False) for f in FIELDS}}


def write_litdata(videos, out):
    import litdata

    method = multiprocessing.get_start_method()
    litdata.optimize(fn=read_video, inputs=videos, output_dir=out, chunk_bytes="64MB", num_workers=2,
                     mode="overwrite")
    # optimize() switches the whole process to "spawn": every DataLoader worker timed after it would
    # then re-import torch each epoch (LitData 1 worker: 598 seq/s instead of ~4,000), and MDS workers
    # would import torchvision through `import streaming` and die (see mds_api)
    multiprocessing.set_start_method(method, force=True)


def mds_api():
    """Mosaic Streaming's (MDSWriter, StreamingDataset). `import streaming` runs the package's __init__,
    which imports torchvision for its vision datasets; torchvision must match torch's build exactly
    and fails to load beside a locally built torch. MDS itself needs none of it, so where that import
    fails, the package's own modules are loaded from where pip put them, without its __init__."""
    try:
        from streaming import MDSWriter, StreamingDataset
    except (ImportError, RuntimeError):
        import importlib.util
        import types

        for name in [m for m in sys.modules if m == "streaming" or m.startswith("streaming.")]:
            del sys.modules[name]  # the half-imported package
        spec = importlib.util.find_spec("streaming")
        package = types.ModuleType("streaming")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["streaming"] = package
        from streaming.base import MDSWriter, StreamingDataset
    return MDSWriter, StreamingDataset


def write_mds(videos, out):
    MDSWriter, _ = mds_api()
    columns = {"key": "str", "label": "int", **{f: "ndarray:float32" for f in FIELDS}}
    with MDSWriter(out=out, columns=columns, size_limit=64 << 20) as writer:
        for item in videos:
            writer.write(read_video(item))


def disk_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


# ---- loaders: each yields steps as (keys, sequences)


def concat_collate(samples):
    """The peers' step, as ours hands it out: every video's LR units end to end, then its HR units."""
    parts = {name: [np.asarray(s[f]) for f in fields for s in samples] for name, fields in INPUTS.items()}
    out = {name: torch.empty((sum(map(len, p)), p[0].shape[1]), dtype=TORCH_DTYPES[p[0].dtype]) for name, p in parts.items()}
    concatenate_parallel([(parts[name], out[name].numpy()) for name in INPUTS])  # as ours joins a step
    lengths = torch.tensor([s["lr_rgb"].shape[0] for s in samples] * 2)
    labels = torch.tensor([int(s["label"]) for s in samples] * 2)
    return {"keys": [s["key"] for s in samples], "lengths": lengths, "labels": labels, **out}


def pad_collate(samples):
    """The peers' step, padded (--peer-collate pad): LR then HR sequences, padded to the batch's longest video."""
    longest = max(s["lr_rgb"].shape[0] for s in samples)
    dim = samples[0]["lr_rgb"].shape[1]
    out = {name: torch.zeros(2 * len(samples), longest, dim) for name in ("rgb", "flow")}
    for name, (lr, hr) in INPUTS.items():
        for i, s in enumerate(samples):
            for j, field in enumerate((lr, hr)):
                x = torch.as_tensor(s[field])
                out[name][j * len(samples) + i, :len(x)] = x
    lengths = torch.tensor([s["lr_rgb"].shape[0] for s in samples] * 2)
    labels = torch.tensor([int(s["label"]) for s in samples] * 2)
    return {"keys": [s["key"] for s in samples], "lengths": lengths, "labels": labels, **out}


def webdataset_sample(sample):
    """A plain-webdataset tar sample -> the dict pad_collate reads."""
    import json

    meta = json.loads(sample["json"])
    return {"key": sample["__key__"], "label": meta["label"],
            **{f: np.load(__import__("io").BytesIO(sample[f"{f}.npy"]), allow_pickle=False) for f in FIELDS}}


class Loaders:
    def __init__(self, args, shards, lit, mds, root):
        self.args, self.shards, self.lit_dir, self.mds_dir, self.root = args, shards, lit, mds, root
        self.videos = args.batch_size // 2
        self.plan = StreamPlan(phase_shards(load_manifest(shards), shards, "Split1", ["Train"]), 8, self.videos // 8)
        self.ours_ds = {}
        self.collate = pad_collate if args.peer_collate == "pad" else concat_collate
        self.peer_ds = {}

    def ours(self, workers, epoch):
        if workers not in self.ours_ds:  # one loader per setting, as train/ddp.py keeps one (and its workers)
            self.ours_ds[workers] = StepLoader(ShardStream(self.plan, 0, 1, FIELDS, seed=0), workers)
        steps = self.ours_ds[workers]
        steps.dataset.set_position(epoch)
        for group, batch in DevicePrefetcher(steps, INPUTS, "cpu"):
            yield [k for mb in group for k in mb["keys"]], len(batch["labels"])

    def litdata(self, workers, epoch):
        import litdata

        ds = self.peer_ds.get(("lit", workers))
        if ds is None:  # one dataset and loader per setting: LitData counts epochs itself
            decode = int(self.args.batch_decode) if self.args.batch_decode.isdigit() else self.args.batch_decode
            ds = litdata.StreamingDataset(self.lit_dir, shuffle=True, seed=0, batch_decode=decode)
            loader = litdata.StreamingDataLoader(ds, batch_size=self.videos, num_workers=workers,
                                                 collate_fn=self.collate)
            self.peer_ds[("lit", workers)] = ds = loader
        for batch in ds:
            yield batch["keys"], len(batch["labels"])

    def mds(self, workers, epoch):
        _, StreamingDataset = mds_api()
        ds = self.peer_ds.get(("mds", workers))
        if ds is None:
            ds = StreamingDataset(local=self.mds_dir, shuffle=True, shuffle_seed=0, batch_size=self.videos)
            self.peer_ds[("mds", workers)] = ds
        loader = DataLoader(ds, batch_size=self.videos, num_workers=workers, collate_fn=self.collate)
        for batch in loader:
            yield batch["keys"], len(batch["labels"])

    def webdataset(self, workers, epoch):
        import webdataset as wds

        urls = [s.url for s in self.plan.shards]
        ds = wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, empty_check=False,
                            workersplitter=wds.split_by_worker).shuffle(256, seed=epoch).map(webdataset_sample)
        loader = DataLoader(ds, batch_size=self.videos, num_workers=workers, collate_fn=self.collate)
        for batch in loader:
            yield batch["keys"], len(batch["labels"])

    def seed(self, workers, epoch):
        ds = SeedDataLayer(os.path.join(self.root, "Split1"), "Train")
        for rgb, flow, lengths, labels in DataLoader(ds, batch_size=self.args.batch_size, shuffle=True,
                                                     num_workers=workers):
            yield None, len(labels)
