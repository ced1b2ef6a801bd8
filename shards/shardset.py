"""One way to open a shard set, local or remote: `ShardSet.open(root).phase(split, phase)`.

Everything above `shards/` (training, evaluation, the command lines) reads a set through this facade:
what the manifest records (classes, dim, digest, which phases and copies exist), a phase's tar shards
as the loaders see them (ShardRef), a share of its samples for evaluation, and its expected labels.
The manifest's layout, its sample tables' byte ranges and local-versus-remote reading stay here.
"""

import functools
import os
from dataclasses import dataclass

from . import remote
from .cache import ShardCache
from .errors import ManifestError, ShardCorruptError
from .manifest import iter_phases, join_path, load_manifest, manifest_digest, parse_rows, phase_summary
from .readahead import ReadAhead
from .schema import LR
from .tario import iter_decoded_samples


@dataclass(frozen=True)
class ShardRef:
    """One tar shard as a loader sees it."""
    url: str  # local path or any fsspec URL
    samples: int
    spans: tuple | None = None  # each sample's (offset, bytes) in the shard: range reads of remote shards
    bytes: int | None = None  # the shard's size, as the manifest records it
    rows: tuple | None = None  # (table URL, start, end): where its spans are, read when first needed
    sha256: str | None = None  # as the manifest records it: a cached copy is checked against it
    cache: ShardCache | None = None  # where a remote shard is downloaded once and read locally

    @property
    def is_remote(self) -> bool:
        return remote.is_url(self.url)

    def sample_spans(self):
        return self.spans if self.spans is not None or self.rows is None else _spans_from_table(*self.rows)


@functools.lru_cache(maxsize=4096)
def _spans_from_table(table: str, start: int, end: int) -> tuple:
    """A remote shard's sample spans, from its rows of the sample table (a version 2 set)."""
    rows = parse_rows(remote.read_bytes(table, start, end), table)
    return tuple((r["offset"], r["bytes"]) for r in rows) if all("offset" in r for r in rows) else None


def iter_pieces(pieces, fields, keep: bool = False):
    """Decoded samples of [(ShardRef, skip, take)]; keep: see shards.tario.iter_decoded_samples.

    Background threads read ahead (shards.readahead): the disk is asked for a local shard as its piece
    starts and for the next one, and a cached shard downloads while the piece before it is read. A
    cached shard is read from its local copy, held against eviction while it is read."""
    pieces = list(pieces)
    ahead = ReadAhead(pieces)
    for i, (shard, skip, take) in enumerate(pieces):
        ahead.begin(i)
        if shard.cache is None:
            yield from iter_decoded_samples(shard.url, skip, take, shard.sample_spans(), fields, keep)
            continue
        with shard.cache.open(shard.url, shard.sha256, shard.bytes) as path:
            for sample in iter_decoded_samples(path, skip, take, None, fields, keep):
                # without "__at__": a loader worker's places would send the trainer to a file that the
                # cache may evict once this block ends; the arrays are copied into the hand-off instead
                yield {k: v for k, v in sample.items() if k != "__at__"}


class ShardSet:
    """A validated shard set. `open(root, samples=True)` also reads the sample tables (what merging and
    verifying need; a training rank or an evaluation job does not)."""

    def __init__(self, root: str, manifest: dict, cache: ShardCache | None = None):
        self.root, self.manifest = root, manifest
        self.cache = cache if remote.is_url(root) else None  # a local set is read where it is

    @classmethod
    def open(cls, root: str, samples: bool = False, cache: ShardCache | None = None,
             content: str | None = "features") -> "ShardSet":
        """content: what the set must hold ("features", "clips"; None: either), else one ManifestError."""
        manifest = load_manifest(root, samples=samples)
        found = manifest.get("content", "features")
        if content is not None and found != content:
            raise ManifestError(f"{root}: " + (
                "a clip set (build-clips: 16-frame clips, not C3D features); fine-tune C3D on it with "
                f"elr-train-c3d --clips {root}, or give a feature shard set (build-shards)" if found == "clips" else
                "a feature shard set (build-shards), not clips; build clips from the videos with elr-ingest build-clips"))
        return cls(root, manifest, cache)

    @property
    def classes(self) -> list:
        return self.manifest["classes"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @functools.cached_property
    def digest(self) -> str:  # hashed once: a run stamps every checkpoint with it
        return manifest_digest(self.manifest)

    @property
    def is_remote(self) -> bool:
        return remote.is_url(self.root)

    @property
    def splits(self) -> list:
        return sorted(self.manifest["splits"])

    def phases(self, split: str) -> list:
        return list(self.manifest["splits"].get(split, {}))

    def video_counts(self) -> tuple:
        """(videos, skipped videos) over every phase (needs the sample tables: open with samples=True)."""
        entries = [entry for *_, entry in iter_phases(self.manifest)]
        return sum(len(e["samples"]) for e in entries), sum(len(e["skipped"]) for e in entries)

    def tar_shards(self, split: str, phases) -> list:
        """[ShardRef] of the tar shards of the given phases, phase after phase, in manifest order."""
        return [shard for phase in phases for shard in self.phase(split, phase).tar_shards()]

    def check_local_shards(self, split: str, phases) -> None:
        """Every tar shard of the phases is there, of the size the manifest records (a local set; a
        remote one is checked as it is read). Hashes are verify's job: this costs one stat a shard."""
        if self.is_remote:
            return
        for shard in self.tar_shards(split, phases):
            if not os.path.isfile(shard.url):
                raise ShardCorruptError(f"{shard.url}: missing (the manifest lists it; run elr-ingest verify)")
            if os.path.getsize(shard.url) != shard.bytes:
                raise ShardCorruptError(f"{shard.url}: {os.path.getsize(shard.url)} bytes, the manifest says "
                                        f"{shard.bytes} (truncated or replaced; run elr-ingest verify)")

    def phase(self, split: str, phase: str) -> "Phase":
        entry = self.manifest["splits"].get(split, {}).get(phase)
        if entry is None:
            have = ", ".join(f"{s}/{p}" for s in sorted(self.manifest["splits"]) for p in self.manifest["splits"][s])
            raise ManifestError(f"{self.root}: no {split}/{phase} in this shard set (it has {have})")
        return Phase(self, split, phase, entry)


@dataclass
class Phase:
    """One split's phase of a shard set: its tar shards, its Zarr copy, its samples."""
    set: ShardSet
    split: str
    name: str
    entry: dict

    @property
    def has_tar(self) -> bool:
        return "webdataset" in self.entry

    @property
    def has_zarr(self) -> bool:
        return "zarr" in self.entry

    def tar_shards(self) -> list:
        """[ShardRef] in manifest order. A remote shard's sample spans are read from the sample table
        when first needed (range reads: a stream starting mid-shard fetches only its samples)."""
        root, entry = self.set.root, self.entry
        if not self.has_tar:
            raise ManifestError(f"{root}: {self.split}/{self.name} has no tar shards (built with --format zarr)")
        spans, listed = {}, entry["webdataset"]["shards"]
        for s in entry.get("samples", ()):  # version 1, or tables loaded
            if "offset" in s:
                spans.setdefault(s["shard"], []).append((s["offset"], s["bytes"]))
        shards = []
        for i, s in enumerate(listed):
            found = spans.get(os.path.basename(s["path"]))
            rows = None
            if "table" in entry and self.set.is_remote:  # only remote shards need spans (range reads)
                end = listed[i + 1]["table_offset"] if i + 1 < len(listed) else entry["table"]["bytes"]
                rows = (join_path(root, entry["table"]["path"]), s["table_offset"], end)
            shards.append(ShardRef(join_path(root, s["path"]), s["samples"],
                                   tuple(found) if found and len(found) == s["samples"] else None, s["bytes"], rows,
                                   s["sha256"], self.set.cache))
        return shards

    def samples(self, part: int = 0, parts: int = 1, fields=LR, fmt: str = "auto"):
        """Samples (shards.schema) of one share of the phase: every video in exactly one of `parts`.

        From the Zarr copy (fmt "zarr", or "auto" for a local set that has one): a contiguous range of
        videos, reading only `fields`. From the tar shards: every parts-th shard."""
        root = self.set.root
        use_zarr = fmt == "zarr" or (fmt == "auto" and self.has_zarr and not self.set.is_remote)
        if not use_zarr:
            yield from iter_pieces([(s, 0, s.samples) for s in self.tar_shards()[part::parts]], fields)
            return
        if not self.has_zarr:
            raise ManifestError(f"{root}: {self.split}/{self.name} has no Zarr copy (built with --format webdataset)")
        if self.set.is_remote:
            raise ManifestError(f"{root}: the Zarr copy is read from local sets only; use --format webdataset")
        from .zarrio import ZarrPhaseReader  # zarr takes 0.3 s to import: training never reads Zarr

        reader = ZarrPhaseReader(os.path.join(root, self.entry["zarr"]["path"]))
        n = len(reader)
        yield from reader.iter_range(n * part // parts, n * (part + 1) // parts, fields=fields)

    def summary(self) -> dict:
        """Videos, skipped videos, units, classes present, tar shards and bytes, Zarr bytes: from the
        manifest alone (no sample table is read)."""
        counts = phase_summary(self.entry, len(self.set.classes))
        tar = self.entry.get("webdataset", {}).get("shards", [])
        return {"split": self.split, "phase": self.name, "videos": counts["videos"], "skipped": len(self.entry["skipped"]),
                "units": counts["units"], "classes": sum(1 for n in counts["label_counts"] if n),
                "tar_shards": len(tar), "tar_bytes": sum(s["bytes"] for s in tar),
                "zarr_bytes": sum(f["bytes"] for f in self.entry.get("zarr", {}).get("files", []))}

    def expected_labels(self) -> dict:
        """{key: label} of every video of the phase (needs the set opened with samples=True)."""
        return {s["key"]: s["label"] for s in self.entry["samples"]}
