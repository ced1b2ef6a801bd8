"""extract-features on real encoded videos: phases, shapes, unit counts, alignment, determinism, resume,
the seed's data layer, and every kind of bad input."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench.seed import SeedDataLayer
from ingest.c3d.extract import ExtractConfig, extract_features
from shards.errors import BadVideoError, OutputExistsError
from shards.schema import STREAMS
from conftest import FAST, features_of, kill_after
from videos import count_frames, encode, write_split_files

PHASE = {"1": "Train", "2": "Test", "0": "Validation"}
BIN = os.path.dirname(sys.executable)


def test_tree_phases_shapes_units_alignment(sample_tree, extracted):
    root, labels = sample_tree
    out, record = extracted
    for class_name, videos in labels.items():
        for name, label in videos.items():
            stem = os.path.splitext(name)[0]  # names with dots keep all but the last extension
            frames = count_frames(os.path.join(root, "videos", class_name, name))
            arrays = [np.load(os.path.join(out, "Split1", f"{PHASE[label]}_{suffix}", class_name, stem + ".npy"),
                              allow_pickle=False) for suffix in STREAMS.values()]
            units = max(1, frames // 16)
            assert [a.shape for a in arrays] == [(units, 4096)] * 4, name
            assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays)
            info = record["videos"][f"{class_name}/{stem}"]
            assert (info["frames"], info["units"], info["phase"]) == (frames, units, PHASE[label])
    assert record["phases"] == {"Train": 4, "Test": 3, "Validation": 2}
    assert record["weights"]["random_c3d"] == 0 and "tests and demos only" in record["weights"]["note"]
    assert record["videos"]["talk/Car_(phone)_#3_talk_h_nm_np1_2"]["size"] == [143, 175]
    assert json.load(open(os.path.join(out, "features.json")))["splits"]["Split1"]["side"] == 16
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the journal is gone once complete


def test_streams_differ_where_they_should(extracted):
    out, _ = extracted
    video = "Split1/Train_{}/ride_bike/Bikes.at.the_park_ride_bike_f_cm_np1_fr_med_0.npy"
    a = {s: np.load(os.path.join(out, video.format(suffix))) for s, suffix in STREAMS.items()}
    assert len({a[s].tobytes() for s in a}) == 4  # four different inputs, four different features


def test_seed_data_layer_and_build_shards_read_the_tree(extracted, dask_client, tmp_path):
    from shards.build import BuildConfig, build_shards
    from shards.verify import verify_shards

    out, _ = extracted
    seed = SeedDataLayer(os.path.join(out, "Split1"), "Train")
    assert len(seed) == 2 * 4  # every Train video, at LR and at HR
    rgb, flow, length, label = seed[0]
    assert rgb.shape == flow.shape == (seed.max_length, 4096) and length >= 1
    shards = str(tmp_path / "shards")
    build_shards(out, BuildConfig(out=shards, formats=("webdataset",), progress=False), client=dask_client)
    report = verify_shards(shards, source=out, client=dask_client, progress=False)
    assert report["ok"] and report["checked"]["samples"] == 9, report["problems"]


def test_same_input_same_bytes_and_resume_after_kill(sample_tree, extracted, tmp_path, dask_client):
    """A second run gives byte-identical files; so does a run killed mid-way and resumed (its batches
    hold other videos than the first run's)."""
    root, _ = sample_tree
    out, _ = extracted
    again = str(tmp_path / "again")
    cmd = [os.path.join(BIN, "elr-ingest"), "extract-features", f"{root}/videos", "--splits", f"{root}/splits",
           "--out", again, "--random-c3d", "0", "--crop-size", "16", "--scheduler", dask_client.scheduler.address, "-q"]
    journal = os.path.join(again, ".Split1-features.jsonl")
    lines = kill_after(cmd, journal, lines=3)  # the options and 2 videos
    assert lines and '"finished"' not in lines[-1], "the run finished before it could be killed"
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1 and "holds an interrupted extraction of Split1; --resume" in result.stderr
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert features_of(again) == features_of(out)
    record = json.load(open(os.path.join(again, "features.json")))["splits"]["Split1"]
    assert record["videos"] == json.load(open(os.path.join(out, "features.json")))["splits"]["Split1"]["videos"]
    result = subprocess.run(cmd, capture_output=True, text=True)  # a finished tree is not overwritten by accident
    assert result.returncode == 1 and result.stderr.strip() == \
        f"Error: {again}: already holds the features of Split1; --resume to continue it or --overwrite to replace it"


def test_validation_none_leaves_label0_out(sample_tree, tmp_path, dask_client):
    root, _ = sample_tree
    record = extract_features(f"{root}/videos", f"{root}/splits", str(tmp_path / "out"),
                              ExtractConfig(validation="none", **FAST), client=dask_client)
    assert record["phases"] == {"Train": 4, "Test": 3}
    assert sorted(record["unused"]) == ["ride_bike/bikes_3_ride_bike_gray_np1_2.avi",
                                        "talk/Car_(phone)_#3_talk_h_nm_np1_2.avi"]
    assert not os.path.exists(tmp_path / "out" / "Split1" / "Validation_lr_features")


def test_each_bad_video_is_one_clear_error(bad_tree, tmp_path, dask_client):
    root, problems = bad_tree
    for name, problem in problems.items():
        single = tmp_path / name
        shutil.copytree(f"{root}/videos/fine", single / "videos" / "fine")
        os.makedirs(single / "videos" / "broken")
        shutil.copy(f"{root}/videos/broken/{name}", single / "videos" / "broken" / name)
        write_split_files(str(single / "splits"), {"broken": {name: "1"}, "fine": {"fine_0.avi": "2"}})
        path = str(single / "videos" / "broken" / name)
        with pytest.raises(BadVideoError) as e:
            extract_features(str(single / "videos"), str(single / "splits"), str(single / "out"), ExtractConfig(**FAST),
                             client=dask_client)
        assert str(e.value).startswith(f"video broken/{os.path.splitext(name)[0]}: {path}: {problem}"), str(e.value)


def test_on_error_skip_lists_bad_videos_and_writes_nothing_half(bad_tree, tmp_path, dask_client):
    root, problems = bad_tree
    out = tmp_path / "out"
    record = extract_features(f"{root}/videos", f"{root}/splits", str(out), ExtractConfig(on_error="skip", **FAST),
                              client=dask_client)
    assert sorted(record["skipped"]) == sorted(f"broken/{os.path.splitext(n)[0]}" for n in problems)
    assert list(record["videos"]) == ["fine/fine_0"] and record["phases"] == {"Test": 1}
    written = sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.isfile(p))
    assert written == ["Split1/Test_hr_features/fine/fine_0.npy", "Split1/Test_hr_optfl_features/fine/fine_0.npy",
                       "Split1/Test_lr_features/fine/fine_0.npy", "Split1/Test_lr_optfl_features/fine/fine_0.npy",
                       "features.json"]


def test_split_file_problems_name_both_sides(bad_tree, tmp_path):
    root, _ = bad_tree
    splits = tmp_path / "splits"
    shutil.copytree(f"{root}/splits", splits)
    with open(splits / "fine_test_split1.txt", "a") as f:
        f.write("fine_1.avi 2 \n")
    with pytest.raises(Exception) as e:
        extract_features(f"{root}/videos", str(splits), str(tmp_path / "out"), ExtractConfig(**FAST))
    assert str(e.value) == f"{root}/videos/fine/fine_1.avi: missing, but {splits}/fine_test_split1.txt names it"
    with open(splits / "fine_test_split1.txt", "w") as f:
        f.write("fine_0.avi 3 \n")
    with pytest.raises(Exception) as e:
        extract_features(f"{root}/videos", str(splits), str(tmp_path / "out"), ExtractConfig(**FAST))
    assert str(e.value) == f"{splits}/fine_test_split1.txt:1: unknown label '3' for fine_0.avi (1 train, 2 test, 0 unused)"
    with open(splits / "fine_test_split1.txt", "w") as f:
        f.write("fine_0.avi 2 \n")
    shutil.copytree(f"{root}/videos", tmp_path / "videos")
    shutil.copy(tmp_path / "videos" / "fine" / "fine_0.avi", tmp_path / "videos" / "fine" / "fine_extra.avi")
    with pytest.raises(Exception) as e:
        extract_features(str(tmp_path / "videos"), str(splits), str(tmp_path / "out"), ExtractConfig(**FAST))
    assert str(e.value) == f"{tmp_path}/videos/fine/fine_extra.avi: named by no line of {splits}/fine_test_split1.txt"
    os.unlink(splits / "fine_test_split1.txt")
    with pytest.raises(Exception) as e:
        extract_features(f"{root}/videos", str(splits), str(tmp_path / "out"), ExtractConfig(**FAST))
    assert str(e.value) == (f"{root}/videos/fine: class folder named by no split file (no fine_test_split1.txt in "
                            f"{splits})")


def test_refuses_a_folder_holding_another_tree(bad_tree, demo_tree, dask_client):
    root, _ = bad_tree
    out = str(demo_tree)  # make-demo's synthetic features: not ours to replace silently
    with pytest.raises(OutputExistsError) as e:
        extract_features(f"{root}/videos", f"{root}/splits", out, ExtractConfig(on_error="skip", **FAST),
                         client=dask_client)
    assert str(e.value) == (f"{out}/Split1: already holds a different tree (not written by extract-features); "
                            "--overwrite to replace it")
    extract_features(f"{root}/videos", f"{root}/splits", out, ExtractConfig(on_error="skip", overwrite=True, **FAST),
                     client=dask_client)
    assert sorted(os.listdir(f"{out}/Split1/Test_lr_features")) == ["broken", "fine"]


def test_split_file_names_with_spaces_other_encodings_and_two_classes(bad_tree, tmp_path, dask_client):
    """The label is the last field; a name that is not UTF-8 is refused (or skipped) with how to rename it,
    and never reaches features.json as lone surrogates; one video in two classes is extracted with a warning."""
    root, _ = bad_tree
    videos, splits = tmp_path / "videos", tmp_path / "splits"
    os.makedirs(videos / "fine")
    os.makedirs(videos / "other")
    os.makedirs(splits)
    good = f"{root}/videos/fine/fine_0.avi"
    latin1 = os.fsdecode(b"caf\xe9.avi")  # what a Latin-1 name looks like on a UTF-8 system
    for path in (videos / "fine" / "my video (1).avi", videos / "fine" / latin1, videos / "other" / "fine_0.avi"):
        shutil.copy(good, path)
    with open(splits / "fine_test_split1.txt", "wb") as f:
        f.write(b"my video (1).avi 1 \ncaf\xe9.avi 2\n")
    (splits / "other_test_split1.txt").write_text("fine_0.avi 2\n")
    out = tmp_path / "out"
    with pytest.raises(Exception) as e:
        extract_features(str(videos), str(splits), str(out), ExtractConfig(**FAST), client=dask_client)
    assert str(e.value) == (f"{videos}/fine/caf\\xe9.avi: the name is not UTF-8, which the feature tree and its JSON "
                            f"files need; rename the file and its line in {splits}/fine_test_split1.txt (e.g. convmv -f "
                            "latin1 -t utf-8 --notest)")
    shutil.copy(good, videos / "fine" / "fine_0.avi")
    with open(splits / "fine_test_split1.txt", "ab") as f:
        f.write(b"fine_0.avi 1\n")
    result = subprocess.run([os.path.join(BIN, "elr-ingest"), "extract-features", str(videos), "--splits", str(splits),
                             "--out", str(out), "--random-c3d", "0", "--crop-size", "16", "--on-error", "skip", "-q",
                             "--scheduler", dask_client.scheduler.address], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = "fine_0.avi is a video of 2 classes (fine, other): a copy in the wrong folder? Both are extracted"
    assert f"warning: {warning}\n" in result.stderr
    with open(out / "features.json", encoding="utf-8") as f:  # strict UTF-8: no lone surrogates
        doc = json.load(f)["splits"]["Split1"]
    assert doc["warnings"] == [warning]
    assert sorted(doc["videos"]) == ["fine/fine_0", "fine/my video (1)", "other/fine_0"]
    assert list(doc["skipped"]) == ["fine/caf\\xe9.avi"]
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate anywhere
    assert os.path.getsize(out / "Split1" / "Train_hr_features" / "fine" / "my video (1).npy") > 0


def channel_probe_weights(path, side=16):
    """C3D weights (for `side`x`side` crops) whose fc6[0] is conv1's input channel 0 at the centre taps,
    passed through every layer unchanged: fc6[0] = max(0, C3D's channel 0 - its mean)."""
    import torch

    from ingest.c3d.network import CONVS, pool5_features

    state = {}
    for name, (cin, cout) in CONVS.items():
        weight = torch.zeros(cout, cin, 3, 3, 3)
        weight[0, 0, 1, 1, 1] = 1.0  # output 0 = input 0, centre tap only (no border effects)
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, torch.zeros(cout)
    fc6 = torch.zeros(4096, pool5_features(side))
    fc6[0, 0] = 1.0  # pool5 channel 0 (one position at side 16)
    state["fc6.weight"], state["fc6.bias"] = fc6, torch.zeros(4096)
    torch.save(state, path)


def test_frames_reach_the_published_weights_as_bgr(tmp_path, dask_client):
    """Caffe read frames as B, G, R when the Sports-1M weights were trained: a weights file whose fc6[0]
    reads conv1's input channel 0 answers a flat blue video with ~255 - 90.25 and a red one with 0."""
    videos, splits = tmp_path / "videos", tmp_path / "splits"
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for name, rgb in colours.items():
        encode(str(videos / name / f"{name}_0.avi"), np.broadcast_to(np.array(rgb, np.uint8), (16, 48, 64, 3)).copy())
    write_split_files(str(splits), {name: {f"{name}_0.avi": "2"} for name in colours})
    weights = tmp_path / "probe.pt"
    channel_probe_weights(str(weights))
    out = tmp_path / "HMDB51"
    result = subprocess.run([os.path.join(BIN, "elr-ingest"), "extract-features", str(videos), "--splits", str(splits),
                             "--out", str(out), "--c3d-weights", str(weights), "--crop-size", "16", "-q",
                             "--scheduler", dask_client.scheduler.address], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fc6 = {(name, stream): np.load(out / "Split1" / f"Test_{stream}" / name / f"{name}_0.npy")[0, 0]
           for name in colours for stream in ("hr_features", "lr_features", "hr_optfl_features")}
    for stream in ("hr_features", "lr_features"):  # the blue channel less its mean, 90.25 (MPEG-4: +-5)
        assert abs(fc6[("blue", stream)] - (255 - 90.25)) < 5 and fc6[("red", stream)] == 0, fc6
    # a still video's flow image is (x, y, magnitude) = (128, 128, 0): C3D's channel 0 is the magnitude
    assert fc6[("blue", "hr_optfl_features")] == fc6[("red", "hr_optfl_features")] == 0
    record = json.load(open(out / "features.json"))["splits"]["Split1"]
    assert (record["channels"], record["pool5"], record["side"]) == ("bgr", "caffe", 16)


def test_resume_refuses_a_run_made_before_the_channel_order_fix(sample_tree, tmp_path, dask_client):
    """A journal written before channels and pool5 were recorded was made with R, G, B frames and the
    port's pool5: its features cannot be mixed with these; --resume names both and what to do."""
    root, _ = sample_tree
    out = tmp_path / "HMDB51"
    cfg = ExtractConfig(**FAST)
    extract_features(f"{root}/videos", f"{root}/splits", str(out), cfg, client=dask_client)
    header = {k: v for k, v in json.load(open(out / "features.json"))["splits"]["Split1"].items()
              if k in (*cfg.record_options(), "weights") and k not in ("channels", "pool5")}
    os.remove(out / "features.json")
    journal = out / ".Split1-features.jsonl"
    journal.write_text(json.dumps(header, sort_keys=True) + "\n")  # as the version before wrote it, killed
    with pytest.raises(OutputExistsError) as e:
        extract_features(f"{root}/videos", f"{root}/splits", str(out), ExtractConfig(**FAST, resume=True),
                         client=dask_client)
    assert str(e.value) == (f"{journal}: the interrupted run used other options: channels 'rgb' (this run: 'bgr'), "
                            "pool5 'port' (this run: 'caffe'); run again without --resume, with --overwrite")


def test_a_phone_video_filmed_sideways_is_turned_upright_before_resizing(tmp_path):
    """A phone stores the sensor's frames and a display rotation; players turn them upright, and so does
    decoding here, before the HR and LR frames are made."""
    import av

    from ingest.videos.frames import decode_frames

    upright = np.zeros((32, 48, 3), np.uint8)  # landscape as the viewer sees it: red top, blue below
    upright[:8, :, 0], upright[8:, :, 2] = 255, 255
    stored = np.rot90(upright, -1)  # (48, 32): what the sensor recorded, to be turned 90 degrees counter-clockwise
    path = str(tmp_path / "phone.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24")))
        container.mux(stream.encode())
    frames = decode_frames(path, "c", "phone")
    info = next(frames)
    decoded = list(frames)
    assert info["rotation"] == 90 and len(decoded) == 4
    for frame in decoded:
        assert frame.shape == (32, 48, 3) and frame.flags.c_contiguous
        assert np.abs(frame.astype(int) - upright).mean() < 8  # MPEG-4's error, not a rotated picture's
    plain = str(tmp_path / "plain.avi")
    encode(plain, np.stack([upright] * 2))
    frames = decode_frames(plain, "c", "plain")
    info = next(frames)
    assert next(frames).shape == (32, 48, 3) and info["rotation"] == 0
