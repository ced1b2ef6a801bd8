"""elr-ingest wiring: options reach the library, errors are one line, exit codes are right."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ingest.cli import cli, main
from shards.manifest import load_manifest

BIN = os.path.dirname(sys.executable)  # the venv's console scripts


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def console(*args, timeout=120):
    """The installed console script, as a user runs it."""
    return subprocess.run([os.path.join(BIN, str(args[0])), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=timeout)


def test_help_has_examples():
    for cmd in ("build-shards", "verify", "info", "make-demo", "extract-features", "make-demo-videos"):
        result = run(cmd, "--help")
        assert result.exit_code == 0 and "Example" in result.output, cmd


def test_make_demo_build_verify_info_via_scheduler(tmp_path, dask_client):
    root = tmp_path / "HMDB51"
    assert run("make-demo", root, "--classes", 4, "--videos-per-class", 2, "--dim", 8).exit_code == 0
    result = run("build-shards", root, "--scheduler", dask_client.scheduler.address, "--format", "webdataset",
                 "--shard-size", "2KB", "--dtype", "float16", "-q")
    assert result.exit_code == 0, result.output
    m = load_manifest(str(tmp_path / "HMDB51-shards"))
    assert m["dtype"] == "float16" and m["options"]["formats"] == ["webdataset"] and m["options"]["shard_bytes"] == 2000
    result = run("verify", tmp_path / "HMDB51-shards", "--source", root, "--scheduler",
                 dask_client.scheduler.address, "-q")
    assert result.exit_code == 0 and result.output.strip() == "OK: 24 tar shards, 24 samples, 0 zarr files, 24 source videos"
    info = json.loads(run("info", tmp_path / "HMDB51-shards", "--json").output)
    assert [(p["phase"], p["videos"], p["classes"]) for p in info["phases"]] == \
        [("Test", 8, 4), ("Train", 8, 4), ("Validation", 8, 4)]
    assert "Split1/Train" in run("info", tmp_path / "HMDB51-shards").output


def test_errors_are_one_line_exit_1(built, tmp_path):
    result = run("build-shards", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path}: no Split* folders (expected e.g. {tmp_path}/Split1/Train_lr_features/<class>/<video>.npy)\n"
    result = run("verify", tmp_path)
    assert result.exit_code == 1 and result.output == f"Error: {tmp_path}/manifest.json: no manifest; not a finished shard set\n"


def test_a_bad_video_is_one_line_on_the_default_local_cluster(tmp_path):
    """The command as a user runs it: its own local cluster, starting while the headers are scanned
    here; the scan fails first, and the cluster is closed, not left behind."""
    root = tmp_path / "HMDB51"
    assert run("make-demo", root, "--classes", 2, "--videos-per-class", 2, "--dim", 8).exit_code == 0
    bad = next((root / "Split1" / "Test_hr_optfl_features").glob("*/*.npy"))
    bad.write_bytes(b"not an array")
    result = console("elr-ingest", "build-shards", root, "-q")
    video = f"{bad.parent.name}/{bad.stem}"
    assert result.returncode == 1 and result.stderr == f"Error: video {video}: {bad}: not a .npy file (bad magic bytes)\n"
    assert not (tmp_path / "HMDB51-shards").exists() and not (tmp_path / "HMDB51-shards.building").exists()


def test_usage_mistakes_are_one_line_naming_the_flag(built, demo_master):
    """The installed scripts: bad option values are refused before any work, in one line (exit 2)."""
    cases = [
        (("elr-ingest", "build-shards", demo_master, "--shard-size", "lots"),
         "Error: Invalid value for '--shard-size': 'lots' is not a size (e.g. 256MB, 1.5GB, 64MiB)\n"),
        (("elr-ingest", "build-shards", demo_master, "--shard-size", "0"),
         "Error: Invalid value for '--shard-size': '0' must be more than 0 bytes\n"),
        (("elr-ingest", "verify", built, "--workers", "-1"),  # hung forever at 0% before
         "Error: Invalid value for '--dask-workers' / '--workers': -1 is not in the range x>=0.\n"),
        (("elr-ingest", "build-shards", demo_master, "--dask-workers", "-1"),
         "Error: Invalid value for '--dask-workers' / '--workers': -1 is not in the range x>=0.\n"),
        (("elr-ingest", "build-shards", demo_master, "--min-shards", "0"),
         "Error: Invalid value for '--min-shards': 0 is not in the range x>=1.\n"),
        (("elr-eval", "run", "--shards", built, "--checkpoint", built / "manifest.json", "--out", "x", "--batch-size", "0"),
         "Error: Invalid value for '--batch-size': 0 is not in the range x>=1.\n"),
        (("elr-ingest", "verify", "/no/such/set"),
         "Error: Invalid value for 'SHARDS': Directory '/no/such/set' does not exist.\n"),
    ]
    for args, expected in cases:
        result = console(*args, timeout=60)
        assert (result.returncode, result.stderr) == (2, expected), args


def test_file_system_errors_are_one_line_naming_the_path(demo_master, tmp_path, dask_client):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "shards"
    result = run("build-shards", demo_master, "--out", out, "--scheduler", dask_client.scheduler.address, "-q")
    assert result.exit_code == 1
    assert result.output == f"Error: {out}.lock: Not a directory\n"  # the first file it writes: its lock


def test_verify_resolves_a_relative_path_before_sending_it_to_workers(built, dask_client, monkeypatch):
    """The cluster's workers run in another folder: they must get the full path."""
    monkeypatch.chdir(built.parent)
    result = run("verify", built.name, "--scheduler", dask_client.scheduler.address, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")


def test_verify_exit_code_and_problem_lines(built, dask_client):
    m = load_manifest(str(built))
    shard = m["splits"]["Split1"]["Test"]["webdataset"]["shards"][2]
    (built / shard["path"]).unlink()
    result = run("verify", built, "--scheduler", dask_client.scheduler.address, "-q")
    assert result.exit_code == 1
    assert f"PROBLEM {shard['path']}: missing" in result.output.splitlines()
    assert result.output.splitlines()[-1].startswith("FAILED (")


def test_console_scripts_installed():
    result = console("elr-ingest", "--version")
    assert result.returncode == 0 and result.stdout == "elr-ingest, version 0.1.0\n"
    for script, example in (("elr-eval", "elr-eval run --checkpoint runs/elr/last.pt"),
                            ("elr-train", "elr-train --nproc 4 --shards data/HMDB51-shards")):
        result = console(script, "--help")
        assert result.returncode == 0 and example in result.stdout, script


def test_extract_features_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "splits").mkdir()
    base = ("elr-ingest", "extract-features", tmp_path / "videos", "--splits", tmp_path / "splits", "--out", tmp_path / "out")
    cases = {
        (): "Error: give --c3d-weights FILE (the Sports-1M C3D, c3d.pickle) or, for tests and demos only, --random-c3d SEED",
        ("--random-c3d", 0, "--pool5", "torch"):
            "Error: Invalid value for '--pool5': 'torch' is not one of 'caffe', 'port'.",
        ("--random-c3d", 0, "--lr-size", "12by16"):
            "Error: Invalid value for '--lr-size': '12by16' is not a frame size HxW (e.g. 12x16: 12 rows, 16 columns)",
        ("--c3d-weights", tmp_path / "c3d.pickle"):
            f"Error: {tmp_path / 'splits'}: no split files for split 1 (expected <class>_test_split1.txt, as in "
            "HMDB51's testTrainMulti_7030_splits)",
    }
    for extra, message in cases.items():  # in-process: the same error boundary as the console script
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in (*base[1:], *extra)])
        assert exit_info.value.code in (1, 2)
        assert capsys.readouterr().err.strip() == message
