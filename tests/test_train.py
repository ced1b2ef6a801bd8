"""train/ddp.py: the three launch ways, world-size invariance, kill and resume (on another number of processes too), learning."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from conftest import build, torchrun
from shards.demo import DemoConfig, make_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train", "ddp.py")
SMALL = ["--hidden", "16", "--batch-size", "8", "--data-streams", "2", "--loader-workers", "0", "-q",
         "--test-every", "1"]


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory, dask_client):
    root = tmp_path_factory.mktemp("train") / "HMDB51"
    make_demo(str(root), DemoConfig(classes=6, videos_per_class=4, dim=16, min_units=3, max_units=8, seed=3))
    build(root, dask_client, formats=("webdataset",), min_shards=3)
    return str(root) + "-shards"


# One BLAS thread everywhere: runs compared bit for bit must reduce in the same order whatever the number
# of processes (RMSprop's first step, ~lr * g / |g|, turns last-bit differences of tiny gradients into
# visible ones).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, timeout=240):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-5):
    """Equal within float tolerance: a step moves weights by ~1e-2 (lr 1e-3, RMSprop's first step ~10 lr),
    and summing a batch in another order changes the last bits."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_three_launch_ways_train_the_same_weights_as_one_process(train_shards, tmp_path):
    common = ["--shards", train_shards, "--epochs", "1", "--max-steps", "2", *SMALL]
    run([sys.executable, TRAIN, "--out", str(tmp_path / "single"), *common])
    run(torchrun("--nproc-per-node", "2", TRAIN, "--out", str(tmp_path / "torchrun"), *common))
    run(torchrun(TRAIN, "--nprocs", "2", "--out", str(tmp_path / "torchrun-nproc"), *common))
    run([sys.executable, TRAIN, "--nproc", "2", "--out", str(tmp_path / "python-nproc"), *common])
    reference = weights(tmp_path / "single")
    for way in ("torchrun", "torchrun-nproc", "python-nproc"):
        state = torch.load(tmp_path / way / "last.pt", weights_only=True)
        assert (state["global_step"], state["epoch"], state["step"]) == (2, 0, 2), way
        assert_same_weights(state["model"], reference)
    init = torch.nn.GRU(16, 16, bidirectional=True)  # the weights did move
    assert not torch.equal(reference["rnn1.weight_hh_l0"][:1], init.weight_hh_l0[:1])


def test_one_step_1x8_equals_2x4(train_shards, tmp_path):
    """Global batch 8: one process with 8 sequences, or two with 4 each, give the same weights."""
    common = ["--shards", train_shards, "--epochs", "1", "--max-steps", "1", *SMALL]
    run([sys.executable, TRAIN, "--out", str(tmp_path / "a"), *common])
    run([sys.executable, TRAIN, "--nproc", "2", "--out", str(tmp_path / "b"), *common])
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_refuses_to_clobber_a_run(train_shards, tmp_path):
    common = ["--shards", train_shards, "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path / "r"), *SMALL]
    run([sys.executable, TRAIN, *common])
    result = subprocess.run([sys.executable, TRAIN, *common], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert result.returncode == 1
    assert result.stderr == (f"Error: {tmp_path / 'r' / 'last.pt'} exists; pass --resume to continue that run "
                             "or choose another --out\n")


def test_bad_workers_value_is_refused_and_auto_picks_by_device(tmp_path):
    result = subprocess.run([sys.executable, TRAIN, "--workers", "-2", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, cwd=REPO, env=ENV)
    assert result.returncode == 2
    assert result.stderr == "Error: --loader-workers must be >= 0, or -1 for automatic, got -2\n"
    assert not (tmp_path / "r").exists()
    from elr.data import auto_workers
    assert (auto_workers("cpu"), auto_workers("cuda:0")) == (0, 2)


def test_every_option_has_help_and_elr_train_is_installed():
    from dataclasses import fields

    from train.config import TrainConfig
    assert all(len(f.metadata["help"]) > 10 for f in fields(TrainConfig))
    elr_train = os.path.join(os.path.dirname(sys.executable), "elr-train")
    text = subprocess.run([elr_train, "--help"], capture_output=True, text=True, cwd=REPO, env=ENV).stdout
    assert "Usage: elr-train [OPTIONS]" in text and "[default: lr+hr]" in text
    assert "DataLoader worker processes per rank; -1: 2" in " ".join(text.split())
    assert "--loader-workers, --workers INTEGER" in text and "-q, --quiet" in text


def wait_for_step(out, at_least, proc, timeout=120):
    path, deadline = os.path.join(out, "last.pt"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            try:
                if torch.load(path, weights_only=True)["global_step"] >= at_least:
                    return
            except Exception:  # caught between writes of an unrelated file: retry
                pass
        time.sleep(0.01)
    raise AssertionError("the run ended or stalled before it could be killed")


RESTARTED = ["--epochs", "3", *SMALL, "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(train_shards, tmp_path_factory):
    """The folder of a run of RESTARTED that nothing interrupts (killed and restarted runs compare with it)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run([sys.executable, TRAIN, "--out", str(out), "--shards", train_shards, *RESTARTED])
    return out


def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(train_shards, uninterrupted, tmp_path):
    common = ["--shards", train_shards, *RESTARTED]
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, TRAIN, "--out", out, *common, "--nproc", "2"], cwd=REPO, env=ENV,
                            start_new_session=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for_step(out, 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    steps_per_epoch = 6  # 48 videos in Train + Validation, 2 streams x 2 videos x 6 steps
    assert state["global_step"] < 3 * steps_per_epoch, "killed too late"
    run([sys.executable, TRAIN, "--out", out, *common, "--nproc", "2", "--resume"])
    assert_same_weights(weights(out), weights(uninterrupted))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    clean = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and os.path.exists(os.path.join(out, "curves.png"))
    for got, want in zip(metrics, clean):  # the killed epoch reports what the uninterrupted one did
        assert got["step"] == want["step"] and got["padding"] == want["padding"], (got, want)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5), (got, want)
        assert got["test_acc"] == want["test_acc"]


@pytest.mark.parametrize("launcher", ["torchrun", "python"])
def test_max_restarts_recovers_from_a_killed_worker(train_shards, uninterrupted, tmp_path, launcher):
    import psutil

    common = ["--shards", train_shards, *RESTARTED]
    out = str(tmp_path / "restarted")
    if launcher == "torchrun":
        cmd = torchrun("--nproc-per-node", "2", "--max-restarts", "2", TRAIN, "--out", out, *common)
    else:
        cmd = [sys.executable, TRAIN, "--out", out, *common, "--nproc", "2", "--max-restarts", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for_step(out, 3, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline()) or TRAIN in p.cmdline()]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[-1].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=240) == 0
    assert_same_weights(weights(out), weights(uninterrupted))


# ---- resuming on another number of processes ------------------------------------------------------

# 4 streams of 1 video a step (batch 8 sequences: LR and HR of 4 videos); 48 videos: 12 steps an epoch
STREAMS4 = ["--hidden", "16", "--batch-size", "8", "--data-streams", "4", "--loader-workers", "0", "-q",
            "--test-every", "2", "--epochs", "2", "--checkpoint-every", "1", "--log-samples"]


def read_samples(out) -> list:
    lines = []
    for name in sorted(os.listdir(out)):
        if name.startswith("samples-rank"):
            lines += [json.loads(line) for line in open(os.path.join(out, name))]
    return lines


def steps_read(lines) -> Counter:
    return Counter((x["epoch"], x["step"], x["stream"], tuple(x["keys"])) for x in lines)


@pytest.fixture(scope="module")
def uninterrupted4(train_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted4")
    run([sys.executable, TRAIN, "--out", str(out), "--shards", train_shards, *STREAMS4, "--nproc", "2"])
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (3, 2)])
def test_killed_on_w_processes_resumes_on_another_number(train_shards, uninterrupted4, tmp_path, before, after):
    out = str(tmp_path / "run")
    common = [sys.executable, TRAIN, "--out", out, "--shards", train_shards, *STREAMS4]
    proc = subprocess.Popen(common + ["--nproc", str(before)], cwd=REPO, env=ENV, start_new_session=True,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for_step(out, 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, state["step"]) and 4 <= state["step"] < 12, "killed too late"
    # what the killed run read and kept: the steps before its checkpoint (a step after it is redone)
    kept = [x for x in read_samples(out) if x["step"] < state["step"]]
    assert {x["world"] for x in kept} == {before}

    run(common + ["--nproc", str(after), "--resume"])
    later = [x for x in read_samples(out) if x["world"] == after]
    assert {x["rank"] for x in later} == set(range(after))
    clean = read_samples(uninterrupted4)
    assert steps_read(kept + later) == steps_read(clean)  # every step's videos, each step once, as uninterrupted
    epoch0 = Counter(k for x in kept + later if x["epoch"] == 0 for k in x["keys"])
    assert len(epoch0) == 48 and sum(epoch0.values()) == 48  # 4 streams x 12 steps: every video exactly once
    assert_same_weights(weights(out), weights(uninterrupted4))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    want = [json.loads(line) for line in open(uninterrupted4 / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [m["step"] for m in want] == [12, 24]
    for got, w in zip(metrics, want):
        assert got["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5) and got["test_acc"] == w["test_acc"]


def test_more_processes_than_streams_is_refused_at_start(train_shards, tmp_path):
    result = subprocess.run([sys.executable, TRAIN, "--out", str(tmp_path / "r"), "--shards", train_shards,
                             *STREAMS4, "--nproc", "5"], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert (result.returncode, result.stderr.strip()) == (
        2, "Error: --nproc (5) must be at most --data-streams (4): each process reads whole streams")


def demo_shards(tmp_path, dask_client, **demo):
    root = tmp_path / "HMDB51"
    make_demo(str(root), DemoConfig(classes=6, videos_per_class=8, min_units=4, max_units=12, seed=0, **demo))
    build(root, dask_client, formats=("webdataset",))
    return str(root) + "-shards"


def train_acc(shards, out, **kw):
    from train.ddp import TrainConfig, train

    cfg = TrainConfig(shards=shards, out=str(out), hidden=32, batch_size=16, data_streams=2, lr=3e-3, loader_workers=0,
                      quiet=True, **kw)
    cfg.test_every = kw.get("test_every", cfg.epochs)
    return train(cfg)["test_acc"]


def order_blind_acc(shards):
    """Nearest class centroid of mean-pooled, normalised LR+HR features: blind to the order of units."""
    import numpy as np

    from shards.manifest import load_manifest
    from shards.tario import iter_tar_samples

    m = load_manifest(shards)

    def pooled(phases, fields):
        xs, ys = [], []
        for phase in phases:
            for shard in m["splits"]["Split1"][phase]["webdataset"]["shards"]:
                for s in iter_tar_samples(os.path.join(shards, shard["path"])):
                    for rgb, flow in fields:
                        x = np.concatenate([s[rgb], s[flow]], 1)
                        xs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0))
                        ys.append(s["meta"]["label"])
        return np.array(xs), np.array(ys)

    x, y = pooled(["Train", "Validation"], [("lr_rgb", "lr_flow"), ("hr_rgb", "hr_flow")])
    centroids = np.stack([x[y == c].mean(0) for c in range(len(m["classes"]))])
    xt, yt = pooled(["Test"], [("lr_rgb", "lr_flow")])
    return float((np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), 1) == yt).mean())


def test_learns_far_above_chance_and_above_an_order_blind_classifier(tmp_path, dask_client):
    shards = demo_shards(tmp_path, dask_client, dim=32, hr_snr=4.0, lr_snr=2.0)
    acc = train_acc(shards, tmp_path / "run", epochs=12)  # 0.90-0.94 from epoch 3 on (checked per epoch up to 30)
    blind = order_blind_acc(shards)
    assert acc >= 0.75, acc  # chance is 1/6
    assert blind <= 0.5 and acc >= blind + 0.3, (acc, blind)  # classes differ only in the order of motifs


def test_hr_coupling_beats_lr_alone_when_hr_is_cleaner(tmp_path, dask_client):
    shards = demo_shards(tmp_path, dask_client, dim=64, hr_snr=4.0, lr_snr=1.0)
    coupled = train_acc(shards, tmp_path / "coupled", epochs=20, train_on="lr+hr")
    lr_only = train_acc(shards, tmp_path / "lr", epochs=20, train_on="lr")
    assert coupled >= lr_only + 0.1, (coupled, lr_only)
    assert coupled >= 2 / 6, coupled


def test_length_bucketing_costs_no_accuracy_on_hmdb51_lengths(tmp_path, dask_client):
    """Real HMDB51 lengths depend on the class (hit: 2 units on average, brush_hair: 17): length-sorted
    micro-batches could turn into class-homogeneous steps and slow learning. Bucketed training
    (--length-bucketing) must learn as well as plain shuffled batches (a window of one micro-batch, as
    the seed's loader forms them) while padding far less."""
    import json

    root = tmp_path / "HMDB51"
    make_demo(str(root), DemoConfig(classes=12, videos_per_class=8, dim=32, lengths="hmdb51", seed=0))
    build(root, dask_client, formats=("webdataset",))
    results = {}
    for name, buffer, bucket in (("bucketed", 256, True), ("unbucketed", 4, False)):  # 4: 16 / (lr+hr) / 2 streams
        out = tmp_path / name
        train_acc(str(root) + "-shards", out, epochs=12, shuffle_buffer=buffer, length_bucketing=bucket, test_every=1)
        history = [json.loads(line) for line in open(out / "metrics.jsonl")]
        best = max(r["test_acc"] for r in history[-4:])  # single epochs swing at this size
        results[name] = best, sum(r["padding"] for r in history) / len(history)
    (bucketed, bucketed_padding), (plain, plain_padding) = results["bucketed"], results["unbucketed"]
    assert bucketed >= plain - 0.05 and bucketed >= 0.6, results  # chance: 1/12
    assert bucketed_padding < plain_padding / 3, results
