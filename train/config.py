"""elr-train's options: one TrainConfig field per flag (its help text with it), checked before any work."""

import math
from dataclasses import dataclass, field, fields

import click

from elr.data import TRAIN_INPUTS
from elr.model import AMP, DEVICES, check_device


def option(default, help: str, *flags: str):
    """A config field with its --help text (and extra flag spellings)."""
    return field(default=default, metadata={"help": help, "flags": flags})


@dataclass
class TrainConfig:
    shards: str = option("data/HMDB51-shards", "shard set: a folder or any fsspec URL (http(s)://, s3://, gs://)")
    split: str = option("Split1", "which Split* of the shard set")
    cache_dir: str = option("", "for a remote --shards: download each shard once into this local folder and read it "
                            "there (every rank and loader worker of the machine shares it; also ELR_CACHE_DIR)")
    cache_limit: str = option("", "the cache's size, e.g. 200GB or 500MiB (also ELR_CACHE_LIMIT): least recently "
                              "used shards are evicted past it")
    out: str = option("runs/elr", "run folder: last.pt, metrics.jsonl, curves.png")
    epochs: int = option(50, "epochs in all (a resumed run may raise it), as the seed")
    batch_size: int = option(256, "global sequences per step; with lr+hr each video gives two")
    lr: float = option(1e-3, "RMSprop learning rate, as the seed")
    hidden: int = option(512, "GRU hidden size, as the seed")
    train_on: str = option("lr+hr", "lr+hr (coupled, the paper), lr or hr")
    amp: str = option("off", "mixed precision of the GRUs: bf16 | fp16 | off (the classifier stays float32)")
    test_every: int = option(5, "test on Test LR every N epochs, and after the last")
    data_streams: int = option(8, "virtual data streams: the data order, whatever the number of processes "
                               "(at most this many; a run resumes on any number up to it)")
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
    log_samples: bool = option(False, "write the videos of every step to <out>/samples-rank<R>.jsonl (epoch, step, "
                               "stream, keys): what each rank actually read")
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
        need(self.nproc <= self.data_streams,
             f"--nproc ({self.nproc}) must be at most --data-streams ({self.data_streams}): each process reads whole streams")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // len(TRAIN_INPUTS[self.train_on]["rgb"]) // self.data_streams


# Options that shape the weights: a resumed run must have the same ones as the run it continues.
TRAJECTORY = ("split", "batch_size", "lr", "hidden", "train_on", "amp", "data_streams", "shuffle_buffer",
              "length_bucketing", "seed")


LEGACY = {"length_bucketing": True}  # what a checkpoint written before the option existed was trained with


def flag(name: str) -> str:
    return name.replace("_", "-")


def check_same_trajectory(path: str, old: dict, new: dict, keys) -> None:
    """--resume: the options in `keys` that shape the weights must be those `path` was trained with;
    else one CheckpointError naming each that differs, both ways."""
    from elr.checkpoint import CheckpointError

    differs = [k for k in keys if old[k] != new[k]]
    if differs:
        raise CheckpointError(f"--resume: {path} was trained with " + ", ".join(f"--{flag(k)} {old[k]}" for k in differs)
                              + "; this run has " + ", ".join(f"--{flag(k)} {new[k]}" for k in differs)
                              + " (use the same options, or another --out)")


def command_help(doc: str) -> str:
    """A module docstring as a command's --help: its "examples:" block kept as written (click rewraps
    every paragraph not marked with \\b)."""
    return doc.replace("\nexamples:\n", "\n\b\nexamples:\n", 1)


def config_options(command, config=None):
    """A click option for every field of `config` (a dataclass made of option() fields; TrainConfig by
    default), with its help and extra spellings."""
    for f in reversed(fields(config or TrainConfig)):
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
