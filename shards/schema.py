"""The one sample schema: what every reader (mapped tar, remote tar, Zarr) yields for a video.

    {"__key__": "v0123...",                       # unique, WebDataset-safe (no dots, no slashes)
     "meta": {"label": 3, "class": "chew", "video": "April_09_chew_...", "units": 7,
              "split": "Split1", "phase": "Test"},
     "hr_rgb": (units, dim) array, "lr_rgb": ..., "hr_flow": ..., "lr_flow": ...}  # those asked for

A reader asked for some streams only (the LR ones, say) leaves the others out.
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
