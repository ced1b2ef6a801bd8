"""Reading a phase once, in order, for evaluation: a share of its videos (Zarr or tar) in unpadded batches."""

import os

from shards import remote
from shards.errors import ManifestError
from shards.schema import LR

from .handoff import collate
from .plan import iter_pieces, phase_entry, phase_shards


def phase_samples(manifest: dict, root: str, split: str, phase: str, part: int = 0, parts: int = 1,
                  fields=LR, fmt: str = "auto"):
    """Samples (shards.schema) of one share of a phase: every video in exactly one of `parts` shares.

    From the Zarr copy (fmt "zarr", or "auto" for a local set that has one): a contiguous range of
    videos, reading only `fields`. From the tar shards: every parts-th shard."""
    entry = phase_entry(manifest, root, split, phase)
    use_zarr = fmt == "zarr" or (fmt == "auto" and "zarr" in entry and not remote.is_url(root))
    if not use_zarr:
        shards = phase_shards(manifest, root, split, [phase])[part::parts]
        yield from iter_pieces([(s, 0, s.samples) for s in shards], fields)
        return
    if "zarr" not in entry:
        raise ManifestError(f"{root}: {split}/{phase} has no Zarr copy (built with --format webdataset)")
    if remote.is_url(root):
        raise ManifestError(f"{root}: the Zarr copy is read from local sets only; use --format webdataset")
    from shards.zarrio import ZarrPhaseReader  # zarr takes 0.3 s to import: training never reads Zarr

    reader = ZarrPhaseReader(os.path.join(root, entry["zarr"]["path"]))
    n = len(reader)
    yield from reader.iter_range(n * part // parts, n * (part + 1) // parts, fields=fields)


def batches(samples, fields, batch: int):
    """Ordered, unpadded batches (collate) of a sample iterator."""
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch:
            yield collate(chunk, fields, 0, 0)
            chunk = []
    if chunk:
        yield collate(chunk, fields, 0, 0)
