"""elr-ingest: turn the seed's per-file C3D feature tree into verified WebDataset and Zarr shards."""

import json
import sys

import click

from shards.build import BuildConfig, build_shards, default_out
from shards.cli import call, run_command_line
from shards.demo import DemoConfig, make_demo
from shards.info import format_info, shard_set_info
from shards.verify import verify_shards


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


POSITIVE, COUNT = click.IntRange(min=1), click.IntRange(min=0)
dask_workers_option = click.option(
    "--dask-workers", "--workers", "workers", type=COUNT, default=0, show_default=True,
    help="Local dask worker processes (0: one per core); ignored with --scheduler.")
scheduler_option = click.option("--scheduler", help="Address of a dask.distributed scheduler, e.g. tcp://head:8786.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="elr-pipeline")
def cli():
    """Sharded storage for extremely-low-resolution (eLR) action recognition features.

    \b
    Typical session:
      elr-ingest make-demo data/HMDB51             # synthetic data in the seed's layout
      elr-ingest build-shards data/HMDB51          # -> data/HMDB51-shards
      elr-ingest verify data/HMDB51-shards --source data/HMDB51
      elr-ingest info data/HMDB51-shards
    """


@cli.command("make-demo")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", default=51, show_default=True, type=click.IntRange(min=2),
              help="Number of classes (HMDB51's names first).")
@click.option("--videos-per-class", default=4, show_default=True, type=POSITIVE, help="Videos per class in each phase.")
@click.option("--dim", default=4096, show_default=True, type=POSITIVE, help="Feature dim (C3D fc6: 4096).")
@click.option("--min-units", default=4, show_default=True, type=click.IntRange(min=3), help="Shortest video, in C3D units.")
@click.option("--max-units", default=16, show_default=True, type=click.IntRange(min=3), help="Longest video, in C3D units.")
@click.option("--lengths", type=click.Choice(["uniform", "hmdb51"]), default="uniform", show_default=True,
              help="Video lengths: uniform in --min-units..--max-units, or drawn per class from real HMDB51 "
                   "(median 4 units, 1 to 66, strongly class-dependent).")
@click.option("--latent-dim", default=DemoConfig.latent_dim, show_default=True,
              help="Dimension the synthetic signal lives in, embedded into --dim.")
@click.option("--hr-snr", default=DemoConfig.hr_snr, show_default=True, help="Signal-to-noise of HR units.")
@click.option("--lr-snr", default=DemoConfig.lr_snr, show_default=True, help="Signal-to-noise of LR units.")
@click.option("--seed", default=0, show_default=True)
def make_demo_cmd(out, **options):
    """Write a synthetic HMDB51-shaped feature tree under OUT/Split1 in the seed's layout.

    Classes are told apart only by the order of their per-unit patterns, and HR features are
    cleaner than LR ones, as in real eLR data.

    \b
    Example:
      elr-ingest make-demo data/HMDB51 --videos-per-class 4
      elr-ingest make-demo /tmp/tiny --classes 6 --dim 32
      elr-ingest make-demo data/HMDB51-real --lengths hmdb51     # HMDB51's per-class lengths
    """
    cfg = call(DemoConfig, **options)
    counts = call(make_demo, out, cfg)
    click.echo(f"wrote {sum(counts.values())} videos x 4 streams ({cfg.classes} classes, dim {cfg.dim}) "
               f"under {out}/Split1", err=True)


@cli.command("build-shards")
@click.argument("data_root", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. [default: <DATA_ROOT>-shards]")
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable), e.g. --split Split1.")
@click.option("--format", "fmt", type=click.Choice(["webdataset", "zarr", "both"]), default="both",
              show_default=True, help="Which copies to write.")
@click.option("--shard-size", "shard_bytes", default="256MB", show_default=True, type=ByteSize(),
              help="Target tar shard size (KB, MB, GB, KiB...).")
@click.option("--min-shards", default=8, show_default=True, type=POSITIVE, help="At least this many tar shards per phase.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype (float32 is lossless).")
@click.option("--seed", default=0, show_default=True, help="Shuffles videos across shards.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A bad video stops the build, or is left out and listed in the manifest.")
@dask_workers_option
@scheduler_option
@click.option("--resume", is_flag=True, help="Continue an interrupted build, keeping finished shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing shard set once the new one is complete.")
@click.option("--zarr-chunk-units", default=512, show_default=True, type=POSITIVE,
              help="Units per Zarr chunk (the smallest read).")
@click.option("--zarr-shard-units", default=2048, show_default=True, type=POSITIVE, help="Units per Zarr shard file.")
@click.option("--direct-io/--page-cache", "direct_io", default=True, show_default=True,
              help="Write shard files around the page cache (O_DIRECT, where the filesystem allows), or through it.")
@quiet_option
def build_shards_cmd(data_root, out, splits, fmt, quiet, **options):
    """Turn DATA_ROOT (the seed's data/HMDB51 tree) into tar shards and Zarr stores.

    One sample per video: its hr_rgb, lr_rgb, hr_flow and lr_flow arrays, label and names.
    The set appears at its output path only when complete (manifest.json written last).

    \b
    Examples:
      elr-ingest build-shards data/HMDB51
      elr-ingest build-shards data/HMDB51 --split Split1 --format webdataset --shard-size 128MB
      elr-ingest build-shards data/HMDB51 --scheduler tcp://10.0.0.5:8786
      elr-ingest build-shards data/HMDB51 --resume          # after an interruption
    """
    formats = ("webdataset", "zarr") if fmt == "both" else (fmt,)
    cfg = call(BuildConfig, out=out, splits=splits, formats=formats, progress=not quiet, **options)
    manifest = call(build_shards, data_root, cfg)
    target = out or default_out(data_root)
    n = sum(len(e["samples"]) for s in manifest["splits"].values() for e in s.values())
    skipped = sum(len(e["skipped"]) for s in manifest["splits"].values() for e in s.values())
    click.echo(f"wrote {n} videos to {target}" + (f" ({skipped} skipped, listed in the manifest)" if skipped else ""),
               err=True)


@cli.command("verify")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="Also check every array against this source tree, exactly.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@dask_workers_option
@scheduler_option
@quiet_option
def verify_cmd(shards, source, as_json, workers, scheduler, quiet):
    """Prove SHARDS is complete and intact; exit 0 only when every check holds.

    \b
    Checks: every shard's presence, size and sha256; every sample decodes, with four
    arrays of equal length, the expected dim and dtype, finite values and a valid label;
    keys unique; per-class counts; tar and Zarr copies identical; with --source, every
    source video present exactly once and equal to its file.

    \b
    Example:
      elr-ingest verify data/HMDB51-shards --source data/HMDB51
    """
    report = call(verify_shards, shards, source=source, workers=workers, scheduler=scheduler, progress=not quiet)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        for p in report["problems"]:
            click.echo(f"PROBLEM {p}")
        c = report["checked"]
        status = "OK" if report["ok"] else f"FAILED ({len(report['problems'])} problems)"
        click.echo(f"{status}: {c['tar_shards']} tar shards, {c['samples']} samples, {c['zarr_files']} zarr files"
                   + (f", {c['source_videos']} source videos" if source else ""))
    sys.exit(0 if report["ok"] else 1)


@cli.command("info")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info_cmd(shards, as_json):
    """Summarise a shard set: splits, phases, videos, units, classes, dim, dtype, bytes, shards.

    \b
    Example:
      elr-ingest info data/HMDB51-shards --json | jq '.phases[].videos'
    """
    info = call(shard_set_info, shards)
    click.echo(json.dumps(info, indent=1) if as_json else format_info(info))


def main(argv=None):
    run_command_line(cli, argv)


if __name__ == "__main__":
    main()
