"""elr-train-c3d on clips of real encoded videos (make-demo-videos, 16x16 crops, random initial
weights): a killed run resumed equals the uninterrupted one, two DDP processes equal one, the host
and device augmentation, a checkpoint extract-features reads, and one line for each mistake."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import kill_after
from elr.data.clips import ClipBatches, c3d_input, mirror_flow_x
from ingest.c3d.network import C3D_MEAN_BGR
from shards.clips import ClipSet
from train.c3d import main as c3d_main

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory, dask_client):
    from ingest.clips.build import ClipsConfig, build_clips
    from ingest.videos.demo import DemoVideosConfig, make_demo_videos

    root = tmp_path_factory.mktemp("c3d")
    make_demo_videos(str(root), DemoVideosConfig(classes=3, train=2, validation=1, test=1, min_frames=32, max_frames=40,
                                                 seed=0))
    out = str(root / "clips")
    build_clips(f"{root}/videos", f"{root}/splits", ClipsConfig(out=out, side=16, min_shards=2, progress=False),
                client=dask_client)
    return out


def train(clips, out, *args):
    return [os.path.join(BIN, "elr-train-c3d"), "--clips", clips, "--out", str(out), "--random-c3d", "0",
            "--batch-size", "4", "--workers", "0", "-q", *args]


@pytest.fixture(scope="module")
def whole_run(demo_clips, tmp_path_factory):
    """One epoch in one process, uninterrupted: its run folder."""
    out = tmp_path_factory.mktemp("whole") / "run"
    done = subprocess.run(train(demo_clips, out, "--epochs", "1"), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def in_process(cmd, capsys) -> str:
    """elr-train-c3d's one error line for a mistake, run in this process (no torch import to wait for)."""
    with pytest.raises(SystemExit) as e:
        c3d_main(cmd[1:])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    return err


def test_a_killed_run_resumed_equals_the_uninterrupted_one(demo_clips, whole_run, tmp_path, capsys):
    cut = tmp_path / "cut"
    cmd = train(demo_clips, cut, "--epochs", "1", "--checkpoint-every", "2")
    assert kill_after(cmd, str(cut / "last.pt"), env=ENV) is not None, "the run ended before its first checkpoint"
    assert weights(cut / "last.pt")["step"] == 2  # killed mid-epoch 1, after its step-2 checkpoint
    assert in_process(cmd, capsys) == f"Error: {cut}/last.pt exists; pass --resume to continue that run or choose another --out"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(whole_run / "last.pt"), weights(cut / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    timing = ("clips_per_s", "data_wait")  # the rest of an epoch's record is the same
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    assert [r["epoch"] for r in a["history"]] == [1] and np.isfinite(a["history"][0]["train_loss"])
    best = weights(whole_run / "best.pt")
    assert (best["crop_size"], best["pool5"], best["padding_mode"]) == (16, "caffe", "replicate")
    assert os.path.exists(whole_run / "curves.png")
    assert in_process(cmd + ["--resume", "--lr", "0.01"], capsys) == (
        f"Error: --resume: {cut}/last.pt was trained with --lr 0.001; this run has --lr 0.01 (use the same options, "
        "or another --out)")


def test_two_processes_train_as_one(demo_clips, whole_run, tmp_path):
    """Crops, flips and dropout masks are drawn per unit: a step is the same on 1 or 2 ranks (DDP's mean
    gradient over 2 halves equals the mean over the whole), up to float rounding."""
    one = whole_run / "last.pt"
    done = subprocess.run(train(demo_clips, tmp_path / "n2", "--nproc", "2", "--epochs", "1"),
                          capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(one), weights(tmp_path / "n2" / "last.pt")
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], rtol=1e-4, atol=1e-6), k
    assert abs(a["history"][0]["train_loss"] - b["history"][0]["train_loss"]) < 1e-5
    assert a["history"][0]["test_lr_rgb_clip_acc"] == b["history"][0]["test_lr_rgb_clip_acc"]


def test_augmentation_on_the_host_and_the_device(demo_clips):
    clips = ClipSet(demo_clips)
    data = ClipBatches(clips, "Split1", "Train", ["hr_rgb", "lr_rgb", "hr_flow"], 16, 8, seed=0, epoch=3)
    again = ClipBatches(clips, "Split1", "Train", ["hr_rgb", "lr_rgb", "hr_flow"], 16, 8, seed=0, epoch=3,
                        rank=1, world=2)
    batch, half = data[0], again[0]
    assert torch.equal(batch["unit"][4:], half["unit"]) and torch.equal(batch["hr_rgb"][4:], half["hr_rgb"])
    assert data.steps() == len(clips.units("Split1", "Train")) // 8
    for i, unit in enumerate(batch["unit"].tolist()):
        sample = clips.read("Split1", "Train", clips.units("Split1", "Train")[unit])
        top, left, flip = int(batch["top"][i]), int(batch["left"][i]), bool(batch["flip"][i])
        window = sample["hr_rgb"][:, top:top + 16, left:left + 16]
        flow = sample["hr_flow"][:, top:top + 16, left:left + 16]
        if flip:
            window, flow = window[:, :, ::-1], mirror_flow_x(flow[:, :, ::-1].copy())
        assert np.array_equal(batch["hr_rgb"][i].numpy(), window) and np.array_equal(batch["hr_flow"][i].numpy(), flow)
    assert batch["flip"].any() and not batch["flip"].all()
    assert mirror_flow_x(np.array([[[128, 7, 9], [0, 1, 2], [255, 0, 0]]], np.uint8))[..., 0].tolist() == [[128, 255, 1]]
    # the device: LR upsampled to the frame size, cropped and flipped like HR; B, G, R less the mean
    x = c3d_input(batch, "lr_rgb", tuple(clips.clips["size"]), 16, 16, torch.tensor(C3D_MEAN_BGR), torch.device("cpu"))
    assert x.shape == (8, 3, 16, 16, 16)
    rgb = (x.flip(1) + torch.tensor(C3D_MEAN_BGR).flip(0).view(1, 3, 1, 1, 1))
    up = torch.nn.functional.interpolate(batch["lr_rgb"].permute(0, 4, 1, 2, 3).float().reshape(8, 48, 12, 16),
                                         size=tuple(clips.clips["size"]), mode="bilinear", align_corners=False).round()
    i = int(batch["flip"].nonzero()[0])
    top, left = int(batch["top"][i]), int(batch["left"][i])
    expected = up[i, :, top:top + 16, left:left + 16].flip(-1).reshape(3, 16, 16, 16)
    assert torch.allclose(rgb[i], expected, atol=1e-4)


def test_a_remote_clip_set_is_downloaded_once_and_trains_as_the_local_one(demo_clips, whole_run, tmp_path, http_server,
                                                                            capsys):
    """A clip set served over HTTP: read through --cache-dir (a loader worker reading the cached copies),
    every shard fetched once per machine, and the weights of the local run, tensor for tensor."""
    from shards.cache import human

    server = http_server(os.path.dirname(demo_clips))
    url = f"{server.url}/{os.path.basename(demo_clips)}"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--cache-limit"]
    assert in_process(train(url, tmp_path / "x"), capsys) == (
        f"Error: {url}: a remote clip set is read through a local cache (its units are read at random, a few at a "
        "time): give --cache-dir DIR --cache-limit SIZE (or ELR_CACHE_DIR, ELR_CACHE_LIMIT)")
    shards = ClipSet(demo_clips).shards("Split1", ["Train", "Validation", "Test"])
    total = sum(entry["bytes"] for _, entry in shards)
    assert in_process(train(url, tmp_path / "x", *cache, "100KB"), capsys) == (
        f"Error: --cache-limit 100.0 KB is too small: units of all {len(shards)} shards of Train, Validation, Test are "
        f"read at random in every epoch ({human(total)}); give at least --cache-limit {total}")
    assert not server.fetched()  # refused before any shard was read

    remote = subprocess.run(train(url, tmp_path / "remote", "--epochs", "1", "--workers", "1", *cache, "1GB"),
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert remote.returncode == 0, remote.stderr[-3000:]
    a, b = weights(whole_run / "last.pt"), weights(tmp_path / "remote" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ from the local run's"
    assert a["history"][0]["test_lr_rgb_video_acc"] == b["history"][0]["test_lr_rgb_video_acc"]
    fetched = {f"/{os.path.basename(demo_clips)}/{entry['path']}": 1 for _, entry in shards}
    assert server.fetched() == fetched  # each shard once, for every epoch, evaluation and loader worker
    from shards.cache import ShardCache

    again = ClipSet(url, ShardCache(str(tmp_path / "cache"), 10**9))  # what the next run does before its first step
    again.download("Split1", ["Train", "Validation", "Test"], progress=False)
    assert server.fetched() == fetched  # the next run reads the machine's copies
    assert again.read("Split1", "Test", again.units("Split1", "Test")[0])["meta"]["phase"] == "Test"


def test_a_damaged_frame_stops_the_run_with_one_line_naming_its_shard(demo_clips, tmp_path):
    """A frame a loader worker cannot decode: the run stops with one line naming the shard, the unit and
    the stream (the DataLoader would print the worker's traceback)."""
    import shutil
    import tarfile

    clips = str(tmp_path / "clips")
    shutil.copytree(demo_clips, clips)
    shard = os.path.join(clips, ClipSet(demo_clips).shards("Split1", ["Train"])[0][1]["path"])
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".hr_rgb.jpgs"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + 4 * 16)  # past the 16 frame sizes: frame 0's JPEG start marker
        f.write(b"\0\0")
    done = subprocess.run(train(clips, tmp_path / "run", "--epochs", "1", "--workers", "1"), capture_output=True,
                          text=True, env=ENV, timeout=600)
    h, w = ClipSet(clips).clips["size"]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: {shard}: key {member.name.split('.')[0]}: hr_rgb: frame 0 is not a {w}x{h} image (a damaged shard: "
        "elr-ingest verify checks every frame)")


def test_mistakes_are_one_line(demo_clips, tmp_path, capsys):
    units = len(ClipSet(demo_clips).units("Split1", "Train"))
    cases = {
        ("--streams", "hr_rgb,lr_flow"): "Error: --streams hr_rgb,lr_flow: RGB and flow streams need networks of their "
                                         "own (train them in two runs)",
        ("--crop-size", "32"): "Error: --crop-size 32 is more than the clip set was built for (16): build the clips "
                               "with elr-ingest build-clips --crop-size 32",
        ("--batch-size", "1000"): f"Error: --batch-size 1000 is more than the {units} Train units of {demo_clips}",
        ("--init", str(tmp_path / "c3d.pickle"), "--random-c3d", "-1"):
            f"Error: --init {tmp_path}/c3d.pickle: no such weights file",
    }
    for args, line in cases.items():  # each checked before any work or process starts
        assert in_process(train(demo_clips, tmp_path / "run", *args), capsys) == line, args
    assert not os.path.exists(tmp_path / "run")
    from click.testing import CliRunner

    from train.c3d import build_cli

    shown = CliRunner().invoke(build_cli(), ["--help"], terminal_width=80).output.splitlines()
    assert "    elr-train-c3d --clips data/HMDB51-clips --streams hr_rgb,lr_rgb --init c3d.pickle --out runs/c3d-rgb" \
        in shown  # the examples as written, not rewrapped


def test_extract_features_runs_a_fine_tuned_checkpoint_as_it_was_trained(demo_clips, whole_run, tmp_path, dask_client):
    from ingest.c3d.extract import ExtractConfig, extract_features
    from ingest.c3d.network import C3D, load_c3d
    from shards.manifest import file_sha256

    root = os.path.dirname(demo_clips)
    best = str(whole_run / "best.pt")
    with pytest.raises(Exception) as e:
        ExtractConfig(c3d_weights=best, side=32)
    assert str(e.value) == f"--crop-size 32: {best} was fine-tuned with --crop-size 16"
    cfg = ExtractConfig(c3d_weights=best, progress=False)  # 16x16 crops, caffe pool5: the checkpoint's
    assert (cfg.side, cfg.pool5) == (16, "caffe")
    record = extract_features(f"{root}/videos", f"{root}/splits", str(tmp_path / "HMDB51"), cfg, client=dask_client)
    assert record["side"] == 16 and record["weights"]["rgb"] == record["weights"]["flow"] == \
        {"file": best, "sha256": file_sha256(best)}
    net = load_c3d(best, 16, "caffe")  # its trunk, with the replicated borders it was trained with
    state = weights(best)["model"]
    assert isinstance(net, C3D) and net.conv1.padding_mode == "replicate"
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    video = sorted(record["videos"])[0]
    klass, name = video.split("/")
    phase = record["videos"][video]["phase"]
    features = np.load(tmp_path / "HMDB51" / "Split1" / f"{phase}_hr_features" / klass / f"{name}.npy")
    assert features.shape == (record["videos"][video]["units"], 4096) and np.isfinite(features).all()
