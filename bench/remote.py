"""A remote set's first epoch through the cache against the network's own rate, and the next run's epoch
from the cache against the same loader on a local copy, in one run.

    python -m bench.remote [--work bench/_work] [--rounds 3] [--servers http s3]

The Train shards of bench/peers.py's HMDB51-shaped tree (51 classes x 34 videos, lengths drawn per
class from real HMDB51, dim 4096), rebuilt in 16 MB shards (--shard-mb), are served on 127.0.0.1 by `python -m http.server` and by moto's
S3-API server, each a process of its own. Rows, in sequences/s (each video an LR and an HR sequence),
each loader epoch in a fresh process (in-process loader, 8 streams, steps of 256 sequences, joined as
training joins them), alternating for --rounds:
  (f) a plain fsspec `cat` of every Train shard, one after another: the network's rate for those bytes
  (s) the same shards downloaded into an empty cache, nothing read: what trusting a copy adds to (f)
  (1) our first epoch with an empty --cache-dir: every shard downloaded once, overlapped with reading
  (2) a new process's epoch over the filled cache (a second run, or the next epoch after a restart)
  (L) the same loader over the local copy of the shards (warm page cache, like (2))
Targets (issue 23): (1) >= 85% of (f) of the same round; (2) >= 90% of (L).
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.common import REPO, WORK
from bench.peers import prepare_sets

AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv, url):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            return proc
        except urllib.error.HTTPError:
            return proc  # answering
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def serve(kind: str, shards: str) -> tuple:
    """(server process, the set's URL, environment for its clients)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if kind == "http":
        proc = start_server([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", shards], base)
        return proc, base, {}
    env = {**AWS, "AWS_ENDPOINT_URL": base}
    proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], base)
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    t = time.perf_counter()
    fs.put(shards, "bench/shards", recursive=True)
    print(f"uploaded the set to moto in {time.perf_counter() - t:.1f} s", flush=True)
    return proc, "s3://bench/shards", env


def cat_rate(url: str, tars: list, n_videos: int) -> float:
    """Sequences/s of fsspec cat_file of every Train shard, one after another (bytes discarded)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    t = time.perf_counter()
    for name in tars:
        fs.cat_file(f"{root}/Split1/Train/{name}")
    return 2 * n_videos / (time.perf_counter() - t)


def fetch_rate(url: str, cache: str, n_videos: int) -> float:
    """Sequences/s of downloading every Train shard into an empty cache, one after another, nothing
    read: the transfer plus what makes a cached copy trustworthy (its sha256, its write, the rename)."""
    from shards.cache import ShardCache
    from shards.shardset import ShardSet

    shutil.rmtree(cache, ignore_errors=True)
    store = ShardCache(os.path.abspath(cache), 1 << 40)
    refs = ShardSet.open(url).tar_shards("Split1", ["Train"])
    t = time.perf_counter()
    for ref in refs:
        store.fetch(ref.url, ref.sha256, ref.bytes)
    return 2 * n_videos / (time.perf_counter() - t)


def one_epoch(url: str, cache: str | None) -> float:
    """Sequences/s of one epoch of our in-process loader over Train (run in a fresh process)."""
    from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, input_fields
    from shards.cache import ShardCache
    from shards.shardset import ShardSet

    inputs = TRAIN_INPUTS["lr+hr"]
    cache_obj = ShardCache(os.path.abspath(cache), 1 << 40) if cache else None
    shard_set = ShardSet.open(url, cache=cache_obj)
    plan = StreamPlan(shard_set.tar_shards("Split1", ["Train"]), 8, 256 // 2 // 8)
    steps = StepLoader(ShardStream(plan, 0, 1, input_fields(inputs), seed=0), 0)
    steps.dataset.set_position(0)
    t, n = time.perf_counter(), 0
    for _, batch in DevicePrefetcher(steps, inputs, "cpu"):
        n += len(batch["labels"])
    return n / (time.perf_counter() - t)


def child(args, url: str, cache: str | None, env: dict) -> float:
    argv = [sys.executable, "-m", "bench.remote", "--one", url] + (["--cache", cache] if cache else [])
    out = subprocess.run(argv, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench.remote child failed: {out.stderr.strip().splitlines()[-1]}")
    return float(out.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", nargs="+", choices=["http", "s3"], default=["http", "s3"])
    ap.add_argument("--shard-mb", type=int, default=16,
                    help="shard size of the served copy: 16 gives ~5 shards a stream, as a set of many times the "
                         "shuffle windows has (0: bench.peers' 80 MB shards, one a stream: nothing to overlap)")
    ap.add_argument("--videos-per-class", type=int, default=34, help=argparse.SUPPRESS)  # prepare_sets' options
    ap.add_argument("--dim", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one epoch of URL, in a process of its own
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(one_epoch(args.one, args.cache))
        return
    args.loaders = ["ours"]
    root, shards, *_ = prepare_sets(args)
    if args.shard_mb:
        shards = os.path.join(args.work, f"shards-remote-{args.shard_mb}mb")
        if not os.path.exists(os.path.join(shards, "manifest.json")):
            from shards.build import BuildConfig, build_shards

            build_shards(root, BuildConfig(out=shards, formats=("webdataset",), shard_bytes=args.shard_mb << 20,
                                           progress=False))
    shards = os.path.abspath(shards)
    tars = sorted(os.path.basename(p) for p in glob.glob(os.path.join(shards, "Split1", "Train", "*.tar")))
    from shards.shardset import ShardSet

    n_videos = ShardSet.open(shards).phase("Split1", "Train").summary()["videos"]
    size = sum(os.path.getsize(os.path.join(shards, "Split1", "Train", t)) for t in tars)
    print(f"{n_videos} Train videos in {len(tars)} shards, {size / 1e9:.2f} GB", flush=True)
    cache = os.path.join(args.work, "remote-cache")
    results = {}
    for kind in args.servers:
        proc, url, env = serve(kind, shards)
        try:
            for r in range(args.rounds):
                row = results.setdefault(kind, {})
                row.setdefault("f", []).append(cat_rate(url, tars, n_videos))
                row.setdefault("s", []).append(fetch_rate(url, cache, n_videos))
                shutil.rmtree(cache, ignore_errors=True)
                row.setdefault("1", []).append(child(args, url, cache, env))
                row.setdefault("2", []).append(child(args, url, cache, env))
                row.setdefault("L", []).append(child(args, shards, None, {}))
                print(f"{kind} round {r + 1}: " + ", ".join(f"({k}) {v[-1]:,.0f}" for k, v in row.items()), flush=True)
        finally:
            proc.kill()
            shutil.rmtree(cache, ignore_errors=True)
    names = {"f": "fsspec cat of every Train shard (the network)",
             "s": "the same shards into an empty cache, nothing read (transfer, sha256, write)", "1": "our first epoch, --cache-dir empty",
             "2": "a new process's epoch from the filled cache", "L": "the same loader on the local copy"}
    print("\n| server | row | seq/s, best round | every round |")
    print("|---|---|---:|---|")
    for kind, row in results.items():
        for k, rates in row.items():
            print(f"| {kind} | ({k}) {names[k]} | {max(rates):,.0f} | {', '.join(f'{x:,.0f}' for x in rates)} |")
    for kind, row in results.items():
        first = [a / b for a, b in zip(row["1"], row["f"])]
        second = [a / b for a, b in zip(row["2"], row["L"])]
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        fetch = [a / b for a, b in zip(row["s"], row["f"])]
        print(f"{kind}: (s) / (f), per round: {', '.join(f'{100 * x:.0f}%' for x in fetch)} (one download at a time; "
              f"(1) runs two)")
        print(f"{kind}: (1) / (f), per round: {', '.join(f'{100 * x:.0f}%' for x in first)}; "
              f"median {100 * median(first):.0f}% (target 85%)")
        print(f"{kind}: (2) / (L), per round: {', '.join(f'{100 * x:.0f}%' for x in second)}; "
              f"median {100 * median(second):.0f}% (target 90%)")


if __name__ == "__main__":
    main()
