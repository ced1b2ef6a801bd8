"""Each bad input gets its documented message, and no partial output is left behind."""

import os

import numpy as np
import pytest

from conftest import build
from shards.errors import BadVideoError, SourceLayoutError

CLASS, VIDEO = "brush_hair", "April_09_brush_hair_t_nm_np1_0"


def npy(root, stream_folder, phase="Test", class_name=CLASS, video=VIDEO):
    return root / "Split1" / f"{phase}_{stream_folder}" / class_name / f"{video}.npy"


def damage_missing(root):
    os.remove(npy(root, "hr_optfl_features"))
    return npy(root, "hr_optfl_features"), "missing (the other streams have this video)"


def damage_units(root):
    a = np.load(npy(root, "lr_features"))
    np.save(npy(root, "hr_features"), np.concatenate([a, a[:1]]))
    return npy(root, "lr_features"), f"has {len(a)} units but {npy(root, 'hr_features')} has {len(a) + 1}"


def damage_dim(root):
    a = np.load(npy(root, "lr_features"))
    np.save(npy(root, "lr_optfl_features"), a[:, :8])
    return npy(root, "lr_optfl_features"), f"has dim 8 but {npy(root, 'hr_features')} has dim 16"


def damage_1d(root):
    np.save(npy(root, "lr_features"), np.ones(5, np.float32))
    return npy(root, "lr_features"), "expected a 2-D [units, dim] array, found shape (5,)"


def damage_int(root):
    np.save(npy(root, "lr_features"), np.ones((4, 16), np.int64))
    return npy(root, "lr_features"), "expected a float array, found dtype int64"


def damage_nan(root):
    a = np.load(npy(root, "hr_features"))
    a[1, 2] = np.nan
    np.save(npy(root, "hr_features"), a)
    return npy(root, "hr_features"), "1 non-finite values (NaN or inf)"


def damage_empty(root):
    np.save(npy(root, "lr_features"), np.zeros((0, 16), np.float32))
    return npy(root, "lr_features"), "empty array of shape (0, 16)"


def damage_truncated(root):
    path = npy(root, "lr_features")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    return path, f"truncated: {size - 10} bytes, header promises {size}"


def damage_not_npy(root):
    npy(root, "lr_features").write_bytes(b"this is not a numpy file at all")
    return npy(root, "lr_features"), "not a .npy file (bad magic bytes)"


def damage_pickle(root):
    path = npy(root, "lr_features")
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return path, "holds Python objects (dtype object); refusing to unpickle"


DAMAGES = [damage_missing, damage_units, damage_dim, damage_1d, damage_int, damage_nan, damage_empty,
           damage_truncated, damage_not_npy, damage_pickle]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[7:])
def test_bad_video_fails_with_message_and_no_output(demo_tree, dask_client, damage):
    path, problem = damage(demo_tree)
    out = demo_tree.parent / "HMDB51-shards"
    with pytest.raises(BadVideoError) as err:
        build(demo_tree, dask_client)
    assert str(err.value) == f"video {CLASS}/{VIDEO}: {path}: {problem}"
    assert not out.exists() and not os.path.exists(str(out) + ".building")


@pytest.mark.parametrize("damage", [damage_units, damage_nan, damage_missing], ids=["units", "nan", "missing"])
def test_skip_leaves_video_out_and_lists_it(demo_tree, dask_client, damage):
    from shards.verify import verify_shards

    path, problem = damage(demo_tree)
    m = build(demo_tree, dask_client, on_error="skip")
    test = m["splits"]["Split1"]["Test"]
    assert test["skipped"] == [{"class": CLASS, "video": VIDEO, "path": str(path), "reason": problem}]
    assert len(test["samples"]) == 17 and VIDEO not in {s["video"] for s in test["samples"]}
    assert all(e["skipped"] == [] for p, e in m["splits"]["Split1"].items() if p != "Test")
    report = verify_shards(str(demo_tree.parent / "HMDB51-shards"), source=str(demo_tree), client=dask_client,
                           progress=False)
    assert report["ok"], report["problems"]
    assert report["checked"]["source_videos"] == 54


def test_float16_overflow_is_reported(demo_tree, dask_client):
    path = npy(demo_tree, "hr_features")
    a = np.load(path)
    a[0, 0] = 1e6
    np.save(path, a)
    with pytest.raises(BadVideoError, match=r"values overflow float16"):
        build(demo_tree, dask_client, dtype="float16")


def test_empty_phase(demo_tree, dask_client):
    for folder in (demo_tree / "Split1").glob("Validation_*"):
        for f in folder.rglob("*.npy"):
            f.unlink()
    with pytest.raises(SourceLayoutError) as err:
        build(demo_tree, dask_client)
    assert str(err.value) == f"{demo_tree / 'Split1'}: phase Validation is empty (no .npy files)"


def test_class_in_one_stream_only(demo_tree, dask_client):
    extra = demo_tree / "Split1" / "Train_hr_optfl_features" / "juggle"
    extra.mkdir()
    np.save(extra / "x.npy", np.ones((3, 16), np.float32))
    with pytest.raises(SourceLayoutError) as err:
        build(demo_tree, dask_client)
    assert str(err.value) == (f"{extra}: class 'juggle' has no folder in Train_lr_features")
    assert not (demo_tree.parent / "HMDB51-shards").exists()


def test_missing_stream_folder(demo_tree, dask_client):
    import shutil

    shutil.rmtree(demo_tree / "Split1" / "Test_lr_optfl_features")
    with pytest.raises(SourceLayoutError) as err:
        build(demo_tree, dask_client)
    assert str(err.value) == f"{demo_tree / 'Split1' / 'Test_lr_optfl_features'}: missing stream folder " \
                             "(Test has 3 of 4 streams)"


def test_no_splits(tmp_path, dask_client):
    with pytest.raises(SourceLayoutError, match=r"no Split\* folders"):
        build(tmp_path, dask_client)
