"""A training process before its first step: rank, device and process group, the shard set and run
folder checked, and whether it resumes (decided once, by rank 0, for every rank)."""

import os
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from elr.checkpoint import CheckpointError, load_checkpoint
from elr.model import resolve_device
from shards.errors import ELRError
from shards.lock import OutputFolder
from shards.memory import keep_freed_memory
from shards.cache import ShardCache
from shards.shardset import ShardSet

from .config import LEGACY, TRAJECTORY, TrainConfig, check_same_trajectory


@dataclass
class Setup:
    rank: int
    world: int
    device: torch.device
    restart: int  # torchelastic restart round (0: the first)

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_process(cfg: TrainConfig) -> Setup:
    """Rank, device and process group, from the environment torchrun (or launch_local) sets."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > cfg.data_streams:
        raise ValueError(f"{world} processes for --data-streams {cfg.data_streams}: each process reads whole streams, "
                         f"so at most {cfg.data_streams} can share them")
    return start_process(cfg.device)


def start_process(device_option: str) -> Setup:
    """This process's rank and device (a GPU of its own, or its share of the CPU's cores), and the
    process group (NCCL on GPUs, gloo on the CPU) when there are several."""
    keep_freed_memory()  # every step's batches reuse memory (and loader workers forked from here)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_option, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores (torchrun's CLI does this too)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if world > 1:
        # After a restart the workers share the launcher's store with the dead round's keys: a prefix
        # per round keeps a rank from connecting to a peer address of the previous round.
        store, _, _ = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"elr-round-{restart}", store), rank=rank, world_size=world)
    return Setup(rank, world, device, restart)


def preflight(cfg: TrainConfig) -> ShardSet:
    """Everything a user can get wrong, checked before any work: the shard set, its split, its shards,
    the run folder."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ELRError(f"--out {cfg.out}: is a file, not a folder")
    cache = ShardCache.from_options(cfg.cache_dir, cfg.cache_limit)
    shard_set = ShardSet.open(cfg.shards, cache=cache)  # a rank reads no sample table (shards.manifest)
    if cfg.split not in shard_set.splits:
        raise ELRError(f"--split {cfg.split}: not in the shard set {cfg.shards} (it has {', '.join(shard_set.splits)})")
    phases = shard_set.phases(cfg.split)
    missing = [p for p in ("Train", "Test") if p not in phases or not shard_set.phase(cfg.split, p).has_tar]
    if missing:
        raise ELRError(f"--shards {cfg.shards}: {cfg.split} has no tar shards for {', '.join(missing)}")
    read = train_phases(shard_set, cfg) + ["Test"]
    shard_set.check_local_shards(cfg.split, read)
    if shard_set.cache is not None:  # every stream of the machine reads a shard and downloads the next
        shard_set.cache.check_room([s.bytes for s in shard_set.tar_shards(cfg.split, read)], 2 * cfg.data_streams)
    return shard_set


def claim_run_folder(cfg: TrainConfig) -> OutputFolder:
    """--out for this run alone (shards.lock), created now rather than at the first checkpoint an epoch
    later; a failed run removes it again unless it holds a checkpoint to resume from."""
    folder = OutputFolder(cfg.out, "elr-train", keep=("last.pt",))
    try:
        return folder.claim()
    except OSError as e:
        raise ELRError(f"--out {cfg.out}: cannot create the run folder ({e.strerror})") from None


def train_phases(shard_set: ShardSet, cfg: TrainConfig) -> list:
    """Train and Validation, as the seed trains (Validation where the set has one)."""
    return [p for p in ("Train", "Validation") if p in shard_set.phases(cfg.split)]


def launch_id() -> str:
    """Identifies one launch across its restart rounds: torchrun's --rdzv-id, else the launcher process."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id != "none" else f"{socket.gethostname()}:{os.getppid()}"


def resume_decision(cfg: TrainConfig, digest: str, restart: int) -> tuple:
    """("fresh" | "resume", message or None) for this run folder; a mismatch raises CheckpointError.

    A run restarted by --max-restarts resumes only the checkpoint its own launch wrote."""
    path = os.path.join(cfg.out, "last.pt")
    if not os.path.exists(path):
        return "fresh", (f"--resume: no {path} yet; starting a new run" if cfg.resume else None)
    if not cfg.resume and restart == 0:
        raise CheckpointError(f"{path} exists; pass --resume to continue that run or choose another --out")
    state = load_checkpoint(path)
    missing = [k for k in ("model", "run", "manifest_sha256", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a train/ddp.py checkpoint of this version (no {', '.join(missing)})")
    if not cfg.resume and state["run"]["launch"] != launch_id():
        raise CheckpointError(f"{path} belongs to another run ({state['run']['id']}); pass --resume to continue "
                              "it or choose another --out")
    if state["manifest_sha256"] != digest:
        raise CheckpointError(f"--resume: {path} was trained on another shard set (manifest sha256 "
                              f"{state['manifest_sha256'][:12]}, --shards {cfg.shards} has {digest[:12]})")
    old, new = state["config"], asdict(cfg)
    check_same_trajectory(path, {k: old.get(k, LEGACY.get(k)) for k in TRAJECTORY}, new, TRAJECTORY)
    return "resume", None


def agree(setup: Setup, decide):
    """Rank 0 calls decide(); every rank gets its result, or raises the same error."""
    outcome = [None]
    if setup.master:
        try:
            outcome = [("ok", decide())]
        except ELRError as e:
            outcome = [("error", type(e), str(e))]
    if setup.world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        raise outcome[0][1](outcome[0][2])
    return outcome[0][1]
