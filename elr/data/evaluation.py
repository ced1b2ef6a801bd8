"""Reading a phase once, in order, for evaluation: unpadded batches of its samples
(shards.shardset.Phase.samples gives a share of them, from the Zarr copy or the tar shards)."""

from .handoff import collate


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
