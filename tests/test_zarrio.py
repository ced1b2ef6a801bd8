"""Zarr shard files encoded by shards.zarrio are the bytes zarr itself writes, and zarr reads them."""

import os

import numpy as np
import pytest
import zarr

from shards.schema import STREAMS
from shards.zarrio import create_phase_store, write_unit_range

CHUNK, SHARD, UNITS, DIM = 8, 32, 83, 16  # the last shard: 19 rows, one chunk padded, one past the end


def make_store(path):
    offsets = np.arange(0, UNITS + 1)
    create_phase_store(str(path), DIM, "float32", offsets, [0] * UNITS, [f"k{i}" for i in range(UNITS)], CHUNK, SHARD,
                       {"split": "Split1", "phase": "Train", "classes": ["c"] * UNITS, "videos": ["v"] * UNITS})


def store_bytes(path):
    found = {}
    for folder, _, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            found[os.path.relpath(full, path)] = open(full, "rb").read()
    return found


@pytest.mark.parametrize("zero", ["none", "one chunk", "one shard"])
def test_shards_are_the_bytes_zarr_writes(tmp_path, zero):
    rng = np.random.default_rng(0)
    data = {s: rng.standard_normal((UNITS, DIM)).astype(np.float32) for s in STREAMS}
    if zero == "one chunk":  # zarr stores no chunk whose bits are the fill value's (+0.0), but stores -0.0
        data["hr_rgb"][40:48] = 0.0
        data["hr_rgb"][8:16] = -0.0
    elif zero == "one shard":  # nor a shard file with no chunk
        data["lr_flow"][32:64] = 0.0
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    make_store(ours)
    make_store(theirs)
    written = []
    for start in range(0, UNITS, SHARD):
        stop = min(start + SHARD, UNITS)
        written += write_unit_range(str(ours), start, stop, {s: data[s][start:stop] for s in STREAMS})
    for s in STREAMS:
        zarr.open_array(str(theirs), path=s, mode="r+", config={"write_empty_chunks": True})[:] = data[s]
    assert store_bytes(ours) == store_bytes(theirs)
    data_files = {p for p in store_bytes(ours) if p.split("/")[0] in STREAMS and "/c/" in p}
    assert sorted(f["path"] for f in written) == sorted(data_files)
    assert ("lr_flow/c/1/0" in data_files) == (zero != "one shard")
    for s in STREAMS:
        np.testing.assert_array_equal(zarr.open_array(str(ours), path=s, mode="r")[:], data[s])


def test_only_whole_shards_are_written(tmp_path):
    make_store(tmp_path / "s.zarr")
    block = {s: np.ones((24, DIM), np.float32) for s in STREAMS}
    with pytest.raises(ValueError, match=r"units \[8, 32\) are not whole shards of 32 units$"):
        write_unit_range(str(tmp_path / "s.zarr"), 8, 32, block)
