"""The parameter types and shared options of elr-ingest's commands (ingest/cli.py)."""

import click

from shards.remote import is_url


class ByteSize(click.ParamType):
    """'256MB', '1.5GiB', '4096' -> bytes (dask.utils.parse_bytes)."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        from dask.utils import parse_bytes

        if isinstance(value, int):
            return value
        try:
            size = parse_bytes(value)
        except (ValueError, TypeError):
            self.fail(f"{value!r} is not a size (e.g. 256MB, 1.5GB, 64MiB)", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be more than 0 bytes", param, ctx)
        return size


class FrameSize(click.ParamType):
    """'12x16' -> (12, 16): height x width in pixels."""
    name = "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        h, sep, w = str(value).lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            self.fail(f"{value!r} is not a frame size HxW (e.g. 12x16: 12 rows, 16 columns)", param, ctx)
        return int(h), int(w)


class SetLocation(click.ParamType):
    """A shard set or a clip set: a local folder, which must exist, or any fsspec URL (local_only: the
    command reads every byte of it, so a URL is refused with why)."""
    name = "PATH|URL"

    def __init__(self, local_only: str = ""):
        self.local_only = local_only

    def convert(self, value, param, ctx):
        if not is_url(str(value)):
            return click.Path(exists=True, file_okay=False).convert(value, param, ctx)
        if self.local_only:
            self.fail(f"{value}: {self.local_only}", param, ctx)
        return value


POSITIVE, COUNT = click.IntRange(min=1), click.IntRange(min=0)
dask_workers_option = click.option(
    "--dask-workers", "--workers", "workers", type=COUNT, default=0, show_default=True,
    help="Local dask worker processes (0: one per core); ignored with --scheduler.")
scheduler_option = click.option("--scheduler", help="Address of a dask.distributed scheduler, e.g. tcp://head:8786.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
# what extract-features and build-clips share: which videos, and how their flow is computed
SPLITS_HELP = "Folder of HMDB51's split files <class>_test_split<K>.txt (testTrainMulti_7030_splits)."
splits_option = click.option("--splits", "splits_dir", required=True, type=click.Path(exists=True, file_okay=False),
                             help=SPLITS_HELP)
split_option = click.option("--split", default=1, show_default=True, type=click.IntRange(1, 3),
                            help="Which of HMDB51's splits.")
validation_option = click.option(
    "--validation", type=click.Choice(["label0", "none"]), default="label0", show_default=True,
    help="Label-0 videos (unused by the official protocol) become the seed's Validation phase, or are left out.")


def staged_build_options(command):
    """What build-shards and build-clips share (shards.build.staged_build): shuffling, bad input, the
    dask workers, resuming and replacing."""
    for option in reversed((
            click.option("--seed", default=0, show_default=True, help="Shuffles videos across shards."),
            click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
                         help="A bad video stops the build, or is left out and listed in the manifest."),
            dask_workers_option, scheduler_option,
            click.option("--resume", is_flag=True, help="Continue an interrupted build, keeping finished shards."),
            click.option("--overwrite", is_flag=True,
                         help="Replace an existing shard set once the new one is complete."))):
        command = option(command)
    return command


def flow_options(command):
    for option in reversed((
            click.option("--flow", type=click.Choice(["dis", "farneback", "tvl1", "raft"]), default="dis",
                         show_default=True, help="Optical flow: OpenCV DIS or Farneback; TV-L1 needs "
                         "opencv-contrib-python-headless; RAFT needs torchvision and --raft-weights."),
            click.option("--raft-weights", type=click.Path(dir_okay=False),
                         help="torchvision RAFT state_dict, for --flow raft."),
            click.option("--flow-bound", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                         help="Flow (pixels of the 128x171 frame) mapped to the ends of the flow image's 0..255."))):
        command = option(command)
    return command
