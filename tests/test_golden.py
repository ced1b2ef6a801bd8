"""A committed shard set (tests/golden/, 3 videos, dim 8): a format change must be a decision, not an accident.

The source arrays are small integers (exact in float32 everywhere), so the build is reproducible on any
machine. Tar shards are our own bytes and must match exactly; the Zarr files are zarr-python's encoding,
so their decoded content is compared (a zarr release may reformat its JSON). After a deliberate format
change: `python tests/test_golden.py` rewrites tests/golden/, and the diff goes in the same commit.
"""

import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "HMDB51-shards")
GOLDEN_V1 = os.path.join(HERE, "golden", "HMDB51-shards-v1")  # the same set as written by format version 1
VIDEOS = [("Train", "chew", "Bob's.Best!_chew_f_nm_np1_fr_goo_0"), ("Validation", "clap", "April_09_clap_u_cm_np1_le_med_1"),
          ("Test", "hit", "Amazing_#3_(HD)_hit_f_cm_np1_ri_bad_2")]


def write_source(root: str) -> None:
    from shards.schema import STREAMS

    for i, (phase, class_name, video) in enumerate(VIDEOS):
        for j, (stream, suffix) in enumerate(STREAMS.items()):
            units = 3 + i
            array = (np.arange(units * 8).reshape(units, 8) + 1000 * i + 100 * j).astype(np.float32)
            folder = os.path.join(root, "Split1", f"{phase}_{suffix}", class_name)
            os.makedirs(folder, exist_ok=True)
            np.save(os.path.join(folder, video + ".npy"), array)
        for c in ("chew", "clap", "hit"):
            os.makedirs(os.path.join(root, "Split1", phase, c), exist_ok=True)


def build_golden(out: str, client=None) -> dict:
    from shards.build import BuildConfig, build_shards

    source = out + "-source"
    write_source(source)
    try:
        return build_shards(source, BuildConfig(out=out, min_shards=1, workers=1, zarr_chunk_units=4,
                                                    zarr_shard_units=8, progress=False), client=client)
    finally:
        shutil.rmtree(source)


def comparable(manifest: dict) -> dict:
    """The manifest without what names the machine it was built on."""
    return {**manifest, "source": {**manifest["source"], "root": None}, "tool_version": None}


def files(root: str) -> dict:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = path
    return found


def test_todays_readers_decode_the_golden_set_exactly():
    from shards.manifest import load_manifest
    from shards.tario import iter_tar_samples
    from shards.zarrio import ZarrPhaseReader

    m = load_manifest(GOLDEN)
    assert m["classes"] == ["chew", "clap", "hit"] and m["dim"] == 8
    for i, (phase, class_name, video) in enumerate(VIDEOS):
        entry = m["splits"]["Split1"][phase]
        (shard,) = entry["webdataset"]["shards"]
        (tar_sample,) = iter_tar_samples(os.path.join(GOLDEN, shard["path"]))
        (zarr_sample,) = ZarrPhaseReader(os.path.join(GOLDEN, entry["zarr"]["path"])).iter_range(0, 1)
        meta = {"label": i, "class": class_name, "video": video, "units": 3 + i, "split": "Split1", "phase": phase}
        for sample in (tar_sample, zarr_sample):
            assert sample["__key__"] == entry["samples"][0]["key"] and sample["meta"] == meta
            for j, stream in enumerate(("hr_rgb", "lr_rgb", "hr_flow", "lr_flow")):
                expected = (np.arange((3 + i) * 8).reshape(3 + i, 8) + 1000 * i + 100 * j).astype(np.float32)
                np.testing.assert_array_equal(sample[stream], expected)


def test_format_version_1_sets_read_as_before(dask_client):
    """Version 1 kept every sample record in manifest.json; version 2 keeps them in sample tables.
    Sets of either version give readers the same records and the same samples, and verify clean."""
    from elr.data import iter_pieces, phase_shards
    from shards.manifest import load_manifest
    from shards.verify import verify_shards

    old, new = load_manifest(GOLDEN_V1), load_manifest(GOLDEN)
    assert (old["format_version"], new["format_version"]) == (1, 2)
    assert "samples" not in json.load(open(os.path.join(GOLDEN, "manifest.json")))["splits"]["Split1"]["Test"]
    for phase, entry in new["splits"]["Split1"].items():
        assert entry["samples"] == old["splits"]["Split1"][phase]["samples"]
        a, b = (phase_shards(m, root, "Split1", [phase]) for m, root in ((old, GOLDEN_V1), (new, GOLDEN)))
        for x, y in zip(iter_pieces([(s, 0, s.samples) for s in a], ("lr_rgb", "hr_flow")),
                        iter_pieces([(s, 0, s.samples) for s in b], ("lr_rgb", "hr_flow"))):
            assert x["__key__"] == y["__key__"] and x["meta"] == y["meta"]
            assert np.array_equal(x["lr_rgb"], y["lr_rgb"]) and np.array_equal(x["hr_flow"], y["hr_flow"])
    report = verify_shards(GOLDEN_V1, progress=False, client=dask_client)
    assert report["ok"], report["problems"]


def test_todays_writer_reproduces_the_golden_set(tmp_path, dask_client):
    from shards.manifest import load_manifest
    from shards.zarrio import ZarrPhaseReader

    built = str(tmp_path / "HMDB51-shards")
    manifest = build_golden(built, dask_client)
    golden = load_manifest(GOLDEN)
    assert comparable(manifest) == comparable(golden)
    new, old = files(built), files(GOLDEN)
    assert sorted(new) == sorted(old)
    for rel in new:
        if rel.endswith(".tar"):
            assert open(new[rel], "rb").read() == open(old[rel], "rb").read(), rel
    for entry in golden["splits"]["Split1"].values():
        a = ZarrPhaseReader(os.path.join(built, entry["zarr"]["path"]))
        b = ZarrPhaseReader(os.path.join(GOLDEN, entry["zarr"]["path"]))
        assert dict(a.group.attrs) == dict(b.group.attrs)
        for x, y in zip(a.iter_range(0, len(a)), b.iter_range(0, len(b))):
            assert x["__key__"] == y["__key__"] and x["meta"] == y["meta"]
            assert all(np.array_equal(x[s], y[s]) for s in ("hr_rgb", "lr_rgb", "hr_flow", "lr_flow"))


if __name__ == "__main__":  # regenerate after a deliberate format change
    sys.path.insert(0, os.path.dirname(HERE))
    shutil.rmtree(GOLDEN, ignore_errors=True)
    manifest = build_golden(GOLDEN)
    with open(os.path.join(GOLDEN, "manifest.json")) as f:
        print(f"rewrote {GOLDEN}: {len(files(GOLDEN))} files, manifest {len(f.read())} bytes", file=sys.stderr)
    print(json.dumps(comparable(manifest)["splits"]["Split1"]["Test"]["samples"], indent=1))
