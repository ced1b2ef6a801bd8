"""Starting a run's processes and reporting their errors: --nproc N workers through torch's elastic
launcher (what torchrun uses), and one error line per launch on each machine."""

import logging
import os
import uuid
from dataclasses import asdict

import click
import torch.distributed as dist

from shards.cli import Reported, call

from .config import TrainConfig
from .startup import claim_run_folder, preflight, resume_decision


def first_to_fail() -> bool:
    """Whether this worker is the first of its launch on this machine to report an error (torchrun and
    --nproc give the workers of one attempt a common log folder): ranks that fail together, each
    on its own shard of a dead server, say, print one line between them."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return True  # not under a launcher
    try:
        os.close(os.open(os.path.join(os.path.dirname(os.path.dirname(error_file)), "elr-error-reported"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True


def guarded(fn, cfg: TrainConfig):
    """fn(cfg) inside the project's error boundary (shards.cli.call), printed once per launch on each
    machine: a rank stopped by another rank's failure says nothing where that one says why."""
    try:
        return call(fn, cfg)
    except dist.DistError:  # a collective broke: another rank failed
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise Reported() from None
        raise click.ClickException(f"rank {os.environ.get('RANK', 0)}: stopped because another process of the "
                                   "run failed") from None
    except click.ClickException:
        if not first_to_fail():
            raise Reported() from None
        raise


def launch_local(cfg: TrainConfig, worker):
    """Start cfg.nproc processes of `worker(asdict(cfg))` on this machine with torch's elastic launcher
    (what torchrun uses); returns rank 0's result."""
    with claim_run_folder(cfg):  # held here for every worker and restart round
        return _launch(cfg, worker)


def _launch(cfg: TrainConfig, worker):
    resume_decision(cfg, preflight(cfg).digest, restart=0)  # a mistake is reported once, here
    return elastic_run(cfg.nproc, cfg.max_restarts, worker, asdict(cfg), "training")


def elastic_run(nproc: int, max_restarts: int, worker, payload, what: str):
    """worker(payload) in `nproc` local processes started by torch's elastic launcher (what torchrun
    uses); rank 0's result. A worker that printed its Error line exits 1: nothing more is said."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
                "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(var, None)  # a torchrun parent's own single-process values must not leak into the workers
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # workers print their own errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"elr-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                          monitor_interval=0.2, start_method="spawn")
    try:
        results = elastic_launch(launch, worker)(payload)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {1}:
            raise Reported() from None  # the failed workers printed their Error line
        rank, failure = min(e.failures.items())
        died = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise click.ClickException(f"{what} process of rank {rank} died ({died})") from None
    return results[0]
