"""The one sample schema: what every reader (mapped tar, remote tar, Zarr) yields for a video.

    {"__key__": "v0123...",                       # unique, WebDataset-safe (no dots, no slashes)
     "meta": {"label": 3, "class": "chew", "video": "April_09_chew_...", "units": 7,
              "split": "Split1", "phase": "Test"},
     "hr_rgb": (units, dim) array, "lr_rgb": ..., "hr_flow": ..., "lr_flow": ...}  # those asked for

A reader asked for some streams only (the LR ones, say) leaves the others out.

One optional field says where a sample's bytes lie, for loaders that hand places instead of bytes
between processes (elr.data.handoff): a sample decoded from a local tar shard on the fast path
(shards.tario.SampleTable: every member of a stream shares one .npy layout, as build-shards writes)
also holds

     "__at__": ((path, (inode, size, mtime_ns)), [byte offset of each stream's array in that file])

with the offsets in the order of the streams asked for. Samples of remote shards, of Zarr stores and
of tars with mixed layouts have no "__at__"; nothing else may rely on it.
"""

# Stream field -> folder suffix in the seed's layout: <Phase>_<suffix>/<class>/<video>.npy
STREAMS = {
    "hr_rgb": "hr_features",
    "lr_rgb": "lr_features",
    "hr_flow": "hr_optfl_features",
    "lr_flow": "lr_optfl_features",
}
LR = ("lr_rgb", "lr_flow")  # what testing reads
META_FIELDS = ("label", "class", "video", "units", "split", "phase")


def sample_meta(label: int, class_name: str, video: str, units: int, split: str, phase: str) -> dict:
    return {"label": label, "class": class_name, "video": video, "units": units, "split": split, "phase": phase}


def make_sample(key: str, meta: dict, arrays: dict) -> dict:
    return {"__key__": key, "meta": meta, **arrays}
