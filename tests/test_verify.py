"""verify: a clean set passes; each kind of damage is caught and named."""

import json
import os

from shards.manifest import load_manifest, store_manifest
from shards.verify import verify_shards


def verify(path, client, **kw):
    return verify_shards(str(path), client=client, progress=False, **kw)


def first_shard(built, phase="Train"):
    return load_manifest(str(built))["splits"]["Split1"][phase]["webdataset"]["shards"][0]


def test_clean_set_passes_with_source(built, demo_master, dask_client):
    report = verify(built, dask_client, source=str(demo_master))
    assert report["ok"], report["problems"]
    assert report["checked"] == {"tar_shards": 24, "samples": 54, "zarr_files": 3 * (1 + 6 + 2 + 4),
                                 "source_videos": 54}


def test_flipped_byte_in_tar(built, dask_client):
    shard = first_shard(built)
    path = built / shard["path"]
    data = bytearray(path.read_bytes())
    data[512 + 128 + 4] ^= 0x01  # the second float of the first array: past the tar and .npy headers
    path.write_bytes(bytes(data))
    problems = verify(built, dask_client)["problems"]
    assert f"{shard['path']}: sha256 differs from the manifest" in problems
    assert any(p.startswith(f"{shard['path']}: key ") for p in problems)


def test_truncated_tar(built, dask_client):
    shard = first_shard(built)
    path = built / shard["path"]
    path.write_bytes(path.read_bytes()[:1000])
    problems = verify(built, dask_client)["problems"]
    assert any(p.startswith(f"{shard['path']}: truncated or not a tar file") for p in problems), problems
    assert f"{shard['path']}: 1000 bytes, manifest says {shard['bytes']}" in problems


def test_deleted_shard(built, dask_client):
    shard = first_shard(built, "Test")
    os.remove(built / shard["path"])
    problems = verify(built, dask_client)["problems"]
    assert f"{shard['path']}: missing" in problems
    assert sum("is in the manifest but not in the shard" in p for p in problems) == shard["samples"]


def test_sample_missing_from_manifest(built, dask_client):
    m = load_manifest(str(built))
    dropped = m["splits"]["Split1"]["Validation"]["samples"].pop(4)
    store_manifest(str(built), m)  # a consistent index (tables, hashes, positions) that lacks one video
    problems = verify(built, dask_client)["problems"]
    shard = f"Split1/Validation/{dropped['shard']}"
    assert f"{shard}: key {dropped['key']}: not in the manifest" in problems


def test_sample_tables_damaged_missing_or_misplaced(built, dask_client):
    """Version 2 keeps each phase's sample records in a table beside manifest.json: a changed byte or a
    missing table is one error naming it; a shard's row position that is off is a verify problem."""
    import pytest
    from shards.errors import ManifestError

    table = built / "Split1" / "Train.samples.jsonl"
    original = table.read_bytes()
    table.write_bytes(original.replace(b'"units":', b'"units": ', 1))
    with pytest.raises(ManifestError, match=f"^{table}: sample table does not match its sha256 in the manifest"):
        load_manifest(str(built))
    table.unlink()
    with pytest.raises(ManifestError, match=rf"^{table}: sample table missing \(named by splits.Split1.Train.table\)$"):
        verify(built, dask_client)
    table.write_bytes(original)
    m = load_manifest(str(built))
    units = m["splits"]["Split1"]["Test"]["samples"][0]["units"]
    m["splits"]["Split1"]["Test"]["samples"][0]["units"] = 0
    store_manifest(str(built), m)  # hashes match: the row itself is checked
    with pytest.raises(ManifestError, match=rf"^{built / 'Split1' / 'Test.samples.jsonl'}: row\[0\] needs a key, a label in "
                                            r"0\.\.\d+, units >= 1, class and video; found"):
        load_manifest(str(built))
    m["splits"]["Split1"]["Test"]["samples"][0]["units"] = units
    store_manifest(str(built), m)
    m = json.loads((built / "manifest.json").read_text())
    shard = m["splits"]["Split1"]["Train"]["webdataset"]["shards"][1]
    shard["table_offset"] += 1
    (built / "manifest.json").write_text(json.dumps(m))
    name = os.path.basename(shard["path"])
    assert verify(built, dask_client)["problems"] == [
        f"Split1/Train/{name}: its first/table_offset do not point at its {shard['samples']} rows of Split1/Train.samples.jsonl"]


def test_zarr_copy_damage(built, dask_client):
    m = load_manifest(str(built))
    z = m["splits"]["Split1"]["Test"]["zarr"]
    target = next(f for f in z["files"] if f["path"].endswith("lr_flow/c/0/0"))
    path = built / target["path"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40
    path.write_bytes(bytes(data))
    problems = verify(built, dask_client)["problems"]
    assert f"{target['path']}: sha256 differs from the manifest" in problems
    assert any("content differs from the manifest (and the tar copy)" in p for p in problems), problems


def test_source_mismatch_is_named(built, demo_tree, dask_client):
    import numpy as np

    m = load_manifest(str(built))
    s = m["splits"]["Split1"]["Train"]["samples"][0]
    path = demo_tree / "Split1" / "Train_lr_features" / s["class"] / f"{s['video']}.npy"
    a = np.load(path)
    a[0, 0] += 1
    np.save(path, a)
    problems = verify(built, dask_client, source=str(demo_tree))["problems"]
    assert problems == [f"Split1/Train/{s['shard']}: key {s['key']}: lr_rgb differs from its source {path}"]


def test_report_is_json_serialisable(built, dask_client):
    report = verify(built, dask_client)
    assert json.loads(json.dumps(report)) == report
