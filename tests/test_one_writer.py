"""One writer per output folder: a second writer is refused by name and changes nothing, a killed
holder frees the folder at once, and the temporary files of dead writers are removed or reported."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import build, run_side_by_side
from shards.atomic import temp_path
from shards.lock import FileLock, OutputBusyError, hold_output, local_only_reason, lock_path, mount_of, read_holder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def all_files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer's temporary names carry)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def dead_temp(path) -> str:
    """A temporary name beside `path` as a killed writer leaves it, with a few bytes in it."""
    name = temp_path(str(path)).rsplit("-", 2)[0] + f"-{dead_pid()}-0a1b2c"
    with open(name, "wb") as f:
        f.write(b"half")
    return name


def busy_line(out, holder) -> str:
    return (f"Error: {out}: {holder['command']} is writing here (pid {holder['pid']} on {holder['host']}, since "
            f"{holder['started']}); wait for it to finish or choose another --out")


class Paused:
    """A command started in its own session, paused (SIGSTOP to its whole process group) once it holds
    `lock`: whatever starts meanwhile meets a live writer in the middle of its run."""

    def __init__(self, cmd, lock, timeout=120):
        self.proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
        deadline = time.time() + timeout
        while (read_holder(lock) or {}).get("pid") != self.proc.pid:
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the command never took its lock"
            time.sleep(0.01)
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.holder = read_holder(lock)

    def finish(self, timeout=300):
        os.killpg(self.proc.pid, signal.SIGCONT)
        _, stderr = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, stderr[-3000:]

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def assert_refused(results, line):
    for r in results:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert (r.returncode, r.stderr.strip().splitlines()) == (1, [line]), (r.args, r.stderr[-2000:])


# ---- the lock itself -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_and_the_lock_goes_when_released(tmp_path):
    out = tmp_path / "set"
    with hold_output(str(out), "build-shards"):
        holder = read_holder(lock_path(str(out)))
        assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), socket.gethostname(), "build-shards")
        with pytest.raises(OutputBusyError) as e:
            hold_output(str(out), "elr-train").acquire()
        assert f"Error: {e.value}" == busy_line(out, holder)
    assert os.listdir(tmp_path) == []  # released: no lock file left
    with hold_output(str(out), "elr-train"):  # free again
        pass


def test_a_killed_holder_releases_the_lock_at_once(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from shards.lock import hold_output\n"
                               f"hold_output({out!r}, 'elr-train').acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(OutputBusyError, match=f"pid {holder.pid} "):
        hold_output(out, "elr-train").acquire()
    holder.kill()
    holder.wait()
    started = time.perf_counter()
    with hold_output(out, "elr-eval merge"):  # the stale file is taken over, no waiting
        assert read_holder(lock_path(out))["pid"] == os.getpid()
    assert time.perf_counter() - started < 0.5


def test_shared_holders_exclude_an_exclusive_one_and_the_last_removes_the_file(tmp_path):
    path = str(tmp_path / "eval.lock")
    a, b = FileLock(path, "elr-eval run", shared=True), FileLock(path, "elr-eval run", shared=True)
    a.acquire()
    b.acquire()
    with pytest.raises(OutputBusyError, match="another process is writing here"):
        FileLock(path, "elr-eval merge").acquire()
    a.release()
    assert os.path.exists(path)  # b still holds it
    b.release()
    assert not os.path.exists(path)


MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /shared/data rw,relatime shared:20 - nfs4 head:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
41 22 0:36 / /scratch rw,relatime shared:21 - nfs head:/scratch rw,vers=3,nolock,local_lock=all,addr=10.0.0.1
42 22 0:37 / /home/my\\040data rw - nfs4 head:/home rw,local_lock=flock
43 22 0:38 / /lustre rw - lustre mds@tcp:/fs rw,localflock
"""


@pytest.mark.parametrize("path,expected", [
    ("/data/HMDB51-shards", None),
    ("/shared/data/HMDB51-shards", None),  # NFSv4 with server-side locks: flock works across machines
    ("/scratch/run", "NFS mount /scratch has local_lock=all"),
    ("/home/my data/eval", "NFS mount /home/my data has local_lock=flock"),
    ("/lustre/x", "Lustre mount /lustre has localflock"),
])
def test_mounts_whose_locks_stay_on_one_machine_are_named(tmp_path, path, expected):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert local_only_reason(path, str(info)) == expected
    assert mount_of("/shared/data2", MOUNTINFO)[0] == "/"  # a sibling with the same prefix is not inside


def test_writing_on_a_local_only_lock_mount_is_refused_unless_allowed(tmp_path, monkeypatch):
    import shards.lock as lock

    monkeypatch.setattr(lock, "local_only_reason", lambda folder: "NFS mount /x has local_lock=all")
    with pytest.raises(lock.LockUnsupportedError) as e:
        hold_output(str(tmp_path / "out"), "build-shards").acquire()
    assert str(e.value) == (f"{tmp_path / 'out'}: NFS mount /x has local_lock=all: a lock there is not seen by other "
                            "machines, so two writers could destroy each other's output; remount with local_lock=none, "
                            "or set ELR_LOCAL_LOCK_OK=1 if only this machine writes there")
    monkeypatch.setenv("ELR_LOCAL_LOCK_OK", "1")
    with hold_output(str(tmp_path / "out"), "build-shards"):
        pass


# ---- each command, against a live writer ----------------------------------------------------------


def test_build_shards_joined_by_resume_or_a_second_build_is_refused(demo_master, built_master, tmp_path, dask_client):
    out = tmp_path / "HMDB51-shards"
    # 256MiB: the library default (the command line says 256MB)
    ingest = [os.path.join(BIN, "elr-ingest"), "build-shards", demo_master, "--out", out, "--shard-size", "256MiB", "-q"]
    first = Paused([*ingest, "--scheduler", dask_client.scheduler.address], lock_path(str(out)))
    try:
        results = run_side_by_side([[str(c) for c in ingest + extra] for extra in ([], ["--resume"], ["--overwrite"])],
                                   cwd=REPO, env=ENV)
    finally:
        first.finish()
    assert_refused(results, busy_line(out, first.holder))
    assert all_files(out) == all_files(built_master)  # exactly the bytes of a lone build
    assert not os.path.exists(lock_path(str(out))) and not os.path.exists(f"{out}.building")


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory, dask_client):
    from shards.demo import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("one-writer") / "HMDB51"
    make_demo(str(root), DemoConfig(classes=4, videos_per_class=3, dim=8, min_units=3, max_units=5, seed=2))
    build(root, dask_client, formats=("webdataset",), min_shards=2)
    return f"{root}-shards"


def train_command(shards, *args) -> list:
    return [os.path.join(BIN, "elr-train"), "--shards", shards, "--hidden", "8", "--batch-size", "8", "--data-streams",
            "2", "--loader-workers", "0", "-q", "--device", "cpu", *map(str, args)]


def test_two_trainings_with_one_out(train_shards, tmp_path):
    train = train_command(train_shards, "--epochs", "2")
    out, lone = tmp_path / "run", tmp_path / "lone"
    first = Paused([*train, "--out", out], lock_path(str(out)))
    try:
        results = run_side_by_side([[str(c) for c in train + extra] for extra in
                                    (["--out", out, "--seed", "1", "--hidden", "16"], ["--out", out, "--resume"])],
                                   cwd=REPO, env=ENV)
    finally:
        first.finish()
    assert_refused(results, busy_line(out, first.holder))
    subprocess.run([str(c) for c in [*train, "--out", lone]], check=True, capture_output=True, cwd=REPO, env=ENV)
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (out, lone))
    assert a["config"]["seed"] == 0 and a["config"]["hidden"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert sorted(os.listdir(out)) == ["curves.png", "last.pt", "metrics.jsonl"]


def test_extract_features_twice_at_once(tmp_path, dask_client):
    from ingest.videos.demo import DemoVideosConfig, make_demo_videos

    make_demo_videos(str(tmp_path / "demo"), DemoVideosConfig(classes=2, train=2, test=1, validation=0, height=32, width=32,
                                                             min_frames=16, max_frames=16))
    videos, splits = tmp_path / "demo" / "videos", tmp_path / "demo" / "splits"
    extract = [os.path.join(BIN, "elr-ingest"), "extract-features", videos, "--splits", splits, "--random-c3d", "0",
               "--crop-size", "16", "--flow-bound", "4", "-q", "--scheduler", dask_client.scheduler.address]
    out, lone = tmp_path / "HMDB51", tmp_path / "lone"
    first = Paused([*extract, "--out", out], lock_path(str(out)))
    try:
        results = run_side_by_side([[str(c) for c in extract + extra] for extra in
                                    (["--out", out], ["--out", out, "--resume"], ["--out", out, "--overwrite"])],
                                   cwd=REPO, env=ENV)
    finally:
        first.finish()
    assert_refused(results, busy_line(out, first.holder))
    subprocess.run([str(c) for c in [*extract, "--out", lone]], check=True, capture_output=True, cwd=REPO, env=ENV)
    a, b = all_files(out), all_files(lone)
    assert {k: v for k, v in a.items() if k.endswith(".npy")} == {k: v for k, v in b.items() if k.endswith(".npy")}
    assert sorted(a) == sorted(b)


def test_eval_jobs_and_merges_exclude_each_other(built_master, tmp_path):
    from elr.model import TwoStreamGRU
    from shards.manifest import load_manifest

    m = load_manifest(str(built_master))
    torch.manual_seed(0)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": TwoStreamGRU(m["dim"], 8, len(m["classes"])).state_dict(), "classes": m["classes"]}, checkpoint)
    out = tmp_path / "eval"
    run = [os.path.join(BIN, "elr-eval"), "run", "--shards", built_master, "--checkpoint", checkpoint, "--out", out,
           "--num-jobs", "2", "--device", "cpu"]
    part0 = out / "part-00000-of-00002.npz"
    job0 = Paused([*run, "--job-index", "0"], f"{part0}.lock")
    try:
        same_job, merge_now, other_job = run_side_by_side(
            [[str(c) for c in cmd] for cmd in ([*run, "--job-index", "0"], [os.path.join(BIN, "elr-eval"), "merge", out],
                                               [*run, "--job-index", "1"])], cwd=REPO, env=ENV)
    finally:
        job0.finish()
    h = job0.holder
    assert_refused([same_job], f"Error: {part0}: elr-eval run is writing here (pid {h['pid']} on {h['host']}, since "
                               f"{h['started']}); wait for it to finish or choose another --out")
    assert_refused([merge_now], f"Error: {out}: elr-eval run jobs are still writing parts: part-00000-of-00002.npz "
                                f"(pid {h['pid']} on {h['host']}, since {h['started']}); wait for them to finish")
    assert other_job.returncode == 0, other_job.stderr  # jobs of one evaluation run side by side
    merged = subprocess.run([os.path.join(BIN, "elr-eval"), "merge", str(out), "--json"], capture_output=True,
                            text=True, cwd=REPO, env=ENV)
    assert merged.returncode == 0 and json.loads(merged.stdout)["videos"] == 18, merged.stderr  # 6 classes x 3 test videos
    # a merge in progress holds the folder: no job may replace a part under it
    with hold_output(str(out), "elr-eval merge"):
        holder = read_holder(lock_path(str(out)))
        late = subprocess.run([str(c) for c in [*run, "--job-index", "1"]], capture_output=True, text=True, cwd=REPO,
                              env=ENV)
    assert_refused([late], busy_line(out, holder))
    assert sorted(os.listdir(out)) == ["confusion.png", "part-00000-of-00002.npz", "part-00001-of-00002.npz",
                                       "predictions.csv", "report.json", "report.md"]


# ---- what killed writers leave behind ---------------------------------------------------------------


def test_reruns_remove_dead_writers_temporary_files_and_nothing_else(built_master, tmp_path):
    from elr.model import TwoStreamGRU
    from shards.manifest import load_manifest
    from train.evaluate import EvalConfig, EvalError, merge, run_job

    m = load_manifest(str(built_master))
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": TwoStreamGRU(m["dim"], 8, len(m["classes"])).state_dict(), "classes": m["classes"]}, checkpoint)
    out = tmp_path / "eval"
    for job in (0, 1):
        run_job(EvalConfig(str(built_master), str(checkpoint), str(out), 2, job, device="cpu"))
    stray = dead_temp(out / "part-00000-of-00002.npz")  # job 0 killed while re-writing its part
    mine = out / "notes.partial-keep"  # not a name this project makes
    mine.write_text("a user's file")
    with pytest.raises(EvalError) as e:
        merge(str(out))
    assert str(e.value) == (f"{stray}: a temporary file of a job killed while writing; re-run that job (it removes "
                            "it) or delete it")
    other = dead_temp(out / "part-00001-of-00002.npz")
    run_job(EvalConfig(str(built_master), str(checkpoint), str(out), 2, 0, device="cpu"))  # the re-run removes its own only
    assert not os.path.exists(stray) and os.path.exists(other) and mine.exists()
    run_job(EvalConfig(str(built_master), str(checkpoint), str(out), 2, 1, device="cpu"))
    assert not os.path.exists(other)
    assert merge(str(out))["videos"] == 18


def test_extract_resume_removes_what_a_killed_run_left(tmp_path, dask_client):
    from ingest.videos.demo import DemoVideosConfig, make_demo_videos
    from ingest.c3d.extract import ExtractConfig, extract_features

    make_demo_videos(str(tmp_path / "demo"), DemoVideosConfig(classes=2, train=2, test=1, validation=0, height=32, width=32,
                                                             min_frames=16, max_frames=16))
    videos, splits, out = str(tmp_path / "demo" / "videos"), str(tmp_path / "demo" / "splits"), tmp_path / "HMDB51"
    cfg = dict(random_c3d=0, side=16, flow_bound=4, progress=False)
    extract_features(videos, splits, str(out), ExtractConfig(**cfg), client=dask_client)
    done = all_files(out)
    npy = sorted(p for p in done if p.endswith(".npy"))[0]
    leftovers = [dead_temp(out / npy), dead_temp(out / "features.json"), dead_temp(out / ".Split1-features.jsonl")]
    (out / "Split1" / "README.partial-1-xyz").write_text("not ours")
    with pytest.raises(Exception, match="already complete"):  # nothing to resume, but the leftovers go
        extract_features(videos, splits, str(out), ExtractConfig(**cfg, resume=True), client=dask_client)
    assert not any(os.path.exists(p) for p in leftovers)
    assert all_files(out) == {**done, "Split1/README.partial-1-xyz": b"not ours"}


def test_training_rerun_removes_dead_temporary_files_and_a_failed_run_its_new_folder(train_shards, tmp_path):
    shards = str(tmp_path / "set")
    shutil.copytree(train_shards, shards)  # damaged below
    train = train_command(shards)
    out = tmp_path / "run"
    subprocess.run([*train, "--out", str(out), "--epochs", "1"], check=True, capture_output=True, cwd=REPO, env=ENV)
    leftovers = [dead_temp(out / "last.pt"), dead_temp(out / "metrics.jsonl")]
    subprocess.run([*train, "--out", str(out), "--epochs", "2", "--resume"], check=True, capture_output=True, cwd=REPO,
                   env=ENV)
    assert sorted(os.listdir(out)) == ["curves.png", "last.pt", "metrics.jsonl"]
    assert not any(os.path.exists(p) for p in leftovers)
    # a shard damaged in place (same size): the run fails in its first epoch, before any checkpoint
    m = json.load(open(os.path.join(shards, "manifest.json")))
    shard = os.path.join(shards, m["splits"]["Split1"]["Train"]["webdataset"]["shards"][0]["path"])
    data = bytearray(open(shard, "rb").read())
    data[100:108] = b"garbage!"
    open(shard, "wb").write(bytes(data))
    for nproc in ("1", "2"):
        fresh = tmp_path / f"fresh{nproc}"
        result = subprocess.run([*train, "--out", str(fresh), "--epochs", "1", "--nproc", nproc], capture_output=True,
                                text=True, cwd=REPO, env=ENV)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not fresh.exists() and not os.path.exists(lock_path(str(fresh)))
