"""Train the coupled two-stream GRU on eLR shards: DDP on any number of processes, mixed precision, resumable.

    torchrun --nproc-per-node 4 train/ddp.py --shards data/HMDB51-shards
    torchrun train/ddp.py --nprocs 4           # starts 4 local workers itself (or: torchrun train/ddp.py -- --nproc 4)
    python train/ddp.py --nproc 2 --epochs 5   # same, without torchrun

Defaults mirror the seed: RMSprop, lr 1e-3, global batch 256 sequences, 50 epochs, training on Train
and Validation (every video as an LR and an HR sequence through the same weights), testing on Test LR.
"""

import argparse
import inspect
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script too

from elr.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from elr.data import LR, TRAIN_INPUTS, DevicePrefetcher, ShardStream, StepLoader, StreamPlan, auto_workers  # noqa: E402
from elr.data import input_fields, iter_eval_batches, load_manifest, padding_fraction, phase_shards  # noqa: E402
from elr.metrics import append_metrics, plot_curves, read_metrics  # noqa: E402
from elr.model import AMP, TwoStreamGRU, autocast, export_seed_state_dict, model_inputs  # noqa: E402
from shards.memory import keep_freed_memory  # noqa: E402


@dataclass
class TrainConfig:
    shards: str = "data/HMDB51-shards"  # shard set: a folder or an http(s) URL
    split: str = "Split1"  # which Split* of the shard set
    out: str = "runs/elr"  # checkpoints, metrics.jsonl, curves.png
    epochs: int = 50  # as the seed
    batch_size: int = 256  # global sequences per step; with lr+hr each video gives two
    lr: float = 1e-3  # RMSprop, as the seed
    hidden: int = 512  # GRU hidden size, as the seed
    train_on: str = "lr+hr"  # lr+hr (coupled, the paper), lr or hr
    amp: str = "off"  # bf16 | fp16 | off
    test_every: int = 5  # test on Test LR every N epochs, and after the last
    data_streams: int = 8  # virtual data streams; a multiple of the number of processes
    shuffle_buffer: int = 256  # videos per length-bucketing shuffle window
    workers: int = -1  # DataLoader worker processes per rank; -1: 2 on CUDA, 0 on CPU (the cores compute there)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    max_steps: int = 0  # stop after N steps in all (0: no limit); for smoke tests and benchmarks
    seed: int = 0  # initial weights and the data order of every epoch
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False  # continue from <out>/last.pt
    export_seed: bool = False  # also write the seed's state_dict-epoch-N.pth at test epochs
    progress: bool = True  # a progress bar on rank 0
    nproc: int = 1  # start this many local workers (when not already launched by torchrun with more)
    max_restarts: int = 0  # with --nproc: restart failed workers from the last checkpoint

    def __post_init__(self):
        if self.train_on not in TRAIN_INPUTS:
            raise ValueError(f"train_on must be one of {sorted(TRAIN_INPUTS)}, got {self.train_on!r}")
        if self.workers < -1:
            raise ValueError(f"workers must be >= 0, or -1 for automatic, got {self.workers}")
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {sorted(AMP)}, got {self.amp!r}")
        per_video = len(TRAIN_INPUTS[self.train_on]["rgb"])
        if self.batch_size % (per_video * self.data_streams):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of data_streams x sequences per "
                             f"video ({self.data_streams} x {per_video})")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // len(TRAIN_INPUTS[self.train_on]["rgb"]) // self.data_streams


def field_help() -> dict:
    """Each TrainConfig field's trailing comment: the config and --help share one text."""
    return dict(re.findall(r"^ +(\w+): \w+ = .*?  # (.*)$", inspect.getsource(TrainConfig), re.M))


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "nproc":  # torchrun's own parser rejects `--nproc` (an abbreviation of its --nproc-per-node)
            flags.append("--nprocs")  # but passes `--nprocs`, and `-- --nproc N`
        text = f"{helps.get(f.name, '')} (default: %(default)s)".strip()
        if f.type is bool or isinstance(f.default, bool):
            ap.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                            help=helps.get(f.name))
        else:
            ap.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default, help=text)
    try:
        return TrainConfig(**vars(ap.parse_args(argv)))
    except ValueError as e:
        ap.error(str(e))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(model, shards, rank, world, device, ctx, batch=64) -> tuple:
    """(correct, total) on LR sequences of the test shards, summed over ranks."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in iter_eval_batches(shards, rank, world, LR, batch):
            with ctx:
                logits = model(*model_inputs(b["lengths"], b["lr_rgb"].to(device), b["lr_flow"].to(device)))
            correct += int((logits.argmax(1).cpu() == b["labels"]).sum())
            total += len(b["labels"])
    model.train()
    counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def train(cfg: TrainConfig) -> dict:
    # ---- setup: rank, device, precision
    keep_freed_memory()  # every step's batches reuse memory (and loader workers forked from here)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    loader_workers = cfg.workers if cfg.workers >= 0 else auto_workers(device)
    if use_cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores (torchrun's CLI does this too)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if world > 1:
        # After a restart the workers share the launcher's store with the dead round's keys: a prefix
        # per round keeps a rank from connecting to a peer address of the previous round.
        store, _, _ = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"elr-round-{restart}", store),
                                rank=rank, world_size=world)
    master = rank == 0
    ctx = autocast(device.type, cfg.amp)
    restarted = restart > 0
    last_path = os.path.join(cfg.out, "last.pt")
    resume = (cfg.resume or restarted) and os.path.exists(last_path)
    if master and not resume and os.path.exists(last_path):
        raise SystemExit(f"error: {last_path} exists; pass --resume to continue that run or choose another --out")

    # ---- data: one plan for every rank, from the manifest alone
    manifest = load_manifest(cfg.shards)
    classes, dim = manifest["classes"], manifest["dim"]
    train_shards = phase_shards(manifest, cfg.shards, cfg.split, ("Train", "Validation"))
    test_shards = phase_shards(manifest, cfg.shards, cfg.split, ("Test",))
    plan = StreamPlan(train_shards, cfg.data_streams, cfg.micro_batch)
    inputs = TRAIN_INPUTS[cfg.train_on]
    fields_needed = input_fields(inputs)
    dataset = ShardStream(plan, rank, world, fields_needed, cfg.seed, cfg.shuffle_buffer)

    # ---- model and optimiser (same seed on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    model = TwoStreamGRU(dim, cfg.hidden, len(classes)).to(device)
    ddp_model = DDP(model, device_ids=[device.index] if use_cuda else None) if world > 1 else model
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, start_step, global_step = 0, 0, 0
    if resume:
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
    if master:
        resolved = {**asdict(cfg), "world_size": world, "device": str(device), "classes": len(classes), "dim": dim,
                    "train_videos": plan.n_samples, "steps_per_epoch": plan.steps_per_epoch,
                    "micro_batch": cfg.micro_batch, "loader_workers": loader_workers,
                    "resumed_at": [start_epoch, start_step] if resume else None}
        log("config " + json.dumps(resolved, sort_keys=True))
        os.makedirs(cfg.out, exist_ok=True)

    def checkpoint(epoch, step, name="last.pt"):
        if master:
            save_checkpoint(os.path.join(cfg.out, name), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "global_step": global_step, "rng": torch.get_rng_state(),
                "config": json.loads(json.dumps(asdict(cfg))), "classes": classes})

    # ---- loop
    result = {"test_acc": None}
    for epoch in range(start_epoch, cfg.epochs):
        dataset.set_position(epoch, start_step if epoch == start_epoch else 0)
        steps = StepLoader(dataset, loader_workers, pin_memory=use_cuda)
        bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (master and cfg.progress),
                   file=sys.stderr, leave=False)
        loss_sum, seqs, pad_sum, n_steps, wait, t0 = 0.0, 0, 0.0, 0, 0.0, time.perf_counter()
        t_fetch = time.perf_counter()
        stopped = False
        for group, batch in DevicePrefetcher(steps, inputs, device):
            wait += time.perf_counter() - t_fetch
            step = group[0]["step"]
            lengths, labels = batch["lengths"], batch["labels"]
            with ctx:  # the merged batch is this step's own: normalised in place
                logits = ddp_model(*model_inputs(lengths, batch["rgb"], batch["flow"]))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            loss_sum, seqs, n_steps = loss_sum + loss.item() * len(labels), seqs + len(labels), n_steps + 1
            pad_sum += padding_fraction(group)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                checkpoint(epoch, step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", seq_s=f"{seqs * world / (time.perf_counter() - t0):.0f}")
            if cfg.max_steps and global_step >= cfg.max_steps:
                stopped = True
                break
            t_fetch = time.perf_counter()
        bar.close()
        elapsed = time.perf_counter() - t0
        if stopped and step + 1 < plan.steps_per_epoch:
            checkpoint(epoch, step + 1)
            break
        checkpoint(epoch + 1, 0)
        record = {"epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / max(seqs, 1),
                  "samples_per_s": seqs * world / elapsed, "padding": pad_sum / max(n_steps, 1),
                  "data_wait": wait / elapsed, "test_acc": None, "chance": 1 / len(classes)}
        if (epoch + 1) % cfg.test_every == 0 or epoch + 1 == cfg.epochs:
            correct, total = evaluate(model, test_shards, rank, world, device, ctx)
            record["test_acc"] = result["test_acc"] = correct / total
            if cfg.export_seed and master:
                export_seed_state_dict(model, os.path.join(cfg.out, f"state_dict-epoch-{epoch + 1}.pth"))
        if master:
            append_metrics(os.path.join(cfg.out, "metrics.jsonl"), record)
            plot_curves(read_metrics(os.path.join(cfg.out, "metrics.jsonl")), os.path.join(cfg.out, "curves.png"))
            acc = "" if record["test_acc"] is None else f"  LR test acc {100 * record['test_acc']:.1f}%"
            log(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  {record['samples_per_s']:.0f} seq/s  "
                f"padding {100 * record['padding']:.1f}%  data wait {100 * record['data_wait']:.1f}%{acc}")
        result.update(record)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _worker(config: dict):
    return train(TrainConfig(**config))


def launch_local(cfg: TrainConfig):
    """Start cfg.nproc workers on this machine with torch's elastic launcher (what torchrun uses)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
                "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(var, None)  # a torchrun parent's own single-process values must not leak into the workers
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=f"elr-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=cfg.max_restarts,
                          monitor_interval=0.2, start_method="spawn")
    config = asdict(cfg) | {"nproc": 1}
    results = elastic_launch(launch, _worker)(config)
    return results[0]


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        result = launch_local(cfg)
    else:
        result = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0 and result.get("test_acc") is not None:
        print(json.dumps({"test_acc": result["test_acc"], "epoch": result.get("epoch")}))


if __name__ == "__main__":
    main()
