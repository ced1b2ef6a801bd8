"""extract-features at cluster scale on real encoded videos. As independent jobs (--num-jobs N
--job-index I, then --finish): the tree one job writes, byte for byte; shares balanced by frames; a
killed job resumed alone; --finish refusing what is not a whole, consistent extraction, with one line
naming it. With C3D on dask workers that declare a GPU resource: the same tree again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, features_of, kill_after, run_side_by_side, torchrun
from ingest.c3d.jobs import balanced_share, header_frames
from ingest.c3d.tasks import chunks
from ingest.videos.splits import VideoJob, plan_videos
from videos import count_frames

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two jobs on two cores: one thread each


def command(root, out, *args, scheduler=None) -> list:
    cmd = [os.path.join(BIN, "elr-ingest"), "extract-features", f"{root}/videos", "--splits", f"{root}/splits",
           "--out", str(out), "--random-c3d", "0", "--crop-size", "16", "-q", *args]
    return cmd + (["--scheduler", scheduler] if scheduler else ["--workers", "1"])


def journal(out, index, num_jobs=2) -> str:
    return os.path.join(out, f".Split1-features.job-{index:05d}-of-{num_jobs:05d}.jsonl")


def one_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    return result.stderr.strip()


def test_shares_are_balanced_by_frames_and_the_same_in_every_job():
    jobs = [VideoJob("c", f"v{i}", f"/v{i}.avi", "Train") for i in range(7)]
    frames = [1062, 18, 500, 480, 0, 40, 300]  # v4: a header without a count, taken as the median (480)
    shares = [balanced_share(jobs, 2, i, frames) for i in range(2)]
    # longest first, each to the lightest job: v0 1062 -> 0; v2 500, v3 480, v4 480 -> 1 (1460);
    # v6 300, v5 40, v1 18 -> 0 (1420); each share in plan order
    assert [[j.video for j in s] for s in shares] == [["v0", "v1", "v5", "v6"], ["v2", "v3", "v4"]]
    loads = [sum(frames[int(j.video[1:])] or 480 for j in s) for s in shares]
    assert loads == [1420, 1460]
    # by count, one job would get both of the longest videos; by frames they are apart
    assert balanced_share(jobs, 3, 0, frames) == [jobs[0]]


def test_header_frames_match_the_decoded_frames(sample_tree):
    root, _ = sample_tree
    plan = plan_videos(f"{root}/videos", f"{root}/splits", 1, "label0")
    declared = {job.id: header_frames(job.path) for job in plan.jobs}
    assert all(declared[job.id] == count_frames(job.path) for job in plan.jobs), declared
    assert header_frames(f"{root}/splits/run_test_split1.txt") == 0  # not a video: counted as the median


def test_two_jobs_write_the_tree_of_one_and_a_killed_job_resumes_alone(sample_tree, extracted, tmp_path, dask_client):
    root, _ = sample_tree
    reference, record = extracted
    scheduler = dask_client.scheduler.address
    # job 0 is killed after its first video; job 1 takes its index from a SLURM array's variable.
    # Its videos' results can arrive together and be journaled within milliseconds; a kill that lands
    # after the job's last line (in its cleanup) interrupted nothing, so that attempt is made again
    for attempt in range(3):
        out = tmp_path / f"HMDB51-{attempt}"
        job0 = command(root, out, "--num-jobs", "2", "--job-index", "0", scheduler=scheduler)
        lines = kill_after(job0, journal(out, 0), lines=2, env=ENV)  # the options, 1 video
        if lines and '"finished"' not in lines[-1]:
            break
    assert lines and '"finished"' not in lines[-1], "job 0 finished before it could be killed, 3 times"
    killed_after = len(lines) - 1
    job1 = command(root, out, "--num-jobs", "2", scheduler=scheduler)
    done = subprocess.run(job1, capture_output=True, text=True, env={**ENV, "SLURM_ARRAY_TASK_ID": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().endswith("once every job is done: the same command with --finish")

    finish = command(root, out, "--num-jobs", "2", "--finish")
    unfinished = subprocess.run(finish, capture_output=True, text=True)
    rerun = subprocess.run(job0, capture_output=True, text=True, env=ENV)  # after: a job shares what --finish takes
    assert one_line(unfinished) == (
        f"Error: {journal(out, 0)}: job 0 of 2 has not finished ({killed_after} of its videos done); run it again with "
        "--num-jobs 2 --job-index 0 --resume")
    assert one_line(rerun) == (
        f"Error: {out}: holds this job's interrupted part of Split1; --resume to continue it or --overwrite "
        "to replace it")
    resumed = subprocess.run(job0 + ["--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = subprocess.run(finish, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]

    assert features_of(out) == features_of(reference)  # byte for byte
    mine = json.load(open(out / "features.json"))["splits"]["Split1"]
    assert {k: v for k, v in mine.items() if k not in ("last_run", "inputs")} == \
        {k: v for k, v in record.items() if k not in ("last_run", "inputs")}
    assert list(mine["videos"]) == list(record["videos"])  # plan order, as one job writes it
    assert (mine["last_run"]["jobs"], mine["last_run"]["videos"]) == (2, len(record["videos"]) - killed_after)
    assert sorted(os.listdir(out)) == ["Split1", "features.json"]  # journals and locks gone
    again = subprocess.run(finish, capture_output=True, text=True)
    assert one_line(again) == f"Error: {out}: Split1 is already complete (features.json); nothing to finish"


def test_finish_refuses_a_missing_job_other_options_and_a_running_job(sample_tree, tmp_path, dask_client):
    root, _ = sample_tree
    out = tmp_path / "HMDB51"
    scheduler = dask_client.scheduler.address
    job0 = command(root, out, "--num-jobs", "2", "--job-index", "0", scheduler=scheduler)
    job1 = command(root, out, "--num-jobs", "2", "--job-index", "1", "--flow-bound", "10", scheduler=scheduler)
    finish = command(root, out, "--num-jobs", "2", "--finish")
    # the two jobs side by side, job 1 with another --flow-bound
    assert [r.returncode for r in run_side_by_side([job0, job1], timeout=300, env=ENV)] == [0, 0]
    # refused one after another (each takes the folder alone): a finish of 3 jobs, the finish of these 2
    # (other options), a one-job run
    three, two, single = (subprocess.run(cmd, capture_output=True, text=True) for cmd in
                          (command(root, out, "--num-jobs", "3", "--finish"), finish, command(root, out, scheduler=scheduler)))
    assert one_line(three) == (f"Error: {journal(out, 0, 3)}: job 0 of 3 has not run (no journal); run it with "
                               "--num-jobs 3 --job-index 0")
    assert one_line(two) == (
        f"Error: {journal(out, 1)}: jobs 0 and 1 ran with other options or weights: flow_bound 20.0 (job 1: 10.0); "
        "run job 1 again with --overwrite and the options of the others")
    assert one_line(single) == (f"Error: {journal(out, 0)}: {out} holds an extraction in 2 jobs; finish it with "
                                "--num-jobs 2 (--resume each unfinished job, then --finish) or --overwrite to replace it")
    assert not os.path.exists(out / "features.json")
    # job 1 again with --overwrite, paused once it holds its journal: --finish and a second job 1 are refused
    redo = subprocess.Popen(command(root, out, "--num-jobs", "2", "--job-index", "1", "--overwrite", scheduler=scheduler),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lock = journal(out, 1) + ".lock"
    deadline = time.time() + 60
    while not (os.path.exists(lock) and os.path.getsize(lock)):
        assert redo.poll() is None and time.time() < deadline, redo.communicate()[1][-3000:]
        time.sleep(0.01)
    os.killpg(redo.pid, signal.SIGSTOP)
    try:
        holder = json.load(open(lock))
        refused = run_side_by_side([finish, command(root, out, "--num-jobs", "2", "--job-index", "1", "--resume",
                                                    scheduler=scheduler)])
        running = (f"{os.path.basename(journal(out, 1))} (pid {holder['pid']} on {holder['host']}, "
                   f"since {holder['started']})")
        assert one_line(refused[0]) == (f"Error: {out}: extract-features jobs are still running: {running}; "
                                        "wait for them to finish")
        assert one_line(refused[1]) == (f"Error: {journal(out, 1)}: extract-features --job-index 1 is writing here "
                                        f"(pid {holder['pid']} on {holder['host']}, since {holder['started']}); "
                                        "wait for it to finish or choose another --out")
    finally:
        os.killpg(redo.pid, signal.SIGCONT)
    assert redo.wait(timeout=300) == 0, redo.stderr.read()[-3000:]
    finished = subprocess.run(finish, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.load(open(out / "features.json"))["splits"]["Split1"]["flow_bound"] == 20.0


@pytest.mark.parametrize("args, line", [
    (["--num-jobs", "2"], "Error: --job-index is required with --num-jobs > 1 (or set SLURM_ARRAY_TASK_ID)"),
    (["--num-jobs", "2", "--job-index", "2"], "Error: --job-index 2 is out of range for --num-jobs 2 (0..1)"),
    (["--finish"], "Error: --finish checks the journals of --num-jobs N > 1 jobs; without --resume or --overwrite"),
])
def test_job_options_mistakes_are_one_line(sample_tree, tmp_path, args, line):
    root, _ = sample_tree
    result = subprocess.run(command(root, tmp_path / "out", *args), capture_output=True, text=True)
    assert (result.returncode, result.stderr.strip().splitlines()[-1:]) == (2 if "required" in line else 1, [line])
    assert not os.path.exists(tmp_path / "out")


def test_torchrun_ranks_are_the_jobs_and_rank_0_finishes(sample_tree, extracted, tmp_path, dask_client):
    root, _ = sample_tree
    reference, record = extracted
    out = tmp_path / "HMDB51"
    cmd = command(root, out, scheduler=dask_client.scheduler.address)
    launched = subprocess.run(torchrun("--nproc-per-node", "2", "-m", "ingest.cli", *cmd[1:]), capture_output=True,
                              text=True, env=ENV, timeout=300, cwd=REPO)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert features_of(out) == features_of(reference)
    mine = json.load(open(out / "features.json"))["splits"]["Split1"]
    assert mine["videos"] == record["videos"] and mine["last_run"]["jobs"] == 2
    assert sorted(os.listdir(out)) == ["Split1", "features.json"]


def test_chunks_hold_about_eight_batches_of_clips_per_network():
    jobs = [VideoJob("c", f"v{i}", f"/v{i}.avi", "Train") for i in range(6)]
    # batch 8: 32 units per chunk (8 batches of 8 clips, two streams per network); frames // 16, at least 1
    groups = chunks(jobs, [320, 200, 10, 160, 600, 16], batch_size=8)
    assert [[j.video for j in g] for g in groups] == [["v0", "v1"], ["v2", "v3", "v4"], ["v5"]]  # 32, 48, 1 units


def test_c3d_on_local_gpu_workers_writes_the_same_tree(sample_tree, extracted, tmp_path):
    """--c3d-workers (here on the CPU: a worker with a GPU resource and no GPU runs C3D on its cores)."""
    root, _ = sample_tree
    reference, record = extracted
    out = tmp_path / "HMDB51"
    result = subprocess.run(command(root, out, "--c3d-workers", "1")[:-2], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert features_of(out) == features_of(reference)
    mine = json.load(open(out / "features.json"))["splits"]["Split1"]
    assert mine["videos"] == record["videos"] and mine["last_run"]["c3d"] == "workers"


def test_a_schedulers_gpu_workers_run_c3d_and_skip_bad_videos(bad_tree, tmp_path):
    """Workers that declare a GPU resource are found on their own; a bad video in a chunk is skipped by
    name while its chunk's other videos are written."""
    from dask.distributed import Client, LocalCluster

    from ingest.c3d.extract import ExtractConfig, extract_features

    root, _ = bad_tree
    with LocalCluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=None,
                      scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"}) as cluster, \
            Client(cluster) as client:
        cfg = ExtractConfig(**FAST, on_error="skip")
        on_workers = extract_features(f"{root}/videos", f"{root}/splits", str(tmp_path / "a"), cfg, client=client)
    here = extract_features(f"{root}/videos", f"{root}/splits", str(tmp_path / "b"), ExtractConfig(**FAST, on_error="skip"),
                            client=None)
    assert on_workers["last_run"]["c3d"] == "workers" and here["last_run"]["c3d"] == "here"
    assert on_workers["skipped"] == here["skipped"] and len(here["skipped"]) >= 3
    assert on_workers["videos"] == here["videos"] and here["videos"]
    assert features_of(tmp_path / "a") == features_of(tmp_path / "b")
