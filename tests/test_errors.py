"""A user's mistakes at every entry point: one `Error: ...` line naming the flag, file or URL, exit 1,
nothing left behind."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build, run_side_by_side
from shards.demo import DemoConfig, make_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--hidden", "8", "--batch-size", "8", "--data-streams", "2", "--loader-workers", "0", "-q", "--test-every", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dask_client):
    root = tmp_path_factory.mktemp("errors") / "HMDB51"
    make_demo(str(root), DemoConfig(classes=4, videos_per_class=2, dim=8, min_units=3, max_units=6, seed=5))
    build(root, dask_client, min_shards=2)
    return root.parent / "HMDB51-shards"


@pytest.fixture
def own_shards(shards, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    return copy


def train_command(*args) -> list:
    return [os.path.join(BIN, "elr-train"), *map(str, args)]


def train_cli(*args, timeout=120, **popen):
    return subprocess.run(train_command(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV,
                          **popen)


def assert_one_error(result, expected, code=1):
    """The run's only output besides its config line is the one error line."""
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if not line.startswith("config {")]
    assert (result.returncode, lines) == (code, [f"Error: {expected}"]), result.stderr[-2000:]


def test_train_bad_shard_sets_and_folders(shards, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = [
        (["--shards", tmp_path / "missing"], f"{tmp_path / 'missing'}: no such shard set folder"),
        (["--shards", tmp_path / "empty"], f"{tmp_path / 'empty' / 'manifest.json'}: no manifest; not a finished shard set"),
        (["--shards", shards.parent / "HMDB51"],  # the source tree, not a shard set
         f"{shards.parent / 'HMDB51' / 'manifest.json'}: no manifest; not a finished shard set"),
        (["--shards", shards, "--out", tmp_path / "a-file"], f"--out {tmp_path / 'a-file'}: is a file, not a folder"),
        (["--shards", shards, "--split", "Split7"], f"--split Split7: not in the shard set {shards} (it has Split1)"),
        (["--shards", shards, "--device", "cuda"],
         "--device cuda: CUDA is not available (this torch is built without CUDA); use --device cpu or auto"),
        (["--shards", shards, "--resume", "--out", tmp_path / "a-file"], f"--out {tmp_path / 'a-file'}: is a file, not a folder"),
    ]
    if torch.version.cuda is not None:
        cases = [c for c in cases if "--device" not in c[0]]
    outs = [tmp_path / f"run{i}" for i in range(len(cases))]  # an --out in a case's args comes later and wins
    results = run_side_by_side([train_command("--out", out, *args, *SMALL) for out, (args, _) in zip(outs, cases)],
                               cwd=REPO, env=ENV)
    for out, (args, expected), result in zip(outs, cases, results):
        assert_one_error(result, expected, code=2 if "--device" in args else 1)  # 2: refused while parsing
        assert not out.exists(), "a failed run leaves no run folder"


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--batch-size", "12", "--batch-size (12) must be a multiple of --data-streams x sequences per video (8 x 2)"),
    ("--hidden", "0", "--hidden must be >= 1, got 0"),
    ("--data-streams", "0", "--data-streams must be >= 1, got 0"),
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--nproc", "0", "--nproc must be >= 1, got 0"),
    ("--nproc", "9", "--nproc (9) must be at most --data-streams (8): each process reads whole streams"),
    ("--checkpoint-every", "-1", "--checkpoint-every must be >= 0, got -1"),
    ("--test-every", "0", "--test-every must be >= 1, got 0"),
    ("--lr", "0", "--lr must be a positive number, got 0.0"),
    ("--lr", "nan", "--lr must be a positive number, got nan"),
    ("--device", "gpu", "--device must be one of auto, cpu, cuda (or cuda:N), got 'gpu'"),
    ("--amp", "fp8", "--amp must be one of bf16, fp16, off, got 'fp8'"),
    ("--epochs", "x", "Invalid value for '--epochs': 'x' is not a valid integer."),
])
def test_train_options_are_validated_before_any_work(flag, value, message, tmp_path, capsys):
    from train.ddp import main

    with pytest.raises(SystemExit) as exit:
        main([flag, value, "--out", str(tmp_path / "run"), "--shards", "/nowhere"])
    assert exit.value.code == 2 and capsys.readouterr().err == f"Error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_train_missing_and_truncated_shards(own_shards, tmp_path):
    from shards.manifest import load_manifest

    shard = load_manifest(str(own_shards))["splits"]["Split1"]["Train"]["webdataset"]["shards"][1]
    path = own_shards / shard["path"]
    path.write_bytes(path.read_bytes()[:1500])
    result = train_cli("--shards", own_shards, "--out", tmp_path / "run", *SMALL)
    assert_one_error(result, f"{path}: 1500 bytes, the manifest says {shard['bytes']} (truncated or replaced; "
                             "run elr-ingest verify)")
    path.unlink()
    result = train_cli("--shards", own_shards, "--out", tmp_path / "run", *SMALL, "--nproc", "2")
    assert_one_error(result, f"{path}: missing (the manifest lists it; run elr-ingest verify)")


def test_a_shard_damaged_mid_run_stops_every_rank_with_one_line(own_shards, tmp_path):
    """Same size, bad content: found by one rank while training; both ranks stop, quickly."""
    from shards.manifest import load_manifest

    m = load_manifest(str(own_shards))
    entry = m["splits"]["Split1"]["Validation"]
    shard = entry["webdataset"]["shards"][-1]
    second = [s for s in entry["samples"] if s["shard"] == os.path.basename(shard["path"])][1]["offset"]
    path = own_shards / shard["path"]
    data = bytearray(path.read_bytes())
    data[second + 100:second + 108] = b"garbage!"  # the tar header of the shard's second sample
    path.write_bytes(bytes(data))
    result = train_cli("--shards", own_shards, "--out", tmp_path / "run", *SMALL, "--nproc", "2", "--epochs", "3",
                       timeout=90)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("config ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines == [f"Error: {path}: truncated or not a tar file (bad header at byte {second}: bad checksum)"], lines


def test_resume_refuses_another_shard_set_or_model_and_says_when_it_finds_nothing(shards, own_shards, tmp_path):
    out = tmp_path / "run"
    result = train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1", "--resume")
    assert result.returncode == 0 and f"--resume: no {out / 'last.pt'} yet; starting a new run\n" in result.stderr
    digest = torch.load(out / "last.pt", weights_only=True)["manifest_sha256"]
    m = json.loads((own_shards / "manifest.json").read_text())
    m["classes"][0] = "renamed"
    (own_shards / "manifest.json").write_text(json.dumps(m))
    from shards.manifest import load_manifest, manifest_digest
    other = manifest_digest(load_manifest(str(own_shards)))
    old = tmp_path / "old"  # the same run, as a version before --length-bucketing wrote it (trained bucketed)
    shutil.copytree(out, old)
    same = tmp_path / "same"  # side by side, each command has its own folder: one would find the other's lock
    shutil.copytree(out, same)
    state = torch.load(old / "last.pt", weights_only=True)
    del state["config"]["length_bucketing"]
    torch.save(state, old / "last.pt")
    results = run_side_by_side([train_command("--shards", own_shards, "--out", out, *SMALL, "--resume"),
                                train_command("--shards", shards, "--out", same, *SMALL, "--resume", "--hidden", "16",
                                              "--lr", "0.01"),
                                train_command("--shards", shards, "--out", old, *SMALL, "--resume")], cwd=REPO, env=ENV)
    assert_one_error(results[0], f"--resume: {out / 'last.pt'} was trained on another shard set (manifest sha256 "
                                 f"{digest[:12]}, --shards {own_shards} has {other[:12]})")
    assert_one_error(results[1], f"--resume: {same / 'last.pt'} was trained with --lr 0.001, --hidden 8; this run has "
                                 "--lr 0.01, --hidden 16 (use the same options, or another --out)")
    assert_one_error(results[2], f"--resume: {old / 'last.pt'} was trained with --length-bucketing True; this run "
                                 "has --length-bucketing False (use the same options, or another --out)")


def test_resume_from_a_damaged_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1").returncode == 0
    whole = (out / "last.pt").read_bytes()
    damaged = {"cut": whole[:len(whole) // 2], "empty": b"", "text": b"not a checkpoint at all, just text\n" * 10}
    for name, data in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(data)
    (tmp_path / "other").mkdir()
    torch.save({"model": {"rnn1.weight_ih_l0": torch.zeros(2)}}, tmp_path / "other" / "last.pt")  # another program's
    names = [*damaged, "other"]
    results = run_side_by_side([train_command("--shards", shards, "--out", tmp_path / name, *SMALL, "--resume")
                                for name in names], cwd=REPO, env=ENV)
    for name, result in zip(damaged, results):
        path = tmp_path / name / "last.pt"
        assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"Error: {path}: not a readable checkpoint (empty, cut off or another format: ")
    assert_one_error(results[-1], f"{tmp_path / 'other' / 'last.pt'}: not a train/ddp.py checkpoint of this version "
                                  "(no run, manifest_sha256, config)")


def test_restart_never_resumes_another_runs_checkpoint(shards, tmp_path, monkeypatch):
    """A worker restarted by --max-restarts continues only the checkpoint its own launch wrote."""
    from train.config import TrainConfig
    from train.startup import resume_decision
    from elr.checkpoint import CheckpointError

    out = tmp_path / "run"
    assert train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1").returncode == 0
    digest = torch.load(out / "last.pt", weights_only=True)["manifest_sha256"]
    cfg = TrainConfig(shards=str(shards), out=str(out), hidden=8, batch_size=8, data_streams=2)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-launch")
    with pytest.raises(CheckpointError, match="belongs to another run .*; pass --resume to continue it"):
        resume_decision(cfg, digest, restart=1)
    with pytest.raises(CheckpointError, match="exists; pass --resume"):
        resume_decision(cfg, digest, restart=0)
    launch = torch.load(out / "last.pt", weights_only=True)["run"]["launch"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", launch)
    assert resume_decision(cfg, digest, restart=1) == ("resume", None)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KB fail: a full disk, for this process


def test_full_and_read_only_disks(shards, tmp_path):
    out = tmp_path / "run"
    result = train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1", preexec_fn=_limit_file_size)
    assert_one_error(result, f"{out / 'last.pt'}: File too large")
    assert os.listdir(out) == [] if out.exists() else True  # no temporary file left
    result = train_cli("--shards", shards, "--out", "/sys/elr-run", *SMALL, "--max-steps", "1")  # sysfs: read-only
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: --out /sys/elr-run: cannot create the run folder (")


def test_epochs_end_exactly_at_max_steps(shards, tmp_path):
    """--max-steps on an epoch's last step ends the run there, not one step into the next epoch."""
    from train.ddp import TrainConfig, train

    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "run"), hidden=8, batch_size=8, data_streams=2,
                      loader_workers=0, quiet=True, epochs=3, max_steps=4)  # 16 videos / 2 streams / 2 a step: 4 steps
    record = train(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step"]) == (4, 1, 0)
    assert record["epoch"] == 1 and record["test_acc"] is not None  # the epoch finished, and was tested
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    import gc
    assert gc.get_freeze_count() == 0  # train() froze setup's objects for its epochs only


def test_amp_bf16_trains_on_cpu(shards, tmp_path):
    from train.ddp import TrainConfig, train

    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "run"), hidden=8, batch_size=8, data_streams=2,
                      loader_workers=0, quiet=True, epochs=1, amp="bf16")
    record = train(cfg)
    assert 0 < record["train_loss"] < 10 and record["test_acc"] is not None


# ---- malformed manifests, at every command that reads one


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.pop("classes"), '"classes" must be a non-empty list of distinct names, found None'),
    (lambda m: m.update(dim="abc"), '"dim" must be a positive integer, found \'abc\''),
    (lambda m: m["splits"]["Split1"]["Test"].update(label_counts=[1]),
     'splits.Split1.Test needs "units" and "label_counts" (one count per class, '),
    (lambda m: m["splits"]["Split1"]["Test"]["webdataset"]["shards"][0].update(path="../../etc/passwd"),
     "splits.Split1.Test.webdataset.shards[0] needs a relative path, samples, bytes and sha256"),
    (lambda m: m.update(format_version=9), "format 'elr-shards' version 9, expected 'elr-shards' version 1 or 2"),
])
def test_malformed_manifest_is_one_error_everywhere(own_shards, tmp_path, edit, problem):
    path = own_shards / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    checkpoint = tmp_path / "x.pt"
    torch.save({"model": {}}, checkpoint)
    commands = ([os.path.join(BIN, "elr-ingest"), "verify", str(own_shards), "-q"],
                [os.path.join(BIN, "elr-ingest"), "info", str(own_shards)],
                [os.path.join(BIN, "elr-eval"), "run", "--shards", str(own_shards), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "eval")],
                [os.path.join(BIN, "elr-train"), "--shards", str(own_shards), "--out", str(tmp_path / "run")])
    for result in run_side_by_side(commands, env=ENV):
        assert result.returncode == 1 and "Traceback" not in result.stderr, (result.args, result.stderr[-2000:])
        assert result.stderr.startswith(f"Error: {path}: {problem}"), (result.args, result.stderr)


def test_a_manifest_that_is_a_list_or_not_json(own_shards):
    from shards.errors import ManifestError
    from shards.manifest import load_manifest

    path = own_shards / "manifest.json"
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match=r"manifest.json: expected a JSON object, found list$"):
        load_manifest(str(own_shards))
    path.write_text('{"format": ')
    with pytest.raises(ManifestError, match=r"manifest.json: not JSON \(Expecting value"):
        load_manifest(str(own_shards))


# ---- elr-eval run


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable checkpoint (empty, cut off or another format: EOFError)"),
    (b"\x00garbage" * 50, "not a readable checkpoint (empty, cut off or another format:"),
])
def test_eval_bad_checkpoints(shards, tmp_path, content, message):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(content)
    result = subprocess.run([os.path.join(BIN, "elr-eval"), "run", "--shards", str(shards), "--checkpoint",
                             str(checkpoint), "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Aborted" not in result.stderr
    assert result.stderr.startswith(f"Error: {checkpoint}: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "eval").exists()


def test_eval_cut_off_and_other_model_checkpoints(shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1").returncode == 0
    cut = tmp_path / "cut.pt"
    cut.write_bytes((out / "last.pt").read_bytes()[:5000])
    other = tmp_path / "other.pt"
    torch.save({"model": {"rnn1.weight_ih_l0": torch.zeros(3, 8)}}, other)
    for checkpoint, message in ((cut, "not a readable checkpoint (empty, cut off or another format: "),
                                (other, "not the weights of this project's two-stream GRU ('rnn1.weight_hh_l0')")):
        result = subprocess.run([os.path.join(BIN, "elr-eval"), "run", "--shards", str(shards), "--checkpoint",
                                 str(checkpoint), "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                                timeout=120, env=ENV)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"Error: {checkpoint}: {message}"), result.stderr


def test_eval_part_on_a_full_disk_leaves_nothing(shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli("--shards", shards, "--out", out, *SMALL, "--max-steps", "1").returncode == 0
    result = subprocess.run([os.path.join(BIN, "elr-eval"), "run", "--shards", str(shards), "--checkpoint",
                             str(out / "last.pt"), "--out", str(tmp_path / "eval"), "--num-jobs", "2", "--job-index", "0"],
                            capture_output=True, text=True, timeout=120, env=ENV,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)))
    part = tmp_path / "eval" / "part-00000-of-00002.npz"
    assert (result.returncode, result.stderr) == (1, f"Error: {part}: File too large\n")
    assert os.listdir(tmp_path / "eval") == []  # no zero-byte temporary part
