"""Fine-tune C3D on a clip set (elr-ingest build-clips): the seed's step 2, on any number of processes.

examples:
  elr-train-c3d --clips data/HMDB51-clips --streams hr_rgb,lr_rgb --init c3d.pickle --out runs/c3d-rgb
  elr-train-c3d --clips data/HMDB51-clips --streams hr_flow,lr_flow --init c3d.pickle --out runs/c3d-flow
  elr-train-c3d --nproc 4 --clips data/HMDB51-clips --init c3d.pickle       # 4 local DDP workers
  torchrun --nproc-per-node 8 -m train.c3d --clips ... --init c3d.pickle
  elr-train-c3d --out runs/c3d-rgb --resume ...                              # continue a killed run
  elr-train-c3d --clips s3://bucket/HMDB51-clips --cache-dir /scratch/cache --cache-limit 20GB --init c3d.pickle
  elr-train-c3d --clips demo/clips --random-c3d 0 --crop-size 16 --out runs/demo-c3d   # tests, demos
then:
  elr-ingest extract-features VIDEOS ... --c3d-weights runs/c3d-rgb/best.pt --c3d-flow-weights runs/c3d-flow/best.pt

One network for the streams given: HR and LR clips of a unit pass through the same weights (the
seed's coupling idea) or one stream alone; flow streams get a network of their own. Defaults follow
C3D fine-tuning as commonly run (C3D-v1.0's UCF101 example and its ports): SGD with momentum 0.9,
lr 0.001 (10x for the new layers) divided by 10 every 4 epochs, weight decay 0.005, dropout 0.5 before fc7 and fc8, gradient
norm clipped to 40 (mmaction2's C3D recipe), 30 units a step, random 112x112 crops and horizontal flips; fc8 is new (N(0, 0.01)). Each epoch reports clip
accuracy and video accuracy (softmax averaged over a video's units) on Validation and Test, center
crops; best.pt is the epoch with the best video accuracy on Validation (Test where the set has no
Validation) of the LR stream where it is trained: what extract-features reads.
"""

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from elr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from elr.data.clips import ClipBatches, c3d_input, clip_loader, prefetched
    from elr.metrics import plot_curves, write_metrics
    from elr.model import AMP, DEVICES, check_device
    from ingest.c3d.network import C3D_MEAN_BGR, POOL5, c3d_classifier
    from shards.cli import call, run_command_line
    from shards.cache import ShardCache
    from shards.clips import STREAMS, ClipSet
    from shards.errors import ELRError
    from shards.lock import OutputFolder
    from shards.manifest import manifest_digest
    from shards.progress import Progress
    from train.config import check_same_trajectory, command_help, config_options, flag, option
    from train.launch import elastic_run, guarded
    from train.startup import agree, start_process
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    sys.exit(f"Error: cannot import {e.name!r}: install the project first (bash scripts/setup.sh, or pip install -e .)")


@dataclass
class C3DTrainConfig:
    clips: str = option("data/HMDB51-clips", "clip set (elr-ingest build-clips): a folder or any fsspec URL "
                        "(http(s)://, s3://, gs://; read through --cache-dir)")
    split: str = option("Split1", "which Split* of the clip set")
    cache_dir: str = option("", "for a remote --clips: download every shard once into this local folder before the "
                            "first step (every rank and loader worker of the machine shares it; also ELR_CACHE_DIR)")
    cache_limit: str = option("", "the cache's size, e.g. 20GB (also ELR_CACHE_LIMIT): it must hold the clip set's "
                              "shards of the phases a run reads; least recently used shards of other sets are evicted")
    streams: str = option("hr_rgb,lr_rgb", "streams through the one network: hr_rgb,lr_rgb (RGB, HR and LR coupled), "
                          "hr_flow,lr_flow (flow), or one stream")
    init: str = option("", "Sports-1M C3D state_dict (c3d.pickle): conv1 .. fc7 start from it, fc8 is new")
    random_c3d: int = option(-1, "random C3D weights from this seed instead of --init: tests and demos only")
    crop_size: int = option(0, "C3D input side (0: the clip set's; 112 for the published weights)")
    pool5: str = option("caffe", "pool5 windows: caffe (as the Sports-1M weights were trained) | port")
    out: str = option("runs/c3d", "run folder: last.pt, best.pt, metrics.jsonl, curves.png")
    epochs: int = option(12, "epochs in all (a resumed run may raise it)")
    batch_size: int = option(30, "global units a step (each gives one clip per stream)")
    lr: float = option(0.001, "SGD learning rate at the start")
    lr_step: int = option(4, "divide the learning rate by 10 every N epochs")
    new_lr_mult: float = option(10.0, "learning rate multiplier of the new layers (fc8, and fc7 where the weights "
                                "lack it), as Caffe's fine-tuning examples (lr_mult)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(0.005, "SGD weight decay")
    dropout: float = option(0.5, "dropout before fc7 and fc8, as C3D")
    clip_grad: float = option(40.0, "clip the gradient's norm to this (0: off), as mmaction2's C3D recipe")
    flip: bool = option(True, "random horizontal flips (--no-flip for classes a mirror turns into each other: "
                        "swipe left and swipe right)")
    amp: str = option("auto", "mixed precision: bf16 | fp16 | off | auto (bf16 on a GPU, off on the CPU)")
    device: str = option("auto", f"{' | '.join(DEVICES)} (or cuda:N); auto takes a GPU when there is one")
    loader_workers: int = option(-1, "DataLoader worker processes per rank (decode, crop, flip); -1: 4 on CUDA, "
                                 "1 on the CPU", "--workers")
    eval_batch: int = option(32, "units a rank scores at once when evaluating")
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at epoch ends only)")
    max_steps: int = option(0, "stop after N steps in all (0: no limit); for smoke tests and benchmarks")
    seed: int = option(0, "new layers' weights, the data order, crops, flips and dropout")
    nproc: int = option(1, "start this many local workers (when not launched by torchrun)", "--nprocs")
    resume: bool = option(False, "continue the run in --out from its last.pt (same clip set and options)")
    quiet: bool = option(False, "no progress bar", "-q")

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        for name in ("epochs", "batch_size", "lr_step", "eval_batch", "nproc"):
            need(getattr(self, name) >= 1, f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "max_steps", "crop_size"):
            need(getattr(self, name) >= 0, f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0 and self.new_lr_mult > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0 and 0 <= self.dropout < 1
             and self.clip_grad >= 0, "--lr > 0, --new-lr-mult > 0, --momentum in [0, 1), --weight-decay >= 0, --dropout in [0, 1) and "
             "--clip-grad >= 0 are required")
        unknown = [s for s in self.stream_list if s not in STREAMS]
        need(self.stream_list and not unknown, f"--streams: {','.join(unknown) or 'none'}: choose from {', '.join(STREAMS)}")
        need(len({s.endswith("flow") for s in self.stream_list}) == 1,
             f"--streams {self.streams}: RGB and flow streams need networks of their own (train them in two runs)")
        need((self.init != "") != (self.random_c3d >= 0),
             "give --init c3d.pickle (the Sports-1M C3D) or, for tests and demos only, --random-c3d SEED"
             if not self.init else "--init and --random-c3d exclude each other")
        need(self.pool5 in POOL5, f"--pool5 must be one of {', '.join(POOL5)}, got {self.pool5!r}")
        need(self.amp in (*AMP, "auto"), f"--amp must be bf16, fp16, off or auto, got {self.amp!r}")
        need(self.loader_workers >= -1, f"--loader-workers must be >= 0, or -1 for automatic, got {self.loader_workers}")
        need(self.batch_size % self.nproc == 0, f"--batch-size ({self.batch_size}) must be a multiple of --nproc "
             f"({self.nproc}): every process takes an equal share of a step")
        check_device(self.device)

    @property
    def stream_list(self) -> list:
        return [s.strip() for s in self.streams.split(",") if s.strip()]


# Options that shape the weights: a resumed run must have the same ones as the run it continues.
TRAJECTORY = ("split", "streams", "init", "random_c3d", "crop_size", "pool5", "batch_size", "lr", "lr_step", "new_lr_mult",
              "momentum", "weight_decay", "dropout", "clip_grad", "flip", "amp", "seed")


SHOW_EVERY = 10  # steps between reads of the running loss (each read waits for the device)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What every rank needs to know of the clip set, checked before any process starts."""
    clips: ClipSet  # opened once: every epoch's batches read through it
    classes: list
    frame: tuple  # (H, W) of the stored frames
    set_crop: int  # the crop the clips were stored for (the window cut from the frames)
    crop: int  # the network's input side
    train_units: int
    phases: list  # evaluation phases: Validation (where there is one), Test
    digest: str


def plan_run(cfg: C3DTrainConfig) -> Plan:
    clips = ClipSet(cfg.clips, ShardCache.from_options(cfg.cache_dir, cfg.cache_limit))
    if cfg.split not in clips.manifest["splits"]:
        raise ELRError(f"--split {cfg.split}: not in the clip set {cfg.clips} (it has "
                       f"{', '.join(sorted(clips.manifest['splits']))})")
    phases = clips.phases(cfg.split)
    missing = [p for p in ("Train", "Test") if p not in phases]
    if missing:
        raise ELRError(f"--clips {cfg.clips}: {cfg.split} has no {' or '.join(missing)} clips")
    set_crop = clips.manifest["options"]["side"]
    crop = cfg.crop_size or set_crop
    if crop > set_crop:
        raise ELRError(f"--crop-size {crop} is more than the clip set was built for ({set_crop}): build the clips "
                       f"with elr-ingest build-clips --crop-size {crop}")
    train_units = len(clips.units(cfg.split, "Train"))
    if cfg.batch_size > train_units:
        raise ELRError(f"--batch-size {cfg.batch_size} is more than the {train_units} Train units of {cfg.clips}")
    if cfg.init and not os.path.isfile(cfg.init):
        raise ELRError(f"--init {cfg.init}: no such weights file")
    evaluated = [p for p in ("Validation", "Test") if p in phases]
    clips.check_cache_room(cfg.split, ["Train", *evaluated])  # a remote set's --cache-limit, before any process starts
    return Plan(clips, clips.classes, tuple(clips.clips["size"]), set_crop, crop, train_units, evaluated,
                manifest_digest(clips.manifest))


def resume_state(cfg: C3DTrainConfig, plan: Plan) -> dict | None:
    """The checkpoint to continue (None: a new run); a mismatch is one CheckpointError."""
    path = os.path.join(cfg.out, "last.pt")
    if not os.path.exists(path):
        if cfg.resume:
            log(f"--resume: no {path} yet; starting a new run")
        return None
    if not cfg.resume:
        raise CheckpointError(f"{path} exists; pass --resume to continue that run or choose another --out")
    state = load_checkpoint(path)
    if state.get("kind") != "elr-train-c3d":
        raise CheckpointError(f"{path}: not an elr-train-c3d checkpoint")
    if state["clips_digest"] != plan.digest:
        raise CheckpointError(f"--resume: {path} was trained on another clip set (--clips {cfg.clips} differs)")
    check_same_trajectory(path, state["config"], asdict(cfg), TRAJECTORY)
    return state


# ---- the run --------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """An epoch's accumulators, checkpointed mid-epoch: a resumed epoch reports what the uninterrupted
    one would have."""
    loss_sum: float = 0.0  # loss x clips, over all ranks (summed at checkpoints and the epoch's end)
    correct: float = 0.0  # clips predicted right, over all ranks
    clips: float = 0.0
    wait: float = 0.0  # this rank's seconds waiting for its batches
    seconds: float = 0.0  # this rank's seconds of whole steps

    def add(self, local: list, device) -> None:
        """Every rank's (loss x clips, correct clips, clips) since the last call, into the epoch's."""
        loss_sum, correct, clips = all_sum(local, device)
        self.loss_sum, self.correct, self.clips = self.loss_sum + loss_sum, self.correct + correct, self.clips + clips


def lr_at(cfg: C3DTrainConfig, epoch: int) -> float:
    """The base learning rate of an epoch (0-based): divided by 10 every --lr-step epochs."""
    return cfg.lr * 0.1 ** (epoch // cfg.lr_step)


def amp_dtype(cfg: C3DTrainConfig, device: torch.device):
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    return amp, AMP[amp]


def all_sum(values: list, device) -> list:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate(model, cfg: C3DTrainConfig, plan: Plan, phase: str, rank: int, world: int, device, workers: int,
             amp) -> dict:
    """{stream: {"clip_acc", "video_acc"}} on `phase`, center crops, every unit once over the ranks."""
    data = ClipBatches(plan.clips, cfg.split, phase, cfg.stream_list, plan.set_crop, cfg.eval_batch, train=False,
                       rank=rank, world=world)
    mean = torch.tensor(C3D_MEAN_BGR)
    n_videos, n_classes = len(data.labels), len(plan.classes)
    scores = {s: torch.zeros(n_videos, n_classes, dtype=torch.float64, device=device) for s in cfg.stream_list}
    correct = {s: 0 for s in cfg.stream_list}
    clips = 0
    model.eval()
    with torch.no_grad():
        for batch in clip_loader(data, 0, workers, device.type == "cuda"):
            video, label = batch["video"].to(device), batch["label"].to(device)
            for s in cfg.stream_list:
                x = c3d_input(batch, s, plan.frame, plan.set_crop, plan.crop, mean, device)
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    logits = model(x).float()
                scores[s].index_add_(0, video, F.softmax(logits, 1).double())
                correct[s] += int((logits.argmax(1) == label).sum())
            clips += len(label)
    model.train()
    clips, *right = all_sum([clips, *(correct[s] for s in cfg.stream_list)], device)
    out = {}
    labels = torch.from_numpy(data.labels).to(device)
    for s, n in zip(cfg.stream_list, right):
        if dist.is_initialized():
            dist.all_reduce(scores[s])
        out[s] = {"clip_acc": n / clips, "video_acc": float((scores[s].argmax(1) == labels).double().mean())}
    return out


def checkpoint_meta(cfg: C3DTrainConfig, plan: Plan, model) -> dict:
    """What extract-features needs to run a fine-tuned network as it was trained."""
    return {"crop_size": plan.crop, "pool5": cfg.pool5, "padding_mode": model.padding_mode,
            "classes": plan.classes, "streams": cfg.stream_list}


def run(cfg: C3DTrainConfig) -> dict:
    """One rank of the run (torchrun, --nproc or alone); rank 0's result: the last epoch's record."""
    setup = start_process(cfg.device)
    plan = plan_run(cfg)
    # a remote set: its shards into the machine's cache first (the ranks of a machine share the work)
    plan.clips.download(cfg.split, ["Train", *plan.phases], int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ.get("LOCAL_WORLD_SIZE", 1)), progress=setup.master and not cfg.quiet)
    device = setup.device
    amp_name, amp = amp_dtype(cfg, device)
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (4 if device.type == "cuda" else 1)
    init = None if cfg.random_c3d >= 0 else cfg.init
    model = c3d_classifier(len(plan.classes), plan.crop, cfg.pool5, init, cfg.random_c3d if init is None else cfg.seed,
                           cfg.dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    new = [p for name, p in model.named_parameters() if name.split(".")[0] in model.new_layers]
    loaded = [p for name, p in model.named_parameters() if name.split(".")[0] not in model.new_layers]
    optimizer = torch.optim.SGD([{"params": loaded, "mult": 1.0}, {"params": new, "mult": cfg.new_lr_mult}],
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_name == "fp16")
    state = agree(setup, lambda: resume_state(cfg, plan))  # rank 0 decides; every rank gets the checkpoint
    epoch, step, history, stats, best = 0, 0, [], EpochStats(), None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        stats = EpochStats(**state["stats"])
    net = DDP(model) if setup.world > 1 else model  # after loading: DDP starts every rank from rank 0's weights
    if setup.master:
        log("elr-train-c3d: " + json.dumps({**asdict(cfg), "world": setup.world, "device": str(device), "amp": amp_name,
                                             "crop": plan.crop, "classes": len(plan.classes),
                                             "train_units": plan.train_units, "resumed_at": [epoch, step]}))
    mean = torch.tensor(C3D_MEAN_BGR)
    done_steps = sum(h["steps"] for h in history) + step
    timings = []  # (seconds waiting for the batch, seconds of the whole step, clips) of this invocation's steps
    record = history[-1] if history else {}

    # what the run's reports are about: the LR stream where it is trained (what testing reads)
    chosen = next((s for s in ("lr_rgb", "lr_flow") if s in cfg.stream_list), cfg.stream_list[0])
    select = f"{plan.phases[0].lower()}_{chosen}_video_acc"  # best.pt's measure

    def save_last(epoch_: int, step_: int, stats_: EpochStats):
        if setup.master:
            save_checkpoint(os.path.join(cfg.out, "last.pt"), {
                "kind": "elr-train-c3d", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch_, "step": step_, "stats": asdict(stats_),
                "history": history, "best": best, "config": asdict(cfg), "clips_digest": plan.digest,
                **checkpoint_meta(cfg, plan, model)})

    while epoch < cfg.epochs and not (cfg.max_steps and done_steps >= cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch) * group["mult"]
        data = ClipBatches(plan.clips, cfg.split, "Train", cfg.stream_list, plan.set_crop, cfg.batch_size, cfg.seed,
                           epoch, True, setup.rank, setup.world, cfg.flip, cfg.dropout)
        steps = data.steps()
        # this rank's (loss x clips, correct clips) since the last sum, on the device: read every
        # SHOW_EVERY steps, not each step (a read waits for the GPU to finish the step's work)
        local, local_clips, shown = torch.zeros(2, dtype=torch.float64, device=device), 0, float("nan")
        batches = iter(prefetched(clip_loader(data, step, workers, device.type == "cuda"), device,
                                  ("label", "keep", *cfg.stream_list)))
        with Progress(total=steps, initial=step, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr,
                      leave=False, disable=cfg.quiet or not setup.master) as bar:
            while step < steps and not (cfg.max_steps and done_steps >= cfg.max_steps):
                asked = time.perf_counter()
                batch = next(batches)
                got = time.perf_counter()
                x = torch.cat([c3d_input(batch, s, plan.frame, plan.set_crop, plan.crop, mean, device)
                               for s in cfg.stream_list])
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                y = batch["label"].to(device).repeat(len(cfg.stream_list))
                keep = batch["keep"].to(device).float() / (1 - cfg.dropout) if cfg.dropout else None
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    logits = net(x, keep)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                local[0] += loss.detach().double() * len(y)
                local[1] += (logits.argmax(1) == y).sum()
                local_clips += len(y)
                step += 1
                done_steps += 1
                if shown != shown or step % SHOW_EVERY == 0 or step == steps or done_steps == cfg.max_steps:  # (nan: none yet)
                    shown = float(local[0]) / local_clips  # waits for the GPU: the step's time includes its work
                stats.wait += got - asked
                stats.seconds += time.perf_counter() - asked
                timings.append((got - asked, time.perf_counter() - asked, len(y)))
                bar.update(1)
                rate = (stats.clips + local_clips * setup.world) / max(stats.seconds, 1e-9)  # the epoch's so far
                bar.set_postfix_str(f"loss {shown:.3f}, {rate:.1f} clips/s, data wait {stats.wait / stats.seconds:.0%}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                    stats.add([*local.tolist(), local_clips], device)
                    local, local_clips = torch.zeros_like(local), 0
                    save_last(epoch, step, stats)
        stats.add([*local.tolist(), local_clips], device)
        if step < steps:  # --max-steps stopped mid-epoch
            save_last(epoch, step, stats)
            break
        record = {"epoch": epoch + 1, "steps": steps, "lr": lr_at(cfg, epoch),
                  "train_loss": stats.loss_sum / stats.clips, "train_clip_acc": stats.correct / stats.clips,
                  "clips_per_s": stats.clips / max(stats.seconds, 1e-9),
                  "data_wait": stats.wait / max(stats.seconds, 1e-9), "chance": 1 / len(plan.classes)}
        for phase in plan.phases:
            for s, acc in evaluate(model, cfg, plan, phase, setup.rank, setup.world, device, workers, amp).items():
                record[f"{phase.lower()}_{s}_clip_acc"] = acc["clip_acc"]
                record[f"{phase.lower()}_{s}_video_acc"] = acc["video_acc"]
        record["test_acc"] = record[f"test_{chosen}_video_acc"]  # what curves.png plots
        history.append(record)
        epoch, step, stats = epoch + 1, 0, EpochStats()
        if setup.master:
            if best is None or record[select] > best["value"]:
                best = {"epoch": record["epoch"], "metric": select, "value": record[select]}
                save_checkpoint(os.path.join(cfg.out, "best.pt"), {"model": model.state_dict(), "epoch": record["epoch"],
                                                                   "metric": best, **checkpoint_meta(cfg, plan, model)})
            save_last(epoch, 0, stats)
            write_metrics(os.path.join(cfg.out, "metrics.jsonl"), history)
            plot_curves(history, os.path.join(cfg.out, "curves.png"))
            log(f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, train clip acc {record['train_clip_acc']:.1%}, "
                + ", ".join(f"{p} {chosen} clip {record[f'{p.lower()}_{chosen}_clip_acc']:.1%} video "
                            f"{record[f'{p.lower()}_{chosen}_video_acc']:.1%}" for p in plan.phases)
                + f" (chance {record['chance']:.1%}); {record['clips_per_s']:.1f} clips/s, data wait {record['data_wait']:.0%}")
    if setup.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"record": record, "best": best, "timings": timings}


# ---- the command ----------------------------------------------------------------------------


def worker(payload: dict):
    """One process started by --nproc (picklable: a top-level function of a plain dict)."""
    return guarded(run, C3DTrainConfig(**payload))


def build_cli():
    def command(**options):
        cfg = call(C3DTrainConfig, **options)
        call(plan_run, cfg)  # every mistake before a process starts
        if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise click.ClickException(f"--out {cfg.out}: is a file, not a folder")
        launched = int(os.environ.get("WORLD_SIZE", 1)) > 1  # by torchrun: rank 0 holds the run folder
        holds = not launched or int(os.environ.get("RANK", 0)) == 0
        with (call(OutputFolder(cfg.out, "elr-train-c3d", keep=("last.pt", "best.pt")).claim) if holds else nullcontext()):
            if cfg.nproc > 1 and not launched:
                result = elastic_run(cfg.nproc, 0, worker, asdict(cfg), "training")
            else:
                result = guarded(run, cfg)
        if holds and result and result["best"]:
            best = result["best"]
            click.echo(f"best {best['metric']} {best['value']:.1%} at epoch {best['epoch']}: "
                       f"{os.path.join(cfg.out, 'best.pt')}", err=True)

    return click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
                         help=command_help(__doc__))(config_options(command, C3DTrainConfig))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run_command_line(build_cli(), argv, prog_name="elr-train-c3d")


if __name__ == "__main__":
    main()
