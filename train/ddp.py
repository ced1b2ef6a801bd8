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
import os
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from elr.checkpoint import load_checkpoint, save_checkpoint
    from elr.data import TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, auto_workers, batches
    from elr.data import input_fields, padded_units
    from elr.metrics import plot_curves, write_metrics
    from elr.model import TwoStreamGRU, autocast, export_seed_state_dict, model_inputs, score_batches
    from shards.cli import exit_on_error, run_command_line
    from shards.memory import long_lived_frozen
    from shards.progress import Progress
    from shards.schema import LR
    from shards.shardset import ShardSet
    from train.config import TrainConfig, command_help, config_options
    from train.launch import guarded, launch_local
    from train.startup import Setup, agree, claim_run_folder, launch_id, preflight, resume_decision, setup_process
    from train.startup import train_phases
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    sys.exit(f"Error: cannot import {e.name!r}: install the project first (bash scripts/setup.sh, or pip install -e .)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- one epoch --------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """An epoch's accumulators; checkpointed mid-epoch, so a resumed epoch reports the uninterrupted metrics."""
    loss_sum: float = 0.0  # sum of loss x sequences, over all ranks (summed at checkpoints and epoch ends)
    real_units: float = 0.0  # units of the steps' videos, over all ranks
    padded_units: float = 0.0  # units the same micro-batches padded to their longest video would hold
    seqs: int = 0  # sequences of the epoch's global batches (ranks may hold unequal shares of a step)
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
    shard_set: ShardSet
    global_step: int = 0
    history: list = field(default_factory=list)
    run: dict = field(default_factory=dict)
    steps: StepLoader | None = None  # one for the run: its loader workers live across epochs

    def state(self, epoch: int, step: int, stats: EpochStats) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "global_step": self.global_step,
                "rng": torch.get_rng_state(), "config": asdict(self.cfg), "classes": self.shard_set.classes,
                "run": self.run, "manifest_sha256": self.shard_set.digest, "stats": asdict(stats),
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
        samples_log = None
        if cfg.log_samples:  # line-buffered: a killed run's log ends at a whole step
            samples_log = open(os.path.join(cfg.out, f"samples-rank{setup.rank}.jsonl"), "a", buffering=1)
        for group, batch in DevicePrefetcher(steps, inputs, setup.device):
            stats.wait += time.perf_counter() - t_fetch
            with ctx:  # the merged batch is this step's own: normalised in place
                logits = self.ddp_model(*model_inputs(batch["lengths"], batch["rgb"], batch["flow"]))
            loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            # the mean over the global batch: DDP averages the ranks' gradients, and ranks may hold
            # unequal shares of it (streams that the world size does not divide)
            loss = loss_sum * (setup.world / cfg.batch_size)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            n, step = len(batch["labels"]), group[0]["step"]
            sums[0] += loss_sum.detach()
            if samples_log:
                samples_log.write("".join(json.dumps({"epoch": epoch, "step": step, "stream": mb["stream"],
                                                      "keys": mb["keys"], "rank": setup.rank, "world": setup.world})
                                          + "\n" for mb in group))
            real, padded = padded_units(group)
            sums[1] += real
            sums[2] += padded
            stats.seqs, stats.steps = stats.seqs + cfg.batch_size, stats.steps + 1
            bar.update(1)
            if stats.steps % 10 == 0 and not bar.disable:  # one loss.item() per log interval
                bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}", seq_s=f"{stats.seqs / (time.perf_counter() - t0):.0f}")
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
        if samples_log:
            samples_log.close()
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
        samples = self.shard_set.phase(self.cfg.split, "Test").samples(setup.rank, setup.world, LR, fmt="webdataset")
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
    shard_set = preflight(cfg)
    setup = setup_process(cfg)
    with ExitStack() as held:  # the run folder: released on the way out, removed if the run failed in it

        def decide():
            if setup.master and not folder_held:
                held.enter_context(claim_run_folder(cfg))
            return resume_decision(cfg, shard_set.digest, setup.restart)

        action, message = agree(setup, decide)
        return run_training(cfg, setup, shard_set, action, message)


def run_training(cfg: TrainConfig, setup: Setup, shard_set: ShardSet, action: str, message: str | None) -> dict:
    if message and setup.master:
        log(message)

    # ---- data: one plan for every rank, from the manifest alone
    classes, dim = shard_set.classes, shard_set.dim
    plan = StreamPlan(shard_set.tar_shards(cfg.split, train_phases(shard_set, cfg)),
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
    trainer = Trainer(cfg, setup, model, ddp_model, optimizer, scaler, dataset, shard_set)
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
    return {"epoch": epoch + 1, "step": trainer.global_step, "train_loss": stats.loss_sum / max(stats.seqs, 1),
            "samples_per_s": stats.seqs / max(stats.elapsed, 1e-9),
            "padding": 1 - stats.real_units / max(stats.padded_units, 1),
            "data_wait": stats.wait / max(stats.elapsed, 1e-9), "test_acc": None,
            "chance": 1 / len(trainer.shard_set.classes)}


# ---- the command line (launching: train/launch.py) -------------------------------------------


def _worker(config: dict):
    cfg = TrainConfig(**config)
    return exit_on_error(lambda: guarded(functools.partial(train, folder_held=True), cfg))


@click.command("elr-train", help=command_help(__doc__),
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
def cli(**options):
    try:  # checked before any work: a bad value is a usage mistake (exit 2)
        cfg = TrainConfig(**options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    launch = cfg.nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1
    result = guarded(functools.partial(launch_local, worker=_worker) if launch else train, cfg)
    if int(os.environ.get("RANK", 0)) == 0 and result.get("test_acc") is not None:
        print(json.dumps({"test_acc": result["test_acc"], "epoch": result.get("epoch")}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun train/ddp.py -- --nproc 4` passes the separator on
        argv = argv[1:]
    run_command_line(cli, argv, prog_name="elr-train")  # also when run as train/ddp.py or under torchrun


if __name__ == "__main__":
    main()
