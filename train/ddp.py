"""Train the coupled two-stream GRU on eLR shards: DDP on any number of processes, mixed precision, resumable.

examples:
  elr-train --shards data/HMDB51-shards --out runs/elr        # one process (the same: python train/ddp.py ...)
  elr-train --nproc 4 --shards data/HMDB51-shards             # starts 4 local DDP workers itself
  torchrun --nproc-per-node 4 train/ddp.py --shards s3://bucket/HMDB51-shards
  torchrun train/ddp.py --nprocs 4                            # (torchrun itself rejects a bare --nproc)
  elr-train --out runs/elr --resume                           # continue a killed run, mid-epoch

Defaults mirror the seed: RMSprop, lr 1e-3, global batch 256 sequences, 50 epochs, training on Train
and Validation (every video as an LR and an HR sequence through the same weights), testing on Test LR.
"""

import functools
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from elr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, auto_workers, batches
    from elr.data import input_fields, padded_units, phase_samples, phase_shards
    from elr.metrics import plot_curves, write_metrics
    from elr.model import AMP, DEVICES, TwoStreamGRU, autocast, check_device, export_seed_state_dict, model_inputs
    from elr.model import resolve_device, score_batches
    from shards import remote
    from shards.cli import Reported, call, exit_on_error, run_command_line
    from shards.errors import ELRError, ShardCorruptError
    from shards.lock import OutputFolder
    from shards.manifest import load_manifest, manifest_digest
    from shards.memory import keep_freed_memory, long_lived_frozen
    from shards.progress import Progress
    from shards.schema import LR
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    sys.exit(f"Error: cannot import {e.name!r}: install the project first (bash scripts/setup.sh, or pip install -e .)")


def option(default, help: str, *flags: str):
    """A config field with its --help text (and extra flag spellings)."""
    return field(default=default, metadata={"help": help, "flags": flags})


@dataclass
class TrainConfig:
    shards: str = option("data/HMDB51-shards", "shard set: a folder or any fsspec URL (http(s)://, s3://, gs://)")
    split: str = option("Split1", "which Split* of the shard set")
    out: str = option("runs/elr", "run folder: last.pt, metrics.jsonl, curves.png")
    epochs: int = option(50, "epochs in all (a resumed run may raise it), as the seed")
    batch_size: int = option(256, "global sequences per step; with lr+hr each video gives two")
    lr: float = option(1e-3, "RMSprop learning rate, as the seed")
    hidden: int = option(512, "GRU hidden size, as the seed")
    train_on: str = option("lr+hr", "lr+hr (coupled, the paper), lr or hr")
    amp: str = option("off", "mixed precision of the GRUs: bf16 | fp16 | off (the classifier stays float32)")
    test_every: int = option(5, "test on Test LR every N epochs, and after the last")
    data_streams: int = option(8, "virtual data streams; a multiple of the number of processes")
    shuffle_buffer: int = option(256, "videos per shuffle window, from which micro-batches are cut")
    length_bucketing: bool = option(False, "sort each shuffle window by length before cutting micro-batches "
                                    "(shorter GRU runs per micro-batch; HMDB51's lengths depend on class)")
    loader_workers: int = option(-1, "DataLoader worker processes per rank; -1: 2 on CUDA, 0 on CPU (the cores "
                                 "compute there)", "--workers")
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at epoch ends only)")
    max_steps: int = option(0, "stop after N steps in all (0: no limit); for smoke tests and benchmarks")
    seed: int = option(0, "initial weights and the data order of every epoch")
    device: str = option("auto", f"{' | '.join(DEVICES)} (or cuda:N); auto takes a GPU when there is one")
    resume: bool = option(False, "continue the run in --out from its last.pt (same shard set and options)")
    export_seed: bool = option(False, "also write the seed's state_dict-epoch-N.pth at test epochs")
    quiet: bool = option(False, "no progress bar", "-q")
    nproc: int = option(1, "start this many local workers (when not already launched by torchrun with more)",
                        "--nprocs")
    max_restarts: int = option(0, "with --nproc: restart failed workers from the last checkpoint")

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        for name in ("epochs", "batch_size", "hidden", "test_every", "data_streams", "shuffle_buffer", "nproc"):
            need(getattr(self, name) >= 1, f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "max_steps", "max_restarts"):
            need(getattr(self, name) >= 0, f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        need(self.loader_workers >= -1, f"--loader-workers must be >= 0, or -1 for automatic, got {self.loader_workers}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        need(self.train_on in TRAIN_INPUTS, f"--train-on must be one of {', '.join(TRAIN_INPUTS)}, got {self.train_on!r}")
        need(self.amp in AMP, f"--amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        need(bool(self.shards) and bool(self.out) and bool(self.split), "--shards, --out and --split must not be empty")
        check_device(self.device)
        per_video = len(TRAIN_INPUTS[self.train_on]["rgb"])
        need(self.batch_size % (per_video * self.data_streams) == 0,
             f"--batch-size ({self.batch_size}) must be a multiple of --data-streams x sequences per video "
             f"({self.data_streams} x {per_video})")
        need(self.data_streams % self.nproc == 0,
             f"--data-streams ({self.data_streams}) must be a multiple of --nproc ({self.nproc})")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // len(TRAIN_INPUTS[self.train_on]["rgb"]) // self.data_streams


# Options that shape the weights: a resumed run must have the same ones as the run it continues.
TRAJECTORY = ("split", "batch_size", "lr", "hidden", "train_on", "amp", "data_streams", "shuffle_buffer",
              "length_bucketing", "seed")
LEGACY = {"length_bucketing": True}  # what a checkpoint written before the option existed was trained with


def flag(name: str) -> str:
    return name.replace("_", "-")


def config_options(command):
    """A click option for every TrainConfig field, with its help and extra spellings."""
    for f in reversed(fields(TrainConfig)):
        names = ["--" + flag(f.name), *f.metadata["flags"]]
        if f.name == "quiet":
            command = click.option(*names, f.name, is_flag=True, help=f.metadata["help"])(command)
        elif isinstance(f.default, bool):
            command = click.option(f"--{flag(f.name)}/--no-{flag(f.name)}", f.name, default=f.default,
                                   show_default=True, help=f.metadata["help"])(command)
        else:
            command = click.option(*names, f.name, type=type(f.default), default=f.default, show_default=True,
                                   help=f.metadata["help"])(command)
    return command


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- setup ------------------------------------------------------------------------------------


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
    keep_freed_memory()  # every step's batches reuse memory (and loader workers forked from here)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.data_streams % world:
        raise ValueError(f"--data-streams ({cfg.data_streams}) must be a multiple of the number of processes ({world})")
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


def preflight(cfg: TrainConfig) -> dict:
    """Everything a user can get wrong, checked before any work: the shard set, its split, its shards,
    the run folder. Returns the manifest."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ELRError(f"--out {cfg.out}: is a file, not a folder")
    manifest = load_manifest(cfg.shards, samples=False)  # a rank reads no sample table (shards.manifest)
    if cfg.split not in manifest["splits"]:
        raise ELRError(f"--split {cfg.split}: not in the shard set {cfg.shards} (it has {', '.join(manifest['splits'])})")
    phases = manifest["splits"][cfg.split]
    missing = [p for p in ("Train", "Test") if p not in phases or "webdataset" not in phases[p]]
    if missing:
        raise ELRError(f"--shards {cfg.shards}: {cfg.split} has no tar shards for {', '.join(missing)}")
    if not remote.is_url(cfg.shards):
        for shard in phase_shards(manifest, cfg.shards, cfg.split, train_phases(manifest, cfg) + ["Test"]):
            if not os.path.isfile(shard.url):
                raise ShardCorruptError(f"{shard.url}: missing (the manifest lists it; run elr-ingest verify)")
            if os.path.getsize(shard.url) != shard.bytes:
                raise ShardCorruptError(f"{shard.url}: {os.path.getsize(shard.url)} bytes, the manifest says "
                                        f"{shard.bytes} (truncated or replaced; run elr-ingest verify)")
    return manifest


def claim_run_folder(cfg: TrainConfig) -> OutputFolder:
    """--out for this run alone (shards.lock), created now rather than at the first checkpoint an epoch
    later; a failed run removes it again unless it holds a checkpoint to resume from."""
    folder = OutputFolder(cfg.out, "elr-train", keep=("last.pt",))
    try:
        return folder.claim()
    except OSError as e:
        raise ELRError(f"--out {cfg.out}: cannot create the run folder ({e.strerror})") from None


def train_phases(manifest: dict, cfg: TrainConfig) -> list:
    """Train and Validation, as the seed trains (Validation where the set has one)."""
    return [p for p in ("Train", "Validation") if p in manifest["splits"][cfg.split]]


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
    old = {k: old.get(k, LEGACY.get(k)) for k in TRAJECTORY}
    differs = [k for k in TRAJECTORY if old[k] != new[k]]
    if differs:
        raise CheckpointError(f"--resume: {path} was trained with " + ", ".join(f"--{flag(k)} {old[k]}" for k in differs)
                              + "; this run has " + ", ".join(f"--{flag(k)} {new[k]}" for k in differs)
                              + " (use the same options, or another --out)")
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


# ---- one epoch --------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """An epoch's accumulators; checkpointed mid-epoch, so a resumed epoch reports the uninterrupted metrics."""
    loss_sum: float = 0.0  # sum of loss x sequences, over all ranks (summed at checkpoints and epoch ends)
    real_units: float = 0.0  # units of the steps' videos, over all ranks
    padded_units: float = 0.0  # units the same micro-batches padded to their longest video would hold
    seqs: int = 0  # sequences of this rank
    steps: int = 0
    wait: float = 0.0
    elapsed: float = 0.0


@dataclass
class Trainer:
    cfg: TrainConfig
    setup: Setup
    model: TwoStreamGRU
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: ShardStream
    manifest: dict
    global_step: int = 0
    history: list = field(default_factory=list)
    run: dict = field(default_factory=dict)
    steps: StepLoader | None = None  # one for the run: its loader workers live across epochs

    def state(self, epoch: int, step: int, stats: EpochStats) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "global_step": self.global_step,
                "rng": torch.get_rng_state(), "config": asdict(self.cfg), "classes": self.manifest["classes"],
                "run": self.run, "manifest_sha256": manifest_digest(self.manifest), "stats": asdict(stats),
                "history": self.history}

    def checkpoint(self, epoch: int, step: int, stats: EpochStats) -> None:
        if self.setup.master:
            save_checkpoint(os.path.join(self.cfg.out, "last.pt"), self.state(epoch, step, stats))

    def train_epoch(self, epoch: int, start_step: int, stats: EpochStats) -> tuple:
        """Steps start_step.. of `epoch`; returns (stats, whether --max-steps stopped the run).

        stats.steps counts the epoch's steps, those before a resume included."""
        cfg, setup, inputs = self.cfg, self.setup, TRAIN_INPUTS[self.cfg.train_on]
        self.dataset.set_position(epoch, start_step)
        if self.steps is None:
            self.steps = StepLoader(self.dataset, self.loader_workers, pin_memory=setup.device.type == "cuda")
        steps = self.steps
        bar = Progress(total=len(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=cfg.quiet or not setup.master)
        ctx = autocast(setup.device.type, cfg.amp)
        # loss x sequences, real units, padded units since the last fold; on the device: no sync per step
        sums = torch.zeros(3, dtype=torch.float64, device=setup.device)
        t0 = t_fetch = time.perf_counter()
        stopped = False
        for group, batch in DevicePrefetcher(steps, inputs, setup.device):
            stats.wait += time.perf_counter() - t_fetch
            with ctx:  # the merged batch is this step's own: normalised in place
                logits = self.ddp_model(*model_inputs(batch["lengths"], batch["rgb"], batch["flow"]))
            loss = F.cross_entropy(logits.float(), batch["labels"])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            n, step = len(batch["labels"]), group[0]["step"]
            sums[0] += loss.detach() * n
            real, padded = padded_units(group)
            sums[1] += real
            sums[2] += padded
            stats.seqs, stats.steps = stats.seqs + n, stats.steps + 1
            bar.update(1)
            if stats.steps % 10 == 0 and not bar.disable:  # one loss.item() per log interval
                bar.set_postfix(loss=f"{loss.item():.3f}", seq_s=f"{stats.seqs * setup.world / (time.perf_counter() - t0):.0f}")
            stopped = bool(cfg.max_steps and self.global_step >= cfg.max_steps)
            if stopped or (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0):
                self._fold(stats, sums, t0)
                sums.zero_()
                t0 = time.perf_counter()
                if step + 1 < self.dataset.plan.steps_per_epoch:
                    self.checkpoint(epoch, step + 1, stats)
            if stopped:
                break
            t_fetch = time.perf_counter()
        bar.close()
        self._fold(stats, sums, t0)
        return stats, stopped

    def _fold(self, stats: EpochStats, sums: torch.Tensor, t0: float) -> None:
        """Add the steps since the last fold to the stats, summed over ranks (one all-reduce)."""
        if self.setup.world > 1:
            dist.all_reduce(sums)
        loss_sum, real, padded = sums.tolist()
        stats.loss_sum, stats.real_units, stats.padded_units = (stats.loss_sum + loss_sum, stats.real_units + real,
                                                                stats.padded_units + padded)
        stats.elapsed += time.perf_counter() - t0

    @property
    def loader_workers(self) -> int:
        return self.cfg.loader_workers if self.cfg.loader_workers >= 0 else auto_workers(self.setup.device)

    def evaluate(self) -> float:
        """LR top-1 accuracy on the test phase, each rank scoring every world-th shard."""
        setup, model = self.setup, self.model
        counts = torch.zeros(2, dtype=torch.int64, device=setup.device)  # correct, total
        model.eval()
        samples = phase_samples(self.manifest, self.cfg.shards, self.cfg.split, "Test", setup.rank, setup.world,
                                LR, fmt="webdataset")
        for b, logits in score_batches(model, batches(samples, LR, 64), setup.device, self.cfg.amp):
            counts[0] += (logits.argmax(1) == b["labels"].to(setup.device)).sum()
            counts[1] += len(b["labels"])
        model.train()
        if setup.world > 1:
            dist.all_reduce(counts)
        return int(counts[0]) / int(counts[1])


# ---- the run ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, folder_held: bool = False) -> dict:
    """One process's part of a run (rank and world size from the environment); returns the last epoch's record.

    Rank 0 holds --out for the run, unless its launcher does (`folder_held`)."""
    manifest = preflight(cfg)
    setup = setup_process(cfg)
    digest = manifest_digest(manifest)
    folder = []

    def decide():
        if setup.master and not folder_held:
            folder.append(claim_run_folder(cfg))
        return resume_decision(cfg, digest, setup.restart)

    try:
        action, message = agree(setup, decide)
        record = run_training(cfg, setup, manifest, action, message)
    except BaseException:
        if folder:
            folder[0].close(failed=True)
        raise
    if folder:
        folder[0].close(failed=False)
    return record


def run_training(cfg: TrainConfig, setup: Setup, manifest: dict, action: str, message: str | None) -> dict:
    if message and setup.master:
        log(message)

    # ---- data: one plan for every rank, from the manifest alone
    classes, dim = manifest["classes"], manifest["dim"]
    plan = StreamPlan(phase_shards(manifest, cfg.shards, cfg.split, train_phases(manifest, cfg)),
                      cfg.data_streams, cfg.micro_batch)
    dataset = ShardStream(plan, setup.rank, setup.world, input_fields(TRAIN_INPUTS[cfg.train_on]), cfg.seed,
                          cfg.shuffle_buffer, cfg.length_bucketing)

    # ---- model and optimiser (same seed on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    model = TwoStreamGRU(dim, cfg.hidden, len(classes)).to(setup.device)
    ddp_model = model
    if setup.world > 1:
        ddp_model = DDP(model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=cfg.amp == "fp16")
    trainer = Trainer(cfg, setup, model, ddp_model, optimizer, scaler, dataset, manifest)
    start_epoch, start_step, stats = 0, 0, EpochStats()
    if action == "resume":
        state = load_checkpoint(os.path.join(cfg.out, "last.pt"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, start_step, trainer.global_step = state["epoch"], state["step"], state["global_step"]
        stats, trainer.history, trainer.run = EpochStats(**state["stats"]), state["history"], state["run"]
    else:
        trainer.run = agree(setup, lambda: {"id": uuid.uuid4().hex[:12], "launch": launch_id()})
    if setup.master:
        resolved = {**asdict(cfg), "world_size": setup.world, "device": str(setup.device), "classes": len(classes),
                    "dim": dim, "train_videos": plan.n_samples, "steps_per_epoch": plan.steps_per_epoch,
                    "micro_batch": cfg.micro_batch, "loader_workers": trainer.loader_workers, "run": trainer.run["id"],
                    "resumed_at": [start_epoch, start_step] if action == "resume" else None}
        log("config " + json.dumps(resolved, sort_keys=True))

    record = trainer.history[-1] if trainer.history else {"test_acc": None}
    with long_lived_frozen():  # full collections would walk torch's ~170k objects (shards.memory)
        for epoch in range(start_epoch, cfg.epochs):
            stats, stopped = trainer.train_epoch(epoch, start_step, stats)
            if stats.steps < plan.steps_per_epoch:
                break  # --max-steps stopped it mid-epoch: checkpointed where it stopped
            record = epoch_record(cfg, epoch, trainer, stats)
            if (epoch + 1) % cfg.test_every == 0 or epoch + 1 == cfg.epochs or stopped:  # and the run's last epoch
                record["test_acc"] = trainer.evaluate()
                if cfg.export_seed and setup.master:
                    export_seed_state_dict(model, os.path.join(cfg.out, f"state_dict-epoch-{epoch + 1}.pth"))
            trainer.history.append(record)
            start_step, stats = 0, EpochStats()
            trainer.checkpoint(epoch + 1, 0, stats)
            if setup.master:
                write_metrics(os.path.join(cfg.out, "metrics.jsonl"), trainer.history)
                plot_curves(trainer.history, os.path.join(cfg.out, "curves.png"))
                acc = "" if record["test_acc"] is None else f"  LR test acc {100 * record['test_acc']:.1f}%"
                log(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  {record['samples_per_s']:.0f} seq/s  "
                    f"padding {100 * record['padding']:.1f}%  data wait {100 * record['data_wait']:.1f}%{acc}")
            if stopped:
                break
    if setup.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return record


def epoch_record(cfg: TrainConfig, epoch: int, trainer: Trainer, stats: EpochStats) -> dict:
    world = trainer.setup.world
    return {"epoch": epoch + 1, "step": trainer.global_step, "train_loss": stats.loss_sum / max(stats.seqs * world, 1),
            "samples_per_s": stats.seqs * world / max(stats.elapsed, 1e-9),
            "padding": 1 - stats.real_units / max(stats.padded_units, 1),
            "data_wait": stats.wait / max(stats.elapsed, 1e-9), "test_acc": None,
            "chance": 1 / len(trainer.manifest["classes"])}


# ---- launching and the error boundary ---------------------------------------------------------


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


def _worker(config: dict):
    cfg = TrainConfig(**config)
    return exit_on_error(lambda: guarded(functools.partial(train, folder_held=True), cfg))


def launch_local(cfg: TrainConfig):
    """Start cfg.nproc workers on this machine with torch's elastic launcher (what torchrun uses)."""
    with claim_run_folder(cfg):  # held here for every worker and restart round
        return _launch(cfg)


def _launch(cfg: TrainConfig):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    resume_decision(cfg, manifest_digest(preflight(cfg)), restart=0)  # a mistake is reported once, here
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
                "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(var, None)  # a torchrun parent's own single-process values must not leak into the workers
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # workers print their own errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=f"elr-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=cfg.max_restarts,
                          monitor_interval=0.2, start_method="spawn")
    try:
        results = elastic_launch(launch, _worker)(asdict(cfg))
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {1}:
            raise Reported() from None  # the failed workers printed their Error line
        rank, failure = min(e.failures.items())
        died = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise click.ClickException(f"training process of rank {rank} died ({died})") from None
    return results[0]


@click.command("elr-train", help=__doc__.replace("\nexamples:\n", "\n\b\nexamples:\n", 1),
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
def cli(**options):
    try:  # checked before any work: a bad value is a usage mistake (exit 2)
        cfg = TrainConfig(**options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    launch = cfg.nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1
    result = guarded(launch_local if launch else train, cfg)
    if int(os.environ.get("RANK", 0)) == 0 and result.get("test_acc") is not None:
        print(json.dumps({"test_acc": result["test_acc"], "epoch": result.get("epoch")}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun train/ddp.py -- --nproc 4` passes the separator on
        argv = argv[1:]
    run_command_line(cli, argv, prog_name="elr-train")  # also when run as train/ddp.py or under torchrun


if __name__ == "__main__":
    main()
