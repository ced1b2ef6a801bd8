"""The local cache of remote shard sets (shards/cache.py), counted at real servers: moto's S3-API server
and `python -m http.server` as separate processes, whose logs give every GET."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import HttpServer, MotoServer, SlowHttpServer, s3_endpoint, small_remote_set
from shards import remote
from shards.cache import CacheError, ShardCache, human, parse_size
from shards.errors import RemoteError
from shards.manifest import load_manifest

BIN = os.path.dirname(sys.executable)
SMALL = dict(hidden=8, batch_size=8, data_streams=2, loader_workers=0, quiet=True, test_every=3, epochs=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dask_client):
    return small_remote_set(tmp_path_factory, dask_client, "cache", min_shards=3)


@pytest.fixture(scope="module")
def local_weights(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    train(shards, out)
    return weights(out)


@pytest.fixture(scope="module")
def servers(shards):
    """The set behind an HTTP server and in a bucket of moto's S3-API server: {name: (server, url)}."""
    http = HttpServer(shards).start()
    moto = MotoServer().start()
    with s3_endpoint(moto.url) as fs:
        fs.mkdir("elr-cache")
        fs.put(str(shards), "elr-cache/HMDB51-shards", recursive=True)
        yield {"http": (http, http.url), "s3": (moto, "s3://elr-cache/HMDB51-shards")}
    http.stop()
    moto.stop()


def tar_shards(shards) -> dict:
    """{relative path: (bytes, sha256)} of every tar shard of the set."""
    m = load_manifest(str(shards))
    return {s["path"]: (s["bytes"], s["sha256"]) for phases in m["splits"].values() for e in phases.values()
            for s in e["webdataset"]["shards"]}


def train(shards, out, **kw):
    from train.ddp import TrainConfig, train as run

    return run(TrainConfig(shards=str(shards), out=str(out), **{**SMALL, **kw}))


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def settle(server, before: dict) -> dict:
    """The tar GETs since `before`, once the server's log has caught up."""
    time.sleep(0.3)
    now = server.fetched()
    return {p: n - before.get(p, 0) for p, n in now.items() if n - before.get(p, 0)}


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_each_shard_is_fetched_once_over_three_epochs_and_the_weights_equal_a_local_run(
        kind, servers, shards, local_weights, tmp_path):
    server, url = servers[kind]
    before = server.fetched()
    cache = tmp_path / "cache"
    train(url, tmp_path / "run", cache_dir=str(cache), cache_limit="1GB")
    got = settle(server, before)
    every = tar_shards(shards)
    assert sorted(p.rsplit("HMDB51-shards/", 1)[-1].lstrip("/") for p in got) == sorted(every)
    assert set(got.values()) == {1}  # Train, Validation and Test shards: one GET each over 3 epochs and a test
    assert_same(weights(tmp_path / "run"), local_weights)
    assert sorted(f for f in os.listdir(cache) if f.endswith(".tar")) == sorted(f"{sha}.tar" for _, sha in every.values())


def test_a_corrupted_cached_shard_is_fetched_again(servers, shards, local_weights, tmp_path):
    server, url = servers["http"]
    cache = tmp_path / "cache"
    train(url, tmp_path / "a", cache_dir=str(cache), cache_limit="1GB")
    size, sha = next(iter(tar_shards(shards).values()))
    path = cache / f"{sha}.tar"
    with open(path, "r+b") as f:  # same size, one byte changed: bit rot or a stray write
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    before = server.fetched()
    train(url, tmp_path / "b", cache_dir=str(cache), cache_limit="1GB")
    got = settle(server, before)
    assert list(got.values()) == [1] and list(got)[0].endswith(next(iter(tar_shards(shards))))
    assert_same(weights(tmp_path / "b"), local_weights)


def test_two_ranks_with_two_workers_each_download_every_shard_once(servers, shards, local_weights, tmp_path):
    server, url = servers["http"]
    before = server.fetched()
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "elr-train"), "--shards", url, "--out", str(out), "--nproc", "2", "--loader-workers", "2",
           "--hidden", "8", "--batch-size", "8", "--data-streams", "4", "--epochs", "2", "--test-every", "2", "-q"]
    env = {**os.environ, "ELR_CACHE_DIR": str(tmp_path / "cache"), "ELR_CACHE_LIMIT": "1GB"}  # as a cluster sets it
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = settle(server, before)
    assert len(got) == len(tar_shards(shards)) and set(got.values()) == {1}


def test_a_limit_below_one_step_is_refused_and_the_smallest_limit_reads_every_video_once_per_epoch(
        servers, shards, tmp_path):
    server, url = servers["http"]
    sizes = sorted((b for b, _ in tar_shards(shards).values()), reverse=True)
    need = sum(sizes[:4])  # 2 streams, each reading a shard and downloading the next
    with pytest.raises(CacheError) as e:
        train(url, tmp_path / "refused", cache_dir=str(tmp_path / "c0"), cache_limit=str(need - 1))
    assert str(e.value) == (f"--cache-limit {human(need - 1)} is too small: a step can read 4 shards at once "
                            f"({human(need)} for the largest); give at least --cache-limit {need}")
    assert not os.path.exists(tmp_path / "refused")
    before = server.fetched()
    out = tmp_path / "run"
    train(url, out, cache_dir=str(tmp_path / "cache"), cache_limit=str(need), log_samples=True)
    got = settle(server, before)
    assert sum(got.values()) > len(tar_shards(shards))  # evicted, fetched again
    cached = sum(os.path.getsize(tmp_path / "cache" / f) for f in os.listdir(tmp_path / "cache") if f.endswith(".tar"))
    assert cached <= need
    rows = [json.loads(line) for line in open(out / "samples-rank0.jsonl")]
    train_keys = {s["__key__"] for s in _train_samples(shards)}
    assert len({r["epoch"] for r in rows}) == 3
    for epoch in {r["epoch"] for r in rows}:
        keys = [k for r in rows if r["epoch"] == epoch for k in r["keys"]]
        assert sorted(set(keys)) == sorted(train_keys)  # every video of the epoch (the rest repeat a stream's first)
        assert len(keys) - len(set(keys)) < 2 * 4  # only a stream's rounding slots repeat


def _train_samples(shards):
    from shards.shardset import ShardSet

    ss = ShardSet.open(str(shards))
    return [s for p in ("Train", "Validation") for s in ss.phase("Split1", p).samples(fmt="webdataset")]


def test_eviction_spares_entries_being_read_and_everything_not_the_caches(shards, servers, tmp_path):
    _, url = servers["http"]
    every = list(tar_shards(shards).items())[:3]
    cache = ShardCache(str(tmp_path / "cache"), limit=every[0][1][0] + every[1][1][0])
    os.makedirs(cache.root)
    (tmp_path / "cache" / "notes.tar").write_bytes(b"a user's file")  # not named by a sha256: never evicted
    (path0, (size0, sha0)), (path1, (size1, sha1)), (path2, (size2, sha2)) = every
    with cache.open(f"{url}/{path0}", sha0, size0):  # held by a reader
        cache.fetch(f"{url}/{path1}", sha1, size1)
        cache.fetch(f"{url}/{path2}", sha2, size2)  # over the limit: shard 1 goes, shard 0 is being read
        names = set(os.listdir(cache.root))
        assert {f"{sha0}.tar", f"{sha2}.tar", "notes.tar"} <= names and f"{sha1}.tar" not in names
    assert (tmp_path / "cache" / "notes.tar").read_bytes() == b"a user's file"
    from shards.shardset import ShardSet

    local = ShardSet.open(str(shards), cache=cache)  # a local set is read where it is, never copied
    assert local.cache is None and all(s.cache is None for s in local.tar_shards("Split1", ["Train"]))


def test_a_server_dying_mid_download_leaves_no_trusted_file(shards, tmp_path, monkeypatch):
    path, (size, sha) = max(tar_shards(shards).items(), key=lambda kv: kv[1][0])
    assert size > 4 * 4096, "the shard must take several 20 ms blocks to send"
    server = SlowHttpServer(shards).start()
    cache = ShardCache(str(tmp_path / "cache"), limit=1 << 30)
    os.makedirs(cache.root)
    monkeypatch.setattr(remote, "RETRIES", 0)
    partial = []

    def kill_when_half_sent():
        while not server.fetched():  # the server logs a GET as it starts answering: the body is on its way
            time.sleep(0.005)
        time.sleep(0.05)  # a few of its 4 KB blocks sent
        partial.extend(f for f in os.listdir(cache.root) if ".partial-" in f)
        server.stop()

    threading.Thread(target=kill_when_half_sent, daemon=True).start()
    with pytest.raises(RemoteError, match=rf"^{server.url}/{path}: "):
        cache.fetch(f"{server.url}/{path}", sha, size)
    assert partial and sorted(os.listdir(cache.root)) == [".room.lock", f"{sha}.lock"]  # no .tar, .ok or partial
    # a downloader killed outright leaves its temporary file: the next one removes it and downloads
    server.start()
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from shards.cache import ShardCache; "
            f"ShardCache({cache.root!r}, 1 << 30).fetch({server.url + '/' + path!r}, {sha!r}, {size})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    while not any(".partial-" in f for f in os.listdir(cache.root)):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not cache._trusted(os.path.join(cache.root, f"{sha}.tar"), sha)
    assert cache.fetch(f"{server.url}/{path}", sha, size) == os.path.join(cache.root, f"{sha}.tar")
    assert sorted(os.listdir(cache.root)) == sorted([".room.lock", f"{sha}.lock", f"{sha}.ok", f"{sha}.tar"])
    assert open(os.path.join(cache.root, f"{sha}.tar"), "rb").read() == (shards / path).read_bytes()
    server.stop()


def test_cache_options(tmp_path, monkeypatch):
    assert [parse_size(t) for t in ("200GB", "500MiB", "1.5T", "1000", "64k")] == \
        [200 * 10**9, 500 * 2**20, 1.5e12, 1000, 64000]
    with pytest.raises(CacheError, match=r"^--cache-limit: 'lots' is not a size \(examples: 50GB"):
        ShardCache.from_options(str(tmp_path), "lots")
    with pytest.raises(CacheError, match=rf"^--cache-dir {tmp_path}: give --cache-limit \(or ELR_CACHE_LIMIT\)"):
        ShardCache.from_options(str(tmp_path), None)
    with pytest.raises(CacheError, match=r"^--cache-limit needs --cache-dir \(or ELR_CACHE_DIR\)$"):
        ShardCache.from_options(None, "1GB")
    monkeypatch.setenv("ELR_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("ELR_CACHE_LIMIT", "2GB")
    assert ShardCache.from_options(None, None) == ShardCache(str(tmp_path / "c"), 2 * 10**9)


def test_downloads_in_progress_count_against_the_limit_and_a_dead_ones_file_is_removed(tmp_path):
    from shards.cache import _flock

    cache = ShardCache(str(tmp_path), limit=100)
    live, dead = tmp_path / f"{'a' * 64}.tar.partial-1-abcdef", tmp_path / f"{'b' * 64}.tar.partial-2-abcdef"
    live.write_bytes(b"x" * 60)  # a download made its file at full size and holds its entry
    dead.write_bytes(b"x" * 30)  # one whose process was killed: nobody holds its entry
    (tmp_path / f"{'c' * 64}.tar.partial-keep").write_bytes(b"x" * 50)  # not a temporary name: not ours
    with _flock(str(tmp_path / f"{'a' * 64}.lock")):
        assert cache.downloading() == 60
    assert live.exists() and not dead.exists() and (tmp_path / f"{'c' * 64}.tar.partial-keep").exists()
