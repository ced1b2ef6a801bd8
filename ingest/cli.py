"""elr-ingest: turn the seed's per-file C3D feature tree into verified WebDataset and Zarr shards."""

import json
import sys

import click

from ingest.errors import call
from shards.build import BuildConfig, build_shards, default_out
from shards.demo import DemoConfig, make_demo
from shards.info import format_info, shard_set_info
from shards.verify import verify_shards


def _size(text: str) -> int:
    """'256MB', '1.5GB', '4096' -> bytes."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for suffix, factor in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(t)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="elr-pipeline")
def main():
    """Sharded storage for extremely-low-resolution (eLR) action recognition features.

    \b
    Typical session:
      elr-ingest make-demo data/HMDB51             # synthetic data in the seed's layout
      elr-ingest build-shards data/HMDB51          # -> data/HMDB51-shards
      elr-ingest verify data/HMDB51-shards --source data/HMDB51
      elr-ingest info data/HMDB51-shards
    """


@main.command("make-demo")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", default=51, show_default=True, help="Number of classes (HMDB51's names first).")
@click.option("--videos-per-class", default=4, show_default=True, help="Videos per class in each phase.")
@click.option("--dim", default=4096, show_default=True, help="Feature dim (C3D fc6: 4096).")
@click.option("--min-units", default=4, show_default=True, help="Shortest video, in C3D units.")
@click.option("--max-units", default=16, show_default=True, help="Longest video, in C3D units.")
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
    """
    cfg = call(DemoConfig, **options)
    counts = call(make_demo, out, cfg)
    click.echo(f"wrote {sum(counts.values())} videos x 4 streams ({cfg.classes} classes, dim {cfg.dim}) "
               f"under {out}/Split1", err=True)


@main.command("build-shards")
@click.argument("data_root", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. [default: <DATA_ROOT>-shards]")
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable), e.g. --split Split1.")
@click.option("--format", "fmt", type=click.Choice(["webdataset", "zarr", "both"]), default="both",
              show_default=True, help="Which copies to write.")
@click.option("--shard-size", default="256MB", show_default=True, help="Target tar shard size (KB, MB, GB).")
@click.option("--min-shards", default=8, show_default=True, help="At least this many tar shards per phase.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype (float32 is lossless).")
@click.option("--seed", default=0, show_default=True, help="Shuffles videos across shards.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A bad video stops the build, or is left out and listed in the manifest.")
@click.option("--workers", default=0, show_default=True, help="Local dask worker processes (0: one per core).")
@click.option("--scheduler", help="Address of a dask.distributed scheduler, e.g. tcp://head:8786.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build, keeping finished shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing shard set once the new one is complete.")
@click.option("--zarr-chunk-units", default=512, show_default=True, help="Units per Zarr chunk (the smallest read).")
@click.option("--zarr-shard-units", default=2048, show_default=True, help="Units per Zarr shard file.")
@click.option("--direct-io/--page-cache", "direct_io", default=True, show_default=True,
              help="Write shard files around the page cache (O_DIRECT, where the filesystem allows), or through it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def build_shards_cmd(data_root, out, splits, fmt, shard_size, quiet, **options):
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
    cfg = call(BuildConfig, out=out, splits=splits, formats=formats, shard_bytes=call(_size, shard_size),
               progress=not quiet, **options)
    manifest = call(build_shards, data_root, cfg)
    target = out or default_out(data_root)
    n = sum(len(e["samples"]) for s in manifest["splits"].values() for e in s.values())
    skipped = sum(len(e["skipped"]) for s in manifest["splits"].values() for e in s.values())
    click.echo(f"wrote {n} videos to {target}" + (f" ({skipped} skipped, listed in the manifest)" if skipped else ""),
               err=True)


@main.command("verify")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="Also check every array against this source tree, exactly.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--workers", default=0, show_default=True, help="Local dask worker processes (0: one per core).")
@click.option("--scheduler", help="Address of a dask.distributed scheduler.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
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


@main.command("info")
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


if __name__ == "__main__":
    main()
