"""Remote shard sets through fsspec: S3 (a moto S3-API server), HTTP (`python -m http.server`), range reads,
retries, and a server that dies mid-run or comes back."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import HttpServer, s3_endpoint, small_remote_set
from shards import remote
from shards.errors import RemoteError
from shards.manifest import load_manifest
from shards.tario import iter_raw_samples, mapped_samples

BIN = os.path.dirname(sys.executable)
SMALL = dict(hidden=8, batch_size=8, data_streams=2, loader_workers=0, quiet=True, test_every=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dask_client):
    return small_remote_set(tmp_path_factory, dask_client, "remote", min_shards=2)


@pytest.fixture(scope="module")
def s3_set(shards):
    """The shard set uploaded to a bucket of a real S3-API server (moto's server mode) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with s3_endpoint(f"http://{host}:{port}") as fs:
        fs.mkdir("elr-test")
        fs.put(str(shards), "elr-test/HMDB51-shards", recursive=True)
        yield "s3://elr-test/HMDB51-shards"
    server.stop()


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(shards, out, **kw):
    from train.ddp import TrainConfig, train as run

    return run(TrainConfig(shards=str(shards), out=str(out), **SMALL, **kw))


def test_s3_manifest_samples_and_training_equal_local(shards, s3_set, tmp_path):
    local = load_manifest(str(shards))
    assert load_manifest(s3_set) == local
    shard = local["splits"]["Split1"]["Train"]["webdataset"]["shards"][0]
    assert [s["__key__"] for s in iter_raw_samples(f"{s3_set}/{shard['path']}")] == \
        [s["__key__"] for s in mapped_samples(str(shards / shard["path"]))]
    train(shards, tmp_path / "local", epochs=2)
    record = train(s3_set, tmp_path / "s3", epochs=2)
    assert_same(weights(tmp_path / "s3"), weights(tmp_path / "local"))
    assert record["test_acc"] is not None


def test_a_stream_starting_mid_shard_reads_only_its_byte_range(shards, s3_set, monkeypatch):
    m = load_manifest(str(shards))
    entry = m["splits"]["Split1"]["Train"]
    shard = entry["webdataset"]["shards"][0]
    spans = tuple((s["offset"], s["bytes"]) for s in entry["samples"] if s["shard"] == os.path.basename(shard["path"]))
    assert len(spans) >= 3
    requests, read = [], remote.read_bytes

    def recording(url, start=None, end=None):
        requests.append((start, end))
        return read(url, start, end)

    monkeypatch.setattr(remote, "read_bytes", recording)
    got = list(iter_raw_samples(f"{s3_set}/{shard['path']}", 1, 2, spans))
    assert requests == [(spans[1][0], spans[2][0] + spans[2][1])]  # one request: samples 1 and 2, nothing else
    want = list(mapped_samples(str(shards / shard["path"]), skip=1, take=2))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    for a, b in zip(got, want):
        assert all(bytes(a[f]) == bytes(b[f]) for f in b if f != "__key__")


def test_http_server_without_ranges_gives_the_same_samples(shards, http_server):
    server = http_server(shards)
    m = load_manifest(server.url)
    entry = m["splits"]["Split1"]["Test"]
    shard = entry["webdataset"]["shards"][-1]
    spans = tuple((s["offset"], s["bytes"]) for s in entry["samples"] if s["shard"] == os.path.basename(shard["path"]))
    got = list(iter_raw_samples(f"{server.url}/{shard['path']}", 1, None, spans))
    want = list(mapped_samples(str(shards / shard["path"]), skip=1))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want] and len(got) == len(spans) - 1
    assert np.array_equal(np.frombuffer(got[0]["lr_rgb.npy"], np.uint8), np.frombuffer(want[0]["lr_rgb.npy"], np.uint8))


def test_missing_urls_are_one_error_naming_the_url(shards, http_server, s3_set):
    server = http_server(shards)
    with pytest.raises(RemoteError, match=rf"^{server.url}/nope/manifest.json: .*[Nn]ot [Ff]ound"):
        load_manifest(f"{server.url}/nope")
    with pytest.raises(RemoteError, match=r"^s3://elr-test/elsewhere/manifest.json: "):
        load_manifest("s3://elr-test/elsewhere")


def train_cmd(shards, out, epochs=3):
    return [os.path.join(BIN, "elr-train"), "--shards", str(shards), "--out", str(out), "--epochs", str(epochs),
            "--hidden", "8", "--batch-size", "8", "--data-streams", "2", "--loader-workers", "0", "-q"]


def run_killing_server(shards, out, env, restart_after=None, extra=()):
    """elr-train over HTTP; the server dies right after it served the first tar shard, and comes back
    after `restart_after` seconds (never, if None). Returns the exit code, stderr, time and URL."""
    server = HttpServer(shards).start()
    cmd = train_cmd(server.url, out) + list(extra)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    try:
        while not any(r.endswith(".tar") for r in server.requests):
            assert proc.poll() is None and time.time() - t0 < 60, "the run ended before it read a shard"
            time.sleep(0.002)
        server.stop()
        if restart_after is not None:
            threading.Timer(restart_after, server.start).start()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        time.sleep(restart_after or 0)
        server.stop()
    return proc.returncode, stderr, time.time() - t0, server.url


@pytest.mark.parametrize("extra", [(), ("--nproc", "2"), ("--loader-workers", "2")], ids=["1", "nproc2", "workers2"])
def test_server_dying_mid_run_is_one_error_naming_the_url(shards, tmp_path, extra):
    """Once per process tree: two ranks (each failing on its own shard) or a loader worker (whose error
    the DataLoader re-raises with the worker's traceback) still print one line."""
    code, stderr, seconds, url = run_killing_server(shards, tmp_path / "run", {"ELR_REMOTE_RETRIES": "2",
                                                                              "ELR_REMOTE_BACKOFF": "0.1"}, extra=extra)
    lines = [line for line in stderr.splitlines() if not line.startswith("config {")]
    assert code == 1 and "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    # the file it was reading: a shard, or the rows of the sample table that say where a shard's samples lie
    assert lines[0].startswith(f"Error: {url}/Split1/") and (".tar: " in lines[0] or ".samples.jsonl: " in lines[0]), lines
    assert "(gave up after 3 attempts in " in lines[0] and seconds < 60


def test_server_back_within_the_retry_window_gives_the_uninterrupted_weights(shards, tmp_path):
    subprocess.run(train_cmd(shards, tmp_path / "local"), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, stderr, _, _ = run_killing_server(shards, tmp_path / "http", {"ELR_REMOTE_RETRIES": "8",
                                                                       "ELR_REMOTE_BACKOFF": "0.2"}, restart_after=1.5)
    assert code == 0, stderr[-3000:]
    assert_same(weights(tmp_path / "http"), weights(tmp_path / "local"))


def test_loader_workers_over_http_copy_what_they_cannot_place(shards, http_server):
    """Workers on CPU send local videos as places in the shard files; remote videos have none, so their
    micro-batches go through the workers' rings (allocated because the set is remote): the same steps."""
    from elr.data import TRAIN_INPUTS, DevicePrefetcher, Places, ShardStream, StepLoader, StreamPlan, input_fields
    from elr.data import phase_shards

    server = http_server(shards)
    inputs = TRAIN_INPUTS["lr+hr"]
    steps = {}
    for name, root in (("local", str(shards)), ("http", server.url)):
        plan = StreamPlan(phase_shards(load_manifest(root), root, "Split1", ("Train",)), 2, 2)
        ds = ShardStream(plan, 0, 1, input_fields(inputs), seed=0, buffer=4)
        loader = StepLoader(ds, 2)
        assert type(loader.handoff) is Places and len(loader.handoff.arenas) == (2 if name == "http" else 0)
        steps[name] = [batch for _, batch in DevicePrefetcher(loader, inputs, "cpu")]
        assert all(a.idle() for a in loader.handoff.arenas)  # every ring block was freed after its step
    assert len(steps["local"]) == len(steps["http"]) == plan.steps_per_epoch
    for a, b in zip(steps["local"], steps["http"]):
        for key in ("rgb", "flow", "lengths", "labels"):
            assert torch.equal(a[key], b[key])
