"""verify: prove a shard set is complete and intact, against its manifest and optionally its source."""

import os
from collections import Counter

import numpy as np

from .atomic import is_temp
from .clips import verify_clip_tar
from .errors import BadVideoError, ELRError
from .manifest import encode_table, file_problem, iter_phases, row_problems, unlisted_files
from .shardset import ShardSet
from .parallel import dask_client, run_tasks
from .schema import STREAMS
from .source import SourceVideo, discover, load_video
from .tario import decode_sample, group_samples, iter_mapped_members
from .tarwrite import sample_digest


def _check_arrays(sample, where, dim, dtype, fields=tuple(STREAMS)):
    problems = []
    shapes = {s: sample[s].shape for s in fields}
    if any(len(sh) != 2 for sh in shapes.values()):
        return [f"{where}: arrays must be 2-D, found {shapes}"]
    if len({sh[0] for sh in shapes.values()}) != 1 or any(sh[1] != dim for sh in shapes.values()):
        problems.append(f"{where}: streams disagree or dim is not {dim}: {shapes}")
    for s in fields:
        if sample[s].dtype != np.dtype(dtype):
            problems.append(f"{where}: {s} has dtype {sample[s].dtype}, expected {dtype}")
        elif not np.isfinite(sample[s]).all():
            problems.append(f"{where}: {s} has non-finite values")
    return problems


def _source_video(source, split, phase, entry):
    paths = tuple(os.path.join(source, split, f"{phase}_{suffix}", entry["class"], entry["video"] + ".npy")
                  for suffix in STREAMS.values())
    return SourceVideo(split, phase, entry["class"], entry["video"], paths)


def _compare_source(sample, entry, where, source, split, phase, dtype):
    video = _source_video(source, split, phase, entry)
    try:
        arrays = load_video(video, dtype)
    except BadVideoError as e:
        return [f"{where}: source unreadable: {e}"]
    return [f"{where}: {s} differs from its source {path}"
            for s, path in zip(STREAMS, video.paths) if not np.array_equal(arrays[s], sample[s])]


def _verify_tar(shards_dir, split, phase, shard, expected, dim, dtype, n_classes, source):
    """Hash, decode and check one tar shard; returns the keys seen and the problems found."""
    name, path = shard["path"], os.path.join(shards_dir, shard["path"])
    if not os.path.exists(path):
        return {"seen": [], "problems": [f"{name}: missing"], "n": shard["samples"]}
    problems, seen = [], []
    try:
        for raw_sample in group_samples(iter_mapped_members(path, name), name):
            key = raw_sample["__key__"]
            where = f"{name}: key {key}"
            sample = decode_sample(raw_sample, name)
            meta, entry = sample["meta"], expected.get(key)
            seen.append((key, meta.get("label")))
            found = _check_arrays(sample, where, dim, dtype)
            if not isinstance(meta.get("label"), int) or not 0 <= meta["label"] < n_classes:
                found.append(f"{where}: label {meta.get('label')!r} out of range 0..{n_classes - 1}")
            if entry is None:
                found.append(f"{where}: not in the manifest")
            else:
                found += row_problems(where, meta, entry)
            if not found and sample_digest(sample) != entry["digest"]:
                found.append(f"{where}: content digest differs from the manifest")
            elif not found and source:
                found += _compare_source(sample, entry, where, source, split, phase, dtype)
            problems += found
    except ELRError as e:
        problems.append(str(e))
    if problem := file_problem(path, name, shard):
        problems.append(problem)
    return {"seen": seen, "problems": problems, "n": shard["samples"]}


def _verify_zarr_files(shards_dir, files):
    problems = [file_problem(os.path.join(shards_dir, f["path"]), f["path"], f) for f in files]
    return {"seen": [], "problems": [p for p in problems if p], "n": 0}


def _verify_zarr_range(shards_dir, store_rel, first, last, entries, dim, dtype):
    """Read samples first..last-1 of a Zarr store and match them with the manifest (order, label, content)."""
    from .zarrio import ZarrPhaseReader  # zarr takes 0.3 s to import: only sets with a Zarr copy pay it

    problems = []
    try:
        reader = ZarrPhaseReader(os.path.join(shards_dir, store_rel))
        for entry, sample in zip(entries, reader.iter_range(first, last)):
            where = f"{store_rel}: sample {entry['index']} (key {sample['__key__']})"
            if (sample["__key__"], sample["meta"]["label"]) != (entry["key"], entry["label"]):
                problems.append(f"{where}: manifest expects key {entry['key']} label {entry['label']}")
                continue
            found = _check_arrays(sample, where, dim, dtype)
            if not found and sample_digest(sample) != entry["digest"]:
                found.append(f"{where}: content differs from the manifest (and the tar copy)")
            problems += found
    except Exception as e:  # a damaged store fails inside zarr with many exception types
        problems.append(f"{store_rel}: unreadable ({type(e).__name__}: {e})")
    return {"seen": [], "problems": problems, "n": last - first}


def _check_table_positions(entry: dict, where: str) -> list:
    """Each tar shard's "first" and "table_offset" point at its own rows of the sample table (version 2):
    remote readers fetch a shard's sample positions from there."""
    if "table" not in entry:
        return []
    problems, samples = [], entry["samples"]
    starts = encode_table(samples)[1]
    for shard in entry.get("webdataset", {}).get("shards", []):
        first, n, name = shard["first"], shard["samples"], os.path.basename(shard["path"])
        rows = samples[first:first + n]
        if len(rows) != n or any(r.get("shard") != name for r in rows) or starts[min(first, len(samples))] != shard["table_offset"]:
            problems.append(f"{where}/{name}: its first/table_offset do not point at its {n} rows of {entry['table']['path']}")
    return problems


def verify_shards(shards_dir, source=None, workers=0, scheduler=None, progress=True, client=None) -> dict:
    """Check everything; returns {"ok": bool, "problems": [...], "checked": {...}}."""
    shards_dir = os.path.abspath(shards_dir)  # workers (on a cluster, in other folders) get full paths
    manifest = ShardSet.open(shards_dir, samples=True, content=None).manifest  # verify audits every field
    dim, dtype, n_classes = manifest.get("dim"), manifest.get("dtype"), len(manifest["classes"])
    clips = manifest["clips"] if manifest.get("content") == "clips" else None
    if clips and source:
        raise ValueError(f"--source: {shards_dir} is a clip set (build-clips); --source compares a feature "
                         "shard set with its .npy tree")
    source = os.path.abspath(source) if source else None
    calls, total = [], 0
    problems = [f"{rel}: " + ("a temporary file of a writer killed mid-write" if is_temp(rel) else "not in the manifest")
                for rel in unlisted_files(shards_dir, manifest)]
    for split, phase, entry in iter_phases(manifest):
        problems += _check_table_positions(entry, f"{split}/{phase}")
        by_shard = {}
        for s in entry["samples"]:
            by_shard.setdefault(s.get("shard"), {})[s["key"]] = s
        for shard in entry.get("webdataset", {}).get("shards", []):
            expected = by_shard.get(os.path.basename(shard["path"]), {})
            if clips:
                calls.append((verify_clip_tar, shards_dir, shard, expected, clips, n_classes))
            else:
                calls.append((_verify_tar, shards_dir, split, phase, shard, expected, dim, dtype, n_classes, source))
            total += shard["samples"]
        if "zarr" in entry:
            z = entry["zarr"]
            for i in range(0, len(z["files"]), 16):
                calls.append((_verify_zarr_files, shards_dir, z["files"][i:i + 16]))
            samples = entry["samples"]
            for i in range(0, len(samples), 256):
                calls.append((_verify_zarr_range, shards_dir, z["path"], i, min(i + 256, len(samples)),
                              samples[i:i + 256], dim, dtype))
                total += min(256, len(samples) - i)
    with dask_client(workers, scheduler, client) as client:
        results = run_tasks(client, calls, "verify", total, progress, count=lambda r: r["n"], unit="sample")

    seen = Counter()
    labels = {}
    for r in results:
        problems += r["problems"]
        for key, label in r["seen"]:
            seen[key] += 1
            labels[key] = label
    problems += [f"key {k}: appears {n} times across the tar shards" for k, n in sorted(seen.items()) if n > 1]
    for split, phase, entry in iter_phases(manifest):
        if "webdataset" not in entry:
            continue
        for s in entry["samples"]:
            if s["key"] not in seen:
                problems.append(f"{split}/{phase}/{s.get('shard')}: key {s['key']} ({s['class']}/{s['video']}) "
                                "is in the manifest but not in the shard")
        want = Counter(s["label"] for s in entry["samples"])
        got = Counter(labels[s["key"]] for s in entry["samples"] if s["key"] in labels)
        for label in sorted(set(want) | set(got)):
            if want[label] != got[label]:
                problems.append(f"{split}/{phase}: class {manifest['classes'][label]}: "
                                f"{got[label]} samples in the tars, manifest says {want[label]}")
    n_source = 0
    if source:
        n_source, found = _check_source_coverage(manifest, source)
        problems += found
    checked = {"tar_shards": sum(1 for c in calls if c[0] in (_verify_tar, verify_clip_tar)), "samples": sum(seen.values()),
               "zarr_files": sum(len(e["zarr"]["files"]) for *_, e in iter_phases(manifest) if "zarr" in e),
               "source_videos": n_source}
    if clips:
        checked["clips"] = sum(r.get("units", 0) for r in results)  # units, each decoded in its four streams
    return {"ok": not problems, "problems": problems, "checked": checked}


def _check_source_coverage(manifest, source):
    """Every source video is in the set exactly once (as a sample or as a listed skip)."""
    tree = discover(source, sorted(manifest["splits"]))
    problems, n = [], 0
    for (split, phase), videos in tree.phases.items():
        entry = manifest["splits"].get(split, {}).get(phase)
        if entry is None:
            problems.append(f"{split}/{phase}: in the source but not in the shard set")
            continue
        listed = Counter((s["class"], s["video"]) for s in entry["samples"])
        listed.update((s["class"], s["video"]) for s in entry["skipped"])
        for v in videos:
            n += 1
            count = listed.pop((v.class_name, v.video), 0)
            if count != 1:
                problems.append(f"{split}/{phase}: source video {v.class_name}/{v.video} appears {count} times")
        problems += [f"{split}/{phase}: {c}/{name} is in the shard set but not in the source" for c, name in listed]
    return n, problems
