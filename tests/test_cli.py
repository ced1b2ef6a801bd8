"""elr-ingest wiring: options reach the library, errors are one line, exit codes are right."""

import json
import subprocess
import sys

from click.testing import CliRunner

from ingest.cli import main
from shards.manifest import read_manifest


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_has_examples():
    for cmd in ("build-shards", "verify", "info", "make-demo"):
        result = run(cmd, "--help")
        assert result.exit_code == 0 and "Example" in result.output, cmd


def test_make_demo_build_verify_info_via_scheduler(tmp_path, dask_client):
    root = tmp_path / "HMDB51"
    assert run("make-demo", root, "--classes", 4, "--videos-per-class", 2, "--dim", 8).exit_code == 0
    result = run("build-shards", root, "--scheduler", dask_client.scheduler.address, "--format", "webdataset",
                 "--shard-size", "2KB", "--dtype", "float16", "-q")
    assert result.exit_code == 0, result.output
    m = read_manifest(str(tmp_path / "HMDB51-shards"))
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
    result = run("build-shards", tmp_path, "--shard-size", "lots")
    assert result.exit_code == 1 and "invalid literal" in result.output


def test_file_system_errors_are_one_line_naming_the_path(demo_master, tmp_path, dask_client):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "shards"
    result = run("build-shards", demo_master, "--out", out, "--scheduler", dask_client.scheduler.address, "-q")
    assert result.exit_code == 1
    assert result.output == f"Error: [Errno 20] Not a directory: '{out}.building'\n"


def test_verify_exit_code_and_problem_lines(built, dask_client):
    m = read_manifest(str(built))
    shard = m["splits"]["Split1"]["Test"]["webdataset"]["shards"][2]
    (built / shard["path"]).unlink()
    result = run("verify", built, "--scheduler", dask_client.scheduler.address, "-q")
    assert result.exit_code == 1
    assert f"PROBLEM {shard['path']}: missing" in result.output.splitlines()
    assert result.output.splitlines()[-1].startswith("FAILED (")


def test_console_script_installed():
    result = subprocess.run([sys.executable, "-m", "ingest.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "0.1.0" in result.stdout
