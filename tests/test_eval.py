"""elr-eval: jobs and merges agree with a plain loop; bad part sets are refused by name."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import torchrun
from elr.model import TwoStreamGRU, export_seed_state_dict, normalise_units
from shards.manifest import load_manifest
from shards.tario import iter_tar_samples
from train.eval_cli import cli as main
from train.evaluate import EvalConfig, EvalError, merge, run_job, run_on_dask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(built_master, tmp_path_factory):
    m = load_manifest(str(built_master))
    torch.manual_seed(0)
    model = TwoStreamGRU(m["dim"], 16, len(m["classes"]))
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"model": model.state_dict(), "classes": m["classes"]}, path)
    return str(path)


def jobs(shards, checkpoint, out, n, **kw):
    for i in range(n):
        run_job(EvalConfig(str(shards), checkpoint, str(out), n, i, device="cpu", **kw))
    return merge(str(out))


def plain_loop_top1(shards, checkpoint):
    model = TwoStreamGRU(**{"input_size": 16, "hidden_size": 16, "num_classes": 6}).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    m = load_manifest(str(shards))
    correct = total = 0
    with torch.no_grad():
        for shard in m["splits"]["Split1"]["Test"]["webdataset"]["shards"]:
            for s in iter_tar_samples(str(shards / shard["path"])):
                x = [normalise_units(torch.from_numpy(np.array(s[f]))[None]) for f in ("lr_rgb", "lr_flow")]
                logits = model(*x, torch.tensor([s["lr_rgb"].shape[0]]))
                correct += int(logits.argmax(1).item() == s["meta"]["label"])
                total += 1
    return correct / total, total


def test_one_and_three_jobs_and_both_formats_agree_with_a_plain_loop(built_master, checkpoint, tmp_path):
    one = jobs(built_master, checkpoint, tmp_path / "one", 1)
    three = jobs(built_master, checkpoint, tmp_path / "three", 3)
    tars = jobs(built_master, checkpoint, tmp_path / "tar", 3, fmt="webdataset")
    for s in (three, tars):
        assert {k: v for k, v in s.items() if k != "num_jobs"} == {k: v for k, v in one.items() if k != "num_jobs"}
    top1, n = plain_loop_top1(built_master, checkpoint)
    assert one["videos"] == n == 18 and one["top1"] == top1
    assert np.array(one["confusion"]).sum() == 18 and one["top5"] >= one["top1"]
    for name in ("report.json", "report.md", "predictions.csv", "confusion.png"):
        assert (tmp_path / "three" / name).stat().st_size > 0
    with open(tmp_path / "three" / "predictions.csv") as f:
        assert len(f.readlines()) == 19


def test_missing_duplicated_and_stale_parts_are_refused(built_master, checkpoint, tmp_path):
    out = tmp_path / "parts"
    jobs(built_master, checkpoint, out, 3)
    os.remove(out / "part-00002-of-00003.npz")
    with pytest.raises(EvalError) as err:
        merge(str(out))
    assert str(err.value) == f"missing parts for jobs 2 of 3: expected {out}/part-00002-of-00003.npz"

    run_job(EvalConfig(str(built_master), checkpoint, str(out), 3, 2, device="cpu"))  # re-running a job replaces its part
    shutil.copy(out / "part-00001-of-00003.npz", out / "part-00001-of-00003-copy.npz")
    with pytest.raises(EvalError) as err:
        merge(str(out))
    assert str(err.value) == (f"job 1 has 2 parts: {out}/part-00001-of-00003-copy.npz, "
                              f"{out}/part-00001-of-00003.npz")
    os.remove(out / "part-00001-of-00003-copy.npz")

    other = tmp_path / "other.pt"
    blob = torch.load(checkpoint, weights_only=True)
    blob["model"]["classifier.bias"] += 1
    torch.save(blob, other)
    run_job(EvalConfig(str(built_master), str(other), str(out), 3, 1, device="cpu"))
    with pytest.raises(EvalError, match=r"part-00001-of-00003.npz: stale part: its checkpoint differs from "):
        merge(str(out))


def test_seed_format_checkpoint_evaluates(built_master, checkpoint, tmp_path):
    model = TwoStreamGRU(16, 16, 6)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    export_seed_state_dict(model, str(tmp_path / "state_dict-epoch-50.pth"))
    seed = jobs(built_master, str(tmp_path / "state_dict-epoch-50.pth"), tmp_path / "seed", 2)
    ours = jobs(built_master, checkpoint, tmp_path / "ours", 2)
    assert seed["top1"] == ours["top1"] and seed["confusion"] == ours["confusion"]


def test_dask_path(built_master, checkpoint, tmp_path, dask_client):
    scores = run_on_dask(dask_client, EvalConfig(str(built_master), checkpoint, str(tmp_path / "dask"), num_jobs=2,
                                                 device="cpu"))
    assert scores["top1"] == jobs(built_master, checkpoint, tmp_path / "ref", 1)["top1"]
    assert sorted(os.listdir(tmp_path / "dask"))[:2] == ["confusion.png", "part-00000-of-00002.npz"]


def test_torchrun_ranks_are_jobs_and_rank0_merges(built_master, checkpoint, tmp_path):
    out = tmp_path / "torchrun"
    result = subprocess.run(torchrun("--nproc-per-node", "2", "-m", "train.eval_cli", "run", "--shards",
                                     str(built_master), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu"),
                            capture_output=True, text=True, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p for p in os.listdir(out) if p.startswith("part-")) == \
        ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]
    reference = jobs(built_master, checkpoint, tmp_path / "ref", 1)
    assert json.loads((out / "report.json").read_text())["top1"] == reference["top1"]
    assert "top-1" in result.stdout


def test_cli_job_index_from_slurm_and_merge(built_master, checkpoint, tmp_path):
    runner = CliRunner()
    for i in range(2):
        result = runner.invoke(main, ["run", "--shards", str(built_master), "--checkpoint", checkpoint, "--num-jobs",
                                      "2", "--out", str(tmp_path), "--device", "cpu"],
                               env={"SLURM_ARRAY_TASK_ID": str(i)})
        assert result.exit_code == 0, result.output
    assert (tmp_path / "part-00001-of-00002.npz").exists()
    result = runner.invoke(main, ["merge", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["videos"] == 18
    result = runner.invoke(main, ["run", "--shards", str(built_master), "--checkpoint", checkpoint, "--num-jobs", "2",
                                  "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--job-index is required with --num-jobs > 1" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["merge", str(tmp_path / "empty")])
    assert result.exit_code == 1 and result.output == f"Error: {tmp_path / 'empty'}: no part-*.npz files\n"
