"""build-clips on real encoded videos: every 16-frame unit stored as the video gives it (raw: exactly;
JPEG: within JPEG's error), verify, a killed build resumed to the same bytes, bad videos, and readers
that refuse the other kind of set."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST, features_of, kill_after
from ingest.clips.build import ClipsConfig, build_clips
from ingest.videos.frames import FrameOptions, video_streams
from shards.cache import human as human_bytes
from shards.clips import STREAMS, ClipSet
from shards.manifest import load_manifest
from shards.verify import verify_shards
from videos import write_split_files

BIN = os.path.dirname(sys.executable)
SIDE = 32  # frames stored at 37x49: flow and JPEG are cheap on 2 cores


def cli(*args, **run):
    return subprocess.run([os.path.join(BIN, "elr-ingest"), *args], capture_output=True, text=True, **run)


def one_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    return result.stderr.strip()


@pytest.fixture(scope="module")
def raw_clips(sample_tree, tmp_path_factory, dask_client):
    root, _ = sample_tree
    out = str(tmp_path_factory.mktemp("clips") / "raw")
    build_clips(f"{root}/videos", f"{root}/splits", ClipsConfig(out=out, side=SIDE, storage="raw", min_shards=2,
                                                                 progress=False), client=dask_client)
    return out


def test_every_unit_is_stored_as_the_video_gives_it(sample_tree, raw_clips, tmp_path, dask_client):
    root, labels = sample_tree
    clips = ClipSet(raw_clips)
    assert clips.clips["size"] == [37, 49] and clips.clips["lr_size"] == [12, 16]
    opts = FrameOptions(side=SIDE)
    phases = {"1": "Train", "2": "Test", "0": "Validation"}
    seen = 0
    for phase in ("Train", "Validation", "Test"):
        units = clips.units("Split1", phase)
        rows = clips.videos("Split1", phase)
        assert sorted((r["class"], r["video"]) for r in rows) == sorted(
            (c, os.path.splitext(n)[0]) for c, vs in labels.items() for n, label in vs.items() if phases[label] == phase)
        for row_index, row in enumerate(rows):
            name = next(n for n in labels[row["class"]] if os.path.splitext(n)[0] == row["video"])
            info, streams = video_streams(f"{root}/videos/{row['class']}/{name}", row["class"], row["video"], opts)
            mine = [u for u in units if u[2] == row_index]
            assert len(mine) == row["units"] == info["units"] and row["frames"] == info["frames"]
            for unit in mine:
                sample = clips.read("Split1", phase, unit)
                u = unit[3]
                assert sample["meta"] == {"label": clips.classes.index(row["class"]), "class": row["class"],
                                          "video": row["video"], "split": "Split1", "phase": phase,
                                          "unit": u, "units": row["units"]}
                for s in STREAMS:
                    assert np.array_equal(sample[s], streams[s][u * 16:(u + 1) * 16]), (row["video"], u, s)
                seen += 1
    assert seen == 15  # 249 frames of 9 videos: 15 units

    # JPEG, through the command line: the same units within JPEG's error, verified
    jpeg = str(tmp_path / "jpeg")
    done = cli("build-clips", f"{root}/videos", "--splits", f"{root}/splits", "--out", jpeg, "--crop-size", str(SIDE),
               "--min-shards", "2", "--scheduler", dask_client.scheduler.address, "-q")
    assert done.returncode == 0 and done.stderr.strip() == (
        f"wrote 9 videos as 15 clips of 4 streams (Train 8, Validation 2, Test 5) to {jpeg}"), done.stderr
    lossy = ClipSet(jpeg)
    assert [r["key"] for r in lossy.videos("Split1", "Test")] == [r["key"] for r in clips.videos("Split1", "Test")]
    for unit in lossy.units("Split1", "Test"):
        a, b = lossy.read("Split1", "Test", unit), clips.read("Split1", "Test", unit)
        assert np.array_equal(a["lr_rgb"], b["lr_rgb"])  # eLR frames are never JPEG'd
        for s in ("hr_rgb", "hr_flow", "lr_flow"):
            error = np.abs(a[s].astype(int) - b[s]).mean()
            assert 0 < error < 6, (s, error)  # 37x49 frames: chroma subsampling shows
    report = verify_shards(jpeg, client=dask_client, progress=False)
    assert report["ok"] and report["checked"]["tar_shards"] == 6 and report["checked"]["samples"] == 9, report
    assert report["checked"]["clips"] == 15


@pytest.fixture(scope="module")
def raw_clips16(sample_tree, tmp_path_factory, dask_client):
    """Raw clips at extract-features' FAST crop (16): its features equal those from the videos."""
    root, _ = sample_tree
    out = str(tmp_path_factory.mktemp("clips16") / "raw16")
    build_clips(f"{root}/videos", f"{root}/splits", ClipsConfig(out=out, side=FAST["side"], storage="raw",
                                                                 min_shards=2, progress=False), client=dask_client)
    return out


def extract_cli(*args):
    from click.testing import CliRunner

    from ingest.cli import cli as ingest_cli

    return CliRunner().invoke(ingest_cli, ["extract-features", *args])


def test_extract_features_from_raw_clips_equals_extract_features_from_the_videos(sample_tree, extracted, raw_clips16,
                                                                                  tmp_path, dask_client):
    """--clips: no video decoded, no flow computed again; from raw clips the tree is the videos' tree,
    byte for byte. The options a clip set fixes are refused with it, one line each."""
    from ingest.c3d.extract import ExtractConfig, extract_features

    root, _ = sample_tree
    clips = raw_clips16
    out = str(tmp_path / "HMDB51")
    record = extract_features(None, None, out, ExtractConfig(**{**FAST, "side": None}, clips=clips), client=dask_client)
    videos_out, videos_record = extracted
    assert features_of(out) == features_of(videos_out) and len(features_of(out)) == 4 * 9
    assert record["inputs"] == {"clips": clips, "clips_digest": record["clips_digest"]}
    assert {k: record[k] for k in ("side", "flow", "flow_bound", "lr_size", "validation", "pool5")} == \
        {k: videos_record[k] for k in ("side", "flow", "flow_bound", "lr_size", "validation", "pool5")}
    assert record["phases"] == videos_record["phases"]

    def one_line(*args) -> str:
        done = extract_cli(*args, "--out", str(tmp_path / "x"), "--random-c3d", "0")
        assert done.exit_code == 1 and len(done.output.strip().splitlines()) == 1, done.output
        return done.output.strip()

    assert one_line("--clips", clips, "--flow", "farneback") == (
        "Error: --flow: with --clips the clip set's own is used (build-clips fixed it when it computed the frames and flow)")
    assert one_line(f"{root}/videos", "--clips", clips) == f"Error: --clips {clips} replaces VIDEOS and --splits: give one or the other"
    assert one_line(f"{root}/videos") == ("Error: give VIDEOS and --splits (the videos and HMDB51's split files), or "
                                          "--clips CLIPS (a clip set build-clips made from them)")
    assert one_line("--clips", clips, "--crop-size", "32") == \
        f"Error: --crop-size 32: the clip set {clips} holds frames for --crop-size 16"
    done = extract_cli("--clips", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--random-c3d", "0")
    assert done.exit_code == 2 and done.output.strip().splitlines()[-1] == \
        f"Error: Invalid value for '--clips': Directory '{tmp_path / 'nothing'}' does not exist."
    assert not os.path.exists(tmp_path / "x")


def test_extract_features_from_a_remote_clip_set_as_two_jobs(extracted, raw_clips16, tmp_path, http_server,
                                                             dask_client):
    """--clips URL through --cache-dir, as 2 jobs and --finish: the videos' tree byte for byte, each
    shard fetched once for both jobs and all their preparing workers; a missing or small cache is one
    line before anything is fetched."""
    from ingest.c3d.extract import ExtractConfig, extract_features
    from ingest.c3d.jobs import balanced_share
    from ingest.c3d.sources import plan_source

    server = http_server(os.path.dirname(raw_clips16))
    url, cache = f"{server.url}/{os.path.basename(raw_clips16)}", str(tmp_path / "cache")
    base = ["--clips", url, "--out", str(tmp_path / "x"), "--random-c3d", "0"]
    done = extract_cli(*base)
    assert done.exit_code == 1 and done.output.strip() == (
        f"Error: {url}: a remote clip set is read through a local cache (its units are read at random, a few at a "
        "time): give --cache-dir DIR --cache-limit SIZE (or ELR_CACHE_DIR, ELR_CACHE_LIMIT)"), done.output
    phases = load_manifest(raw_clips16)["splits"]["Split1"]
    shards = [s for phase in phases.values() for s in phase["webdataset"]["shards"]]
    total = sum(s["bytes"] for s in shards)
    done = extract_cli(*base, "--cache-dir", cache, "--cache-limit", "1KB")
    assert done.exit_code == 1 and done.output.strip() == (
        "Error: --cache-limit 1.0 KB is too small: extract-features reads every video of the split, in class order, "
        f"from shards in any order (all {len(shards)} shards of {', '.join(phases)}: "
        f"{human_bytes(total)}); give at least --cache-limit {total}"), done.output
    assert not server.fetched() and not os.path.exists(tmp_path / "x")

    out = str(tmp_path / "HMDB51")
    options = dict(FAST, side=None, clips=url, cache_dir=cache, cache_limit="1GB", num_jobs=2)
    first = ExtractConfig(**options, job_index=0)
    mine = balanced_share(plan_source(None, None, first).jobs, 2, 0)
    clip_set = ClipSet(raw_clips16)
    holding = {(job.phase, clip_set.videos("Split1", job.phase)[job.index]["shard"]) for job in mine}
    path_of = {(phase, os.path.basename(s["path"])): s["path"]
               for phase in phases for s in phases[phase]["webdataset"]["shards"]}
    extract_features(None, None, out, first, client=dask_client)
    # job 0 downloads the shards that hold its videos, and no other
    assert server.fetched() == {f"/{os.path.basename(raw_clips16)}/{path_of[h]}": 1 for h in holding}
    assert len(holding) < len(shards)
    extract_features(None, None, out, ExtractConfig(**options, job_index=1), client=dask_client)
    record = extract_features(None, None, out, ExtractConfig(**options, finish=True), client=dask_client)
    videos_out, _ = extracted
    assert features_of(out) == features_of(videos_out)
    assert record["inputs"] == {"clips": url, "clips_digest": record["clips_digest"]}
    assert server.fetched() == {f"/{os.path.basename(raw_clips16)}/{s['path']}": 1 for s in shards}


def test_info_summarises_a_clip_set(raw_clips, http_server):
    from click.testing import CliRunner

    from ingest.cli import cli as ingest_cli

    done = CliRunner().invoke(ingest_cli, ["info", raw_clips])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    manifest = load_manifest(raw_clips)
    tar_mb = sum(s["bytes"] for p in manifest["splits"]["Split1"].values() for s in p["webdataset"]["shards"]) / 1e6
    assert lines[:3] == [f"clip set   {raw_clips}", f"videos     {manifest['source']['videos']}",
                         "classes 3, 16-frame clips: HR RGB 37x49 and LR RGB 12x16 (raw), HR and LR flow images 37x49 "
                         "(dis, bound 20); frames stored as raw"]
    assert lines[-1] == f"{'total':<22}{9:>8}{0:>9}{15:>9}{'':>9}{6:>8}{tar_mb:>10.1f}"
    info = json.loads(CliRunner().invoke(ingest_cli, ["info", raw_clips, "--json"]).output)
    assert info["content"] == "clips" and info["clips"]["storage"] == "raw"
    assert sum(p["units"] for p in info["phases"]) == 15
    # a remote set: the same summary from its manifest alone; verify refuses it, saying why
    url = f"{http_server(os.path.dirname(raw_clips)).url}/{os.path.basename(raw_clips)}"
    remote = json.loads(CliRunner().invoke(ingest_cli, ["info", url, "--json"]).output)
    assert remote == {**info, "path": url}
    assert one_line(cli("verify", url)) == (f"Error: Invalid value for 'SHARDS': {url}: verify reads a local copy (it "
                                            "hashes every shard and decodes every sample); download the set first")


def test_verify_finds_a_damaged_frame_and_each_reader_refuses_the_other_kind(raw_clips, tmp_path, dask_client,
                                                                             sample_tree):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(raw_clips, damaged)
    manifest = json.load(open(os.path.join(damaged, "manifest.json")))
    rel = manifest["splits"]["Split1"]["Train"]["webdataset"]["shards"][0]["path"]
    with open(os.path.join(damaged, rel), "r+b") as f:  # a byte of the first unit's first member's data
        f.seek(512 + 100)
        byte = f.read(1)
        f.seek(512 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_shards(damaged, client=dask_client, progress=False)
    assert report["problems"] == [f"{rel}: sha256 differs from the manifest"], report["problems"]

    trained = subprocess.run([os.path.join(BIN, "elr-train"), "--shards", raw_clips, "--out", str(tmp_path / "run")],
                             capture_output=True, text=True)
    assert one_line(trained) == (
        f"Error: {raw_clips}: a clip set (build-clips: 16-frame clips, not C3D features); fine-tune C3D on it with "
        f"elr-train-c3d --clips {raw_clips}, or give a feature shard set (build-shards)")
    with pytest.raises(Exception) as e:
        ClipSet(os.path.join(os.path.dirname(__file__), "..", "shards"))
    assert "no manifest" in str(e.value)


def test_a_killed_build_resumes_to_the_same_bytes(sample_tree, raw_clips, tmp_path, dask_client):
    root, _ = sample_tree
    out = str(tmp_path / "again")
    cmd = [os.path.join(BIN, "elr-ingest"), "build-clips", f"{root}/videos", "--splits", f"{root}/splits", "--out", out,
           "--crop-size", str(SIDE), "--storage", "raw", "--min-shards", "2", "--workers", "1", "-q"]
    done_dir = out + ".building/_build/done/Split1/Train"
    for _ in range(3):  # a kill must land before the build publishes (else try again)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".building", ignore_errors=True)
        kill_after(cmd, done_dir, files=1)
        if os.path.isdir(out + ".building"):
            break
    assert os.path.isdir(out + ".building") and not os.path.exists(out)
    assert one_line(cli(*cmd[1:])) == (f"Error: {out}.building: an interrupted build is here; pass --resume to "
                                       "continue it or --overwrite to start over")
    resumed = cli(*cmd[1:], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.load(open(f"{out}/manifest.json"))["splits"] == json.load(open(f"{raw_clips}/manifest.json"))["splits"]
    for folder, _, files in os.walk(raw_clips):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), raw_clips)
            assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(raw_clips, rel), "rb").read(), rel
    assert sorted(os.listdir(out)) == ["Split1", "manifest.json"]


def test_bad_videos_stop_the_build_with_one_line_or_are_listed(sample_tree, bad_tree, tmp_path, dask_client):
    root, labels = sample_tree
    bad_root, _ = bad_tree
    videos = tmp_path / "videos"
    shutil.copytree(f"{root}/videos/talk", videos / "talk")
    shutil.copy(f"{bad_root}/videos/broken/notes.avi", videos / "talk" / "notes.avi")
    labels = {"talk": {**labels["talk"], "notes.avi": "1"}}
    write_split_files(str(tmp_path / "splits"), labels)
    out = str(tmp_path / "clips")
    args = ["build-clips", str(videos), "--splits", str(tmp_path / "splits"), "--out", out, "--crop-size", str(SIDE),
            "--scheduler", dask_client.scheduler.address, "-q"]
    failed = cli(*args)
    assert one_line(failed).startswith(f"Error: video talk/notes: {videos}/talk/notes.avi: not a readable video")
    assert not os.path.exists(out) and not os.path.exists(out + ".building")
    skipped = cli(*args, "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    train = load_manifest(out)["splits"]["Split1"]["Train"]
    assert [(s["class"], s["video"]) for s in train["skipped"]] == [("talk", "notes")]
    assert "notes" not in [s["video"] for s in train["samples"]]
    assert skipped.stderr.strip().endswith("; 1 skipped, listed in manifest.json")
