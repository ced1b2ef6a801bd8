"""Shared fixtures: a real dask LocalCluster, tiny demo trees and shard sets built from them."""

import logging
from contextlib import contextmanager
import os
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from shards.build import BuildConfig, build_shards
from shards.demo import DemoConfig, make_demo

TINY = dict(classes=6, videos_per_class=3, dim=16, min_units=3, max_units=9)
FAST = dict(random_c3d=0, side=16, progress=False)  # extract-features with 16x16 crops: C3D is cheap on 2 cores


@pytest.fixture(scope="session")
def dask_client():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR, scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"}
                      ) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory):
    """Real encoded videos in HMDB51's layout with split files: (root, {class: {file: label}})."""
    from videos import hmdb51_shaped

    root = tmp_path_factory.mktemp("videos")
    return str(root), hmdb51_shaped(str(root))


@pytest.fixture(scope="session")
def extracted(sample_tree, tmp_path_factory, dask_client):
    """sample_tree's features by one extract-features run: (out, its features.json record)."""
    from ingest.c3d.extract import ExtractConfig, extract_features

    root, labels = sample_tree
    out = str(tmp_path_factory.mktemp("features") / "HMDB51")
    record = extract_features(f"{root}/videos", f"{root}/splits", out, ExtractConfig(**FAST), client=dask_client)
    return out, record


@pytest.fixture(scope="session")
def bad_tree(tmp_path_factory):
    """One class of four broken files, one good class: (root, {file: problem})."""
    from videos import bad_videos, decode, encode, sample_path, write_split_files

    root = tmp_path_factory.mktemp("bad")
    problems = bad_videos(str(root / "videos" / "broken"))
    encode(os.path.join(str(root / "videos" / "fine"), "fine_0.avi"), decode(sample_path("carphone_pristine.mp4"), 0, 20))
    labels = {"broken": {name: "1" for name in problems}, "fine": {"fine_0.avi": "2"}}
    write_split_files(str(root / "splits"), labels)
    return str(root), problems


def kill_after(cmd, path, lines=None, files=None, env=None):
    """Start cmd in its own session and SIGKILL it once the file at `path` has `lines` lines (or the
    folder at `path` holds `files` files, recursively; or, with neither, once `path` exists); then
    returns those lines (or file names, or [path]), or None when cmd ended by itself first."""
    def found():
        if files is not None:
            return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        if lines is None:
            return [path] if os.path.exists(path) else []
        return open(path).read().splitlines() if os.path.exists(path) else []

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(found()) >= (files if files is not None else lines or 1):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        return None
    return found()


def features_of(out):
    """{path under out: bytes} of every feature file of Split1."""
    import glob

    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(f"{out}/Split1/*/*/*.npy"))}


@pytest.fixture(scope="session")
def demo_master(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "HMDB51"
    make_demo(str(root), DemoConfig(**TINY, seed=1))
    return root


@pytest.fixture
def demo_tree(demo_master, tmp_path):
    """A private copy of the tiny demo tree that a test may damage."""
    root = tmp_path / "data" / "HMDB51"
    shutil.copytree(demo_master, root)
    return root


@pytest.fixture(scope="session")
def built_master(demo_master, tmp_path_factory, dask_client):
    out = tmp_path_factory.mktemp("built") / "HMDB51-shards"
    build_shards(str(demo_master), BuildConfig(out=str(out), progress=False), client=dask_client)
    return out


@pytest.fixture
def built(built_master, tmp_path):
    """A private copy of a shard set built from the demo tree."""
    out = tmp_path / "HMDB51-shards"
    shutil.copytree(built_master, out)
    return out


def build(root, client, **options):
    options.setdefault("progress", False)
    return build_shards(str(root), BuildConfig(**options), client=client)


def small_remote_set(tmp_path_factory, client, name: str, min_shards: int):
    """A 4-class demo shard set (tar only, dim 8, at least `min_shards` a phase) for the remote tests."""
    root = tmp_path_factory.mktemp(name) / "HMDB51"
    make_demo(str(root), DemoConfig(classes=4, videos_per_class=3, dim=8, min_units=3, max_units=6, seed=2))
    build(root, client, formats=("webdataset",), min_shards=min_shards)
    return root.parent / "HMDB51-shards"


@contextmanager
def s3_endpoint(url: str):
    """s3fs pointed at an S3-API server on `url` for the block (test credentials); afterwards the
    environment is as it was and s3fs forgets its filesystems (fsspec keeps them, with the port)."""
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    try:
        yield s3fs.S3FileSystem(skip_instance_cache=True)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list:
    """A torchrun command line on a port of its own: two at once on the default 29500 would collide."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *args]


def run_side_by_side(commands, timeout=120, **popen) -> list:
    """subprocess.run of each command, all started at once (each mostly waits on its own imports):
    [CompletedProcess] in the commands' order."""
    import subprocess

    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def source_array(root, split, phase, stream_folder, class_name, video):
    return np.load(os.path.join(root, split, f"{phase}_{stream_folder}", class_name, video + ".npy"),
                   allow_pickle=False)


class HttpServer:
    """`python -m http.server` serving a folder on 127.0.0.1, as a separate process; stop() and start()
    again on the same port (a server that dies and comes back). It answers range requests with the
    whole file, as many simple servers do."""

    def __init__(self, directory, port=None):
        self.directory = str(directory)
        port = port or free_port()
        self.port, self.url, self.proc, self.requests = port, f"http://127.0.0.1:{port}", None, []
        self.env = {}

    def command(self) -> list:
        return [sys.executable, "-u", "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                "--directory", self.directory]

    def start(self):
        import subprocess
        import threading
        import time
        import urllib.request

        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **self.env})
        threading.Thread(target=self._log, args=(self.proc,), daemon=True).start()
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                return self
            except urllib.error.HTTPError:  # answering (an S3 server's root is not a page)
                return self
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def fetched(self, suffix: str = ".tar") -> dict:
        """{path: GET requests} of the paths ending in `suffix` so far."""
        counts = {}
        for path in self.requests:
            if path.split("?")[0].endswith(suffix):
                counts[path.split("?")[0]] = counts.get(path.split("?")[0], 0) + 1
        return counts

    def _log(self, proc):
        import re

        for line in proc.stderr:  # '127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 -' (moto's in colour)
            m = re.search(r'"(?:\x1b\[[0-9;]*m)*GET (\S+) ', line)
            if m:
                self.requests.append(m.group(1))

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class MotoServer(HttpServer):
    """moto's S3-API server as a separate process on 127.0.0.1 (its log gives the GET requests)."""

    def __init__(self, port=None):
        super().__init__("", port)

    def command(self) -> list:
        return [sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


class SlowHttpServer(HttpServer):
    """An HTTP server that sends files 4 KB at a time, 20 ms apart: a download can be cut mid-way."""

    CODE = """import functools, http.server, sys, time
class Slow(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, src, dst):
        while block := src.read(4096):
            dst.write(block); dst.flush(); time.sleep(0.02)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
    functools.partial(Slow, directory=sys.argv[2])).serve_forever()"""

    def command(self) -> list:
        return [sys.executable, "-u", "-c", self.CODE, str(self.port), self.directory]


@pytest.fixture
def http_server():
    """Factory: http_server(folder) starts a server; every server is stopped at the end of the test."""
    servers = []

    def start(directory):
        servers.append(HttpServer(directory).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
