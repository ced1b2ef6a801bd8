"""elr-eval: score a checkpoint on a test phase as independent jobs, then merge the parts."""

import json
import os

import click

from shards.cli import call, run_command_line
from shards.parallel import job_index_from_env
from train.evaluate import EvalConfig, merge, run_eval
from train.report import format_table


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Sharded evaluation of eLR checkpoints (LR test streams only).

    \b
    One machine:      elr-eval run --checkpoint runs/elr/last.pt --out eval/ && elr-eval merge eval/
    SLURM array:      elr-eval run ... --num-jobs 8          (index from SLURM_ARRAY_TASK_ID)
    Kubernetes:       elr-eval run ... --num-jobs 8          (index from JOB_COMPLETION_INDEX)
    torchrun:         torchrun --nproc-per-node 4 -m train.eval_cli run ...   (ranks are jobs; rank 0 merges)
    dask:             elr-eval run ... --num-jobs 8 --scheduler tcp://head:8786   (runs all, then merges)
    """


@cli.command("run")
@click.option("--shards", default="data/HMDB51-shards", show_default=True,
              help="Shard set: a folder or any fsspec URL (http(s)://, s3://...).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A train/ddp.py checkpoint or a seed state_dict (.pth).")
@click.option("--num-jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="How many jobs share the test phase.")
@click.option("--job-index", type=click.IntRange(min=0),
              help="This job [default: $SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX, or 0].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the parts and reports.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "zarr", "webdataset"]), default="auto", show_default=True,
              help="Read the Zarr copy (LR arrays only) or the tar shards; auto prefers Zarr.")
@click.option("--split", default="Split1", show_default=True)
@click.option("--phase", default="Test", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--scheduler", help="Run every job as a task on this dask scheduler, then merge.")
@click.option("--cache-dir", help="For a remote --shards: download each shard once into this local folder "
              "[default: $ELR_CACHE_DIR].")
@click.option("--cache-limit", help="The cache's size, e.g. 200GB [default: $ELR_CACHE_LIMIT].")
def run_cmd(shards, checkpoint, num_jobs, job_index, out, device, amp, fmt, split, phase, batch_size, scheduler,
            cache_dir, cache_limit):
    """Score one job's slice of the test phase and write its part (re-running replaces it).

    \b
    Examples:
      elr-eval run --checkpoint runs/elr/last.pt --out eval/                 # one job, then merge
      elr-eval run --checkpoint model.pth --num-jobs 4 --job-index 2 --out eval/
    """
    if job_index is None:
        job_index = job_index_from_env()
    if job_index is None:
        if num_jobs > 1 and not scheduler and int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise click.UsageError("--job-index is required with --num-jobs > 1 (or set SLURM_ARRAY_TASK_ID)")
        job_index = 0
    cfg = call(EvalConfig, shards=shards, checkpoint=checkpoint, out=out, num_jobs=num_jobs, job_index=job_index,
               device=device, amp=amp, fmt=fmt, split=split, phase=phase, batch=batch_size,
               cache_dir=cache_dir, cache_limit=cache_limit)
    result = call(run_eval, cfg, scheduler)
    if isinstance(result, dict):
        click.echo(format_table(result, out))
    elif result:
        click.echo(f"wrote {result}", err=True)


@cli.command("merge")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", help="The shard set [default: the one the parts name].")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def merge_cmd(folder, shards, as_json):
    """Check that every part is present, of the same checkpoint and covers every video once; report.

    \b
    Writes report.json, report.md, predictions.csv and confusion.png into FOLDER.
    Example:
      elr-eval merge eval/
    """
    scores = call(merge, folder, shards)
    click.echo(json.dumps(scores, indent=1) if as_json else format_table(scores, folder))


def main(argv=None):
    run_command_line(cli, argv)


if __name__ == "__main__":
    main()
