"""build-shards: round trip, layout, determinism, crash safety and resume."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from conftest import TINY, build, source_array
from shards.build import BuildConfig, build_shards
from shards.errors import OutputExistsError
from shards.manifest import file_sha256, load_manifest
from shards.schema import STREAMS
from shards.source import video_key
from shards.tario import iter_tar_samples
from shards.zarrio import ZarrPhaseReader


def all_files(root):
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            found[os.path.relpath(path, root)] = file_sha256(path)
    return found


def test_round_trip_tar_and_zarr_equal_source(demo_master, built_master):
    m = load_manifest(str(built_master))
    assert m["classes"] == sorted(os.listdir(demo_master / "Split1" / "Train"))
    assert m["dim"] == TINY["dim"] and m["dtype"] == "float32"
    n_seen = 0
    for phase in ("Train", "Validation", "Test"):
        entry = m["splits"]["Split1"][phase]
        assert len(entry["samples"]) == TINY["classes"] * TINY["videos_per_class"]
        by_key = {s["key"]: s for s in entry["samples"]}
        zarr = ZarrPhaseReader(str(built_master / entry["zarr"]["path"]))
        zarr_samples = {s["__key__"]: s for s in zarr.iter_range(0, len(zarr))}
        for shard in entry["webdataset"]["shards"]:
            for sample in iter_tar_samples(str(built_master / shard["path"])):
                meta = sample["meta"]
                assert sample["__key__"] == video_key("Split1", phase, meta["class"], meta["video"])
                assert by_key[sample["__key__"]]["label"] == m["classes"].index(meta["class"]) == meta["label"]
                for stream, folder in STREAMS.items():
                    expected = source_array(demo_master, "Split1", phase, folder, meta["class"], meta["video"])
                    np.testing.assert_array_equal(sample[stream], expected)
                    np.testing.assert_array_equal(zarr_samples[sample["__key__"]][stream], expected)
                assert meta["units"] == sample["lr_rgb"].shape[0]
                n_seen += 1
    assert n_seen == 3 * TINY["classes"] * TINY["videos_per_class"]


def test_keys_are_webdataset_safe_for_real_hmdb_names(built_master):
    m = load_manifest(str(built_master))
    samples = [s for e in m["splits"]["Split1"].values() for s in e["samples"]]
    names = "".join(s["video"] for s in samples)
    for ch in "#()!&'+.":
        assert ch in names, f"demo names should exercise {ch!r}"
    assert len({s["key"] for s in samples}) == len(samples)
    # plain webdataset splits member names at the first dot: each sample must still come out whole
    import webdataset as wds

    by_key = {s["key"]: s for s in samples}
    seen = 0
    for entry in m["splits"]["Split1"].values():
        for shard in entry["webdataset"]["shards"]:
            for sample in wds.WebDataset(str(built_master / shard["path"]), shardshuffle=False):
                fields = {k for k in sample if not k.startswith("__")}
                assert fields == {"json", "hr_rgb.npy", "lr_rgb.npy", "hr_flow.npy", "lr_flow.npy"}, fields
                assert json.loads(sample["json"])["video"] == by_key[sample["__key__"]]["video"]
                seen += 1
    assert seen == len(samples)


def test_layout_min_shards_and_sizes(demo_master, tmp_path, dask_client):
    m = build(demo_master, dask_client, out=str(tmp_path / "a"), min_shards=8, formats=("webdataset",))
    for phase, entry in m["splits"]["Split1"].items():
        shards = entry["webdataset"]["shards"]
        assert [os.path.basename(s["path"]) for s in shards] == [f"{phase}-{i:06d}.tar" for i in range(8)]
        assert sum(s["samples"] for s in shards) == 18
        assert all(os.path.getsize(tmp_path / "a" / s["path"]) == s["bytes"] for s in shards)
    assert not (tmp_path / "a" / "Split1" / "Train.zarr").exists()
    # a small shard size makes more shards than min_shards: 18 videos, each ~1-3 KB -> at least 18 / 2 shards
    m = build(demo_master, dask_client, out=str(tmp_path / "b"), shard_bytes=1500, min_shards=1, formats=("webdataset",))
    sizes = [len(e["webdataset"]["shards"]) for e in m["splits"]["Split1"].values()]
    assert all(n >= 9 for n in sizes), sizes


def test_two_builds_are_byte_identical(demo_master, tmp_path, dask_client):
    a = build(demo_master, dask_client, out=str(tmp_path / "a"))  # 2 workers
    b = build_shards(str(demo_master), BuildConfig(out=str(tmp_path / "b"), workers=1, progress=False))  # its own 1
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")
    assert a == b
    c = build(demo_master, dask_client, out=str(tmp_path / "c"), seed=7)  # another shuffle: other bytes
    assert all_files(tmp_path / "a") != all_files(tmp_path / "c")
    assert sorted(s["key"] for s in a["splits"]["Split1"]["Train"]["samples"]) == \
        sorted(s["key"] for s in c["splits"]["Split1"]["Train"]["samples"])


def test_default_output_beside_symlinked_root(demo_master, tmp_path, dask_client):
    os.makedirs(tmp_path / "data")
    os.symlink(demo_master, tmp_path / "data" / "HMDB51")
    build(tmp_path / "data" / "HMDB51", dask_client, formats=("webdataset",))
    assert (tmp_path / "data" / "HMDB51-shards" / "manifest.json").exists()
    assert not (tmp_path / "data" / "HMDB51-shards.building").exists()


def test_existing_set_is_never_overwritten_silently(built, demo_master, dask_client):
    before = all_files(built)
    with pytest.raises(OutputExistsError, match=r"a shard set already exists; pass --overwrite to replace it"):
        build(demo_master, dask_client, out=str(built), seed=3)
    assert all_files(built) == before
    build(demo_master, dask_client, out=str(built), seed=3, overwrite=True)
    assert load_manifest(str(built))["options"]["seed"] == 3
    assert not any(p.name.startswith("HMDB51-shards.old") for p in built.parent.iterdir())


def test_float16_storage(demo_master, tmp_path, dask_client):
    m = build(demo_master, dask_client, out=str(tmp_path / "h"), dtype="float16")
    entry = m["splits"]["Split1"]["Test"]
    sample = next(iter_tar_samples(str(tmp_path / "h" / entry["webdataset"]["shards"][0]["path"])))
    meta = sample["meta"]
    src = source_array(demo_master, "Split1", "Test", "lr_features", meta["class"], meta["video"])
    assert sample["lr_rgb"].dtype == np.float16
    np.testing.assert_array_equal(sample["lr_rgb"], src.astype(np.float16))


def _done_records(staging):
    folder = os.path.join(staging, "_build", "done")
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs] if os.path.isdir(folder) else []


def test_kill_9_then_resume_equals_clean_build(tmp_path, dask_client):
    from shards.demo import DemoConfig, make_demo
    root = tmp_path / "data" / "HMDB51"
    make_demo(str(root), DemoConfig(classes=12, videos_per_class=6, dim=64, min_units=3, max_units=12, seed=5))
    out, clean = tmp_path / "data" / "HMDB51-shards", tmp_path / "clean"
    options = ["--shard-size", "6KB", "--zarr-chunk-units", "8", "--zarr-shard-units", "32"]
    cmd = [sys.executable, "-m", "ingest.cli", "build-shards", str(root), "--workers", "1", "-q", *options]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    staging = str(out) + ".building"
    deadline = time.time() + 120
    while len(_done_records(staging)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the build finished before it could be killed; make the test tree bigger"
    # nothing under a final name is incomplete: every .tar parses to its end and matches its journal record
    for folder, _, files in os.walk(staging):
        for f in files:
            if f.endswith(".tar"):
                with tarfile.open(os.path.join(folder, f)) as t:
                    assert len(t.getmembers()) % 5 == 0
    subprocess.run(cmd + ["--resume"], check=True, stderr=subprocess.DEVNULL, timeout=300)
    subprocess.run([sys.executable, "-m", "ingest.cli", "build-shards", str(root), "--out", str(clean),
                    "--workers", "1", "-q", *options], check=True, stderr=subprocess.DEVNULL, timeout=300)
    assert all_files(out) == all_files(clean)
    result = subprocess.run([sys.executable, "-m", "ingest.cli", "verify", str(out), "--source", str(root), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("OK: ")
    assert not os.path.exists(staging)


def test_resume_refuses_a_changed_source(demo_tree, tmp_path, dask_client):
    out = tmp_path / "out"
    staging = tmp_path / "out.building"
    (staging / "_build").mkdir(parents=True)
    (staging / "_build" / "plan.json").write_text(json.dumps({"options": {}, "phases": {}}))
    with pytest.raises(OutputExistsError, match=r"an interrupted build is here; pass --resume to continue it"):
        build(demo_tree, dask_client, out=str(out))
    with pytest.raises(OutputExistsError, match=r"the source tree or options changed since the interrupted build"):
        build(demo_tree, dask_client, out=str(out), resume=True)


def test_webdataset_reads_our_shards(built_master):
    """The shards are plain WebDataset tars: webdataset's own pipeline decodes them."""
    import webdataset as wds

    m = load_manifest(str(built_master))
    urls = [str(built_master / s["path"]) for s in m["splits"]["Split1"]["Test"]["webdataset"]["shards"]]
    ours = {s["__key__"]: s for u in urls for s in iter_tar_samples(u)}
    theirs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(theirs) == len(ours) == 18
    for s in theirs:
        np.testing.assert_array_equal(s["hr_flow.npy"], ours[s["__key__"]]["hr_flow"])
        assert s["json"]["video"] == ours[s["__key__"]]["meta"]["video"]


def test_resume_publishes_no_file_the_manifest_does_not_list(demo_master, tmp_path, dask_client):
    """Temporary files of writers killed mid-write (here, or on a lost dask worker) never reach the set."""
    out = tmp_path / "set"
    staging = tmp_path / "set.building"
    strays = ["Split1/Validation/Validation-000004.tar.partial-15272", "Split1/Train/Train-000001.tar.partial-518",
              "Split1/Train.zarr/hr_rgb/c/0/0.partial-14262-ab12cd", "leftover.json.partial-7-000000"]
    for rel in strays:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(b"")
    m = build(demo_master, dask_client, out=str(out), resume=True, formats=("webdataset",))
    from shards.manifest import listed_files
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed_files(m) and not any(".partial-" in p for p in on_disk)


def test_verify_reports_every_file_the_manifest_does_not_list(built, dask_client):
    from shards.verify import verify_shards

    (built / "Split1" / "Test" / "Test-000001.tar.partial-99").write_bytes(b"")
    (built / "Split1" / "Train.zarr" / "lr_rgb" / "c" / "0" / "0.partial-1-abc").write_bytes(b"x")
    (built / "notes.txt").write_text("hello")
    (built / "Split1" / "Test" / "Test-000002.tar.partial-4242-0a1b2c").write_bytes(b"half")  # as atomic writes name them
    report = verify_shards(str(built), client=dask_client, progress=False)
    assert not report["ok"]
    assert sorted(report["problems"]) == ["Split1/Test/Test-000001.tar.partial-99: not in the manifest",
                                          "Split1/Test/Test-000002.tar.partial-4242-0a1b2c: a temporary file of a writer "
                                          "killed mid-write",
                                          "Split1/Train.zarr/lr_rgb/c/0/0.partial-1-abc: not in the manifest",
                                          "notes.txt: not in the manifest"]


def test_manifest_records_each_samples_byte_range(built_master):
    """A remote stream starting mid-shard reads just its samples' bytes: the manifest says where they are."""
    m = load_manifest(str(built_master))
    entry = m["splits"]["Split1"]["Test"]
    for shard in entry["webdataset"]["shards"]:
        data = (built_master / shard["path"]).read_bytes()
        spans = [(s["offset"], s["bytes"]) for s in entry["samples"] if s["shard"] == os.path.basename(shard["path"])]
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
        assert data[spans[-1][0] + spans[-1][1]:] == bytes(len(data) - spans[-1][0] - spans[-1][1])  # then only the end marker
        for offset, size in spans:
            assert data[offset + 257:offset + 262] == b"ustar"  # each range starts at a tar header


def test_demo_lengths_follow_real_hmdb51_per_class(tmp_path):
    """make-demo --lengths hmdb51: each video's units come from its class's histogram of real HMDB51."""
    from shards.demo import DemoConfig, hmdb51_units, make_demo

    make_demo(str(tmp_path / "HMDB51"), DemoConfig(videos_per_class=6, dim=4, lengths="hmdb51", seed=4))
    table = hmdb51_units()
    assert int(table["*"][1].sum()) == 6766 and len(table) == 52  # every clip, 51 classes + all
    units = {}
    for path in (tmp_path / "HMDB51" / "Split1").glob("*_lr_features/*/*.npy"):
        units.setdefault(path.parent.name, []).append(np.load(path).shape[0])
    assert len(units) == 51 and all(len(v) == 18 for v in units.values())
    for name, lengths in units.items():
        assert set(lengths) <= set(table[name][0].tolist()), name  # only lengths the class really has
    assert np.mean(units["hit"]) < 3 < 12 < np.mean(units["brush_hair"])
    assert 3.5 <= np.median([u for v in units.values() for u in v]) <= 4.5  # HMDB51's median is 4


def test_a_local_cluster_starting_while_the_caller_fails_is_closed():
    from distributed.core import Status

    from shards.parallel import start_workers

    with pytest.raises(ValueError, match="^the scan failed$"):
        with start_workers(1) as workers:
            assert workers.local
            raise ValueError("the scan failed")  # while the cluster starts: this error is the one raised
    cluster, client = workers._starting.result()
    assert client.status == "closed" and cluster.status == Status.closed


def test_read_ahead_reads_every_file_and_closes_what_it_opened(demo_master):
    from shards.source import discover, read_ahead

    videos = [v for vs in discover(str(demo_master)).phases.values() for v in vs][:12]
    open_fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = open_fds()
    for v, raws in read_ahead(videos, window=4):
        assert raws == [open(p, "rb").read() for p in v.paths]
    assert open_fds() == before
    gen = read_ahead(videos, window=4)
    next(gen)  # a task that fails after its first video abandons the generator
    assert open_fds() > before
    gen.close()
    assert open_fds() == before


def test_a_local_cluster_leaves_the_callers_environment_as_it_was():
    """dask's nanny writes OMP/MKL_NUM_THREADS=1 into its parent's environment for the workers; a
    process the command starts afterwards would inherit them (torch on one thread). Ours restores it."""
    from shards.parallel import start_workers

    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}  # as a user's shell has it
    before = dict(os.environ)
    try:
        with start_workers(1) as workers:
            assert workers.client.submit(os.getenv, "MKL_NUM_THREADS").result() == "1"  # the workers keep theirs
            assert dict(os.environ) == before
    finally:
        os.environ.update(saved)
