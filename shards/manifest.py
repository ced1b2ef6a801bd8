"""manifest.json: the index of a shard set, written last and atomically, validated on load.

Version 2 keeps the manifest small: each phase's per-video records (key, label, units, class, video,
and where the sample lies in its tar shard) sit in a sample table beside it, `<split>/<phase>.samples.jsonl`
(one JSON object per line, in sample order, its sha256 in the manifest), and every tar shard entry
says where its rows start ("first", "table_offset"), so a reader that needs one shard's rows reads
only those. Training ranks and evaluation jobs never read the tables of a local set (the tar headers
say everything they need); verify, merge and build read them whole. Version 1 (every record inline
in the manifest) is still read.
"""

import hashlib
import json
import os

from . import remote
from .atomic import atomic_write, write_json_atomic
from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "elr-shards"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = ("float32", "float16")
# what a set holds: C3D features per video (build-shards), or 16-frame clips, one sample per unit
# (build-clips: shards/clips.py); a manifest without "content" holds features
CONTENTS = ("features", "clips")


def file_sha256(path: str, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: str, name: str, listed: dict) -> str | None:
    """What is wrong with a set's file against its manifest entry ({"bytes", "sha256"}): missing,
    another size, other bytes (one line naming `name`); None when it is the file the manifest lists."""
    if not os.path.exists(path):
        return f"{name}: missing"
    size = os.path.getsize(path)
    if size != listed["bytes"]:
        return f"{name}: {size} bytes, manifest says {listed['bytes']}"
    if file_sha256(path) != listed["sha256"]:
        return f"{name}: sha256 differs from the manifest"
    return None


def row_problems(where: str, meta: dict, row: dict) -> list:
    """The fields a sample's .json shares with its sample-table row, where they differ."""
    return [f"{where}: {f} is {meta.get(f)!r}, manifest says {row[f]!r}"
            for f in ("label", "units", "class", "video") if meta.get(f) != row[f]]


def manifest_digest(manifest: dict) -> str:
    """The identity of a shard set's content: checkpoints and evaluation parts record it.

    Of manifest.json as stored (version 2: the tables' hashes stand for their rows), whether or not
    the sample tables were loaded into it."""
    if manifest.get("format_version", 1) >= 2:
        manifest = {**manifest, "splits": {split: {phase: {k: v for k, v in entry.items() if k != "samples"}
                                                   for phase, entry in phases.items()}
                                           for split, phases in manifest["splits"].items()}}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def load_manifest(root: str, samples: bool = True) -> dict:
    """The validated manifest of a shard set: a local folder or any fsspec URL (http(s)://, s3://...).

    samples: give every phase entry its "samples" list (read from the sample tables of a version 2
    set, checked against their hashes); False leaves the tables unread (what training ranks and
    evaluation jobs need). Anything malformed is one ManifestError naming the file and the field."""
    if remote.is_url(root):
        path = remote.join(root, MANIFEST_NAME)
        text = remote.read_bytes(path)
    else:
        root = root[len("file://"):] if root.startswith("file://") else root
        path = os.path.join(root, MANIFEST_NAME)
        if not os.path.isdir(root):
            raise ManifestError(f"{root}: no such shard set folder")
        if not os.path.exists(path):
            hint = " (an interrupted build? run build-shards --resume)" if os.path.isdir(root.rstrip("/") + ".building") else ""
            raise ManifestError(f"{path}: no manifest; not a finished shard set{hint}")
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise ManifestError(f"{path}: unreadable manifest ({e.strerror or e})") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not JSON ({e})") from None
    validate_manifest(manifest, path)
    if samples and manifest["format_version"] >= 2:  # (root: a URL, or a local path without file://)
        for split, phase, entry in iter_phases(manifest):
            entry["samples"] = read_table(root, entry["table"], f"splits.{split}.{phase}", len(manifest["classes"]))
    return manifest


def join_path(root: str, rel: str) -> str:
    """A path inside a shard set, local or remote."""
    return remote.join(root, rel) if remote.is_url(root) else os.path.join(root, rel)


def read_table(root: str, table: dict, where: str, n_classes: int) -> list:
    """The rows of a sample table, checked against the manifest's hash and row count."""
    path = join_path(root, table["path"])
    try:
        if remote.is_url(root):
            data = remote.read_bytes(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{path}: sample table missing (named by {where}.table)") from None
    except OSError as e:
        raise ManifestError(f"{path}: unreadable sample table ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != table["sha256"]:
        raise ManifestError(f"{path}: sample table does not match its sha256 in the manifest (changed or damaged)")
    rows = parse_rows(data, path)
    _check(len(rows) == table["rows"], path, f"{len(rows)} rows, the manifest says {table['rows']}")
    _validate_samples(rows, "row", n_classes, path)
    return rows


def parse_rows(data: bytes, path: str) -> list:
    """JSON-lines bytes -> [dict]."""
    try:
        return json.loads(b"[" + b",".join(data.splitlines()) + b"]") if data.strip() else []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not JSON lines ({e})") from None


def store_manifest(root: str, manifest: dict) -> None:
    """Write a shard set's index: for version 2, each phase's "samples" go to its sample table (and
    the entry gets the table's hash, the shards their rows' positions, the phase its counts); then
    manifest.json. Every file is written to a temporary name and renamed."""
    if manifest["format_version"] >= 2:
        manifest = {**manifest, "splits": {split: dict(phases) for split, phases in manifest["splits"].items()}}
        for split, phase, entry in list(iter_phases(manifest)):
            entry = {**entry}
            samples = entry.pop("samples")
            data, starts = encode_table(samples)
            rel = f"{split}/{phase}.samples.jsonl"
            with atomic_write(os.path.join(root, rel)) as f:
                f.write(data)
            if "webdataset" in entry:  # a shard's rows are contiguous, in shard order
                positioned, first = [], 0
                for shard in entry["webdataset"]["shards"]:
                    positioned.append({**shard, "first": first, "table_offset": starts[first]})
                    first += shard["samples"]
                entry["webdataset"] = {**entry["webdataset"], "shards": positioned}
            summary = phase_summary({"samples": samples}, len(manifest["classes"]))
            entry.update(table={"path": rel, "rows": len(samples), "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()},
                         units=summary["units"], label_counts=summary["label_counts"])
            manifest["splits"][split][phase] = entry
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest)


def encode_table(rows) -> tuple:
    """(the bytes of a sample table: one compact JSON object per line, keys sorted; the byte offset
    of each row, and the table's end)."""
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in rows]
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return b"".join(lines), starts


def _check(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ManifestError(f"{path}: {problem}")


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_relative(p) -> bool:
    """A path inside the set: relative, no '..' (a manifest never points a reader elsewhere)."""
    return isinstance(p, str) and p and not p.startswith("/") and ".." not in p.split("/") and "://" not in p


def validate_manifest(m, path: str) -> None:
    """Check the fields every reader relies on; raise ManifestError naming the first that is wrong."""
    _check(isinstance(m, dict), path, f"expected a JSON object, found {type(m).__name__}")
    _check(m.get("format") == FORMAT_NAME and m.get("format_version") in READABLE_VERSIONS, path,
           f"format {m.get('format')!r} version {m.get('format_version')!r}, expected {FORMAT_NAME!r} "
           f"version {' or '.join(map(str, READABLE_VERSIONS))}")
    classes = m.get("classes")
    _check(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
           and len(set(classes)) == len(classes), path, f'"classes" must be a non-empty list of distinct names, found {classes!r:.80}')
    content = m.get("content", "features")
    _check(content in CONTENTS, path, f'"content" must be one of {", ".join(CONTENTS)}, found {content!r}')
    if content == "features":
        _check(_is_int(m.get("dim"), 1), path, f'"dim" must be a positive integer, found {m.get("dim")!r}')
        _check(m.get("dtype") in DTYPES, path, f'"dtype" must be one of {", ".join(DTYPES)}, found {m.get("dtype")!r}')
    else:
        c = m.get("clips")
        _check(isinstance(c, dict) and _is_int(c.get("frames"), 1) and isinstance(c.get("storage"), str)
               and all(isinstance(c.get(k), list) and len(c[k]) == 2 and all(_is_int(x, 1) for x in c[k])
                       for k in ("size", "lr_size")), path,
               f'"clips" must say frames, size [H, W], lr_size [H, W] and storage; found {c!r:.120}')
    _check(isinstance(m.get("options"), dict) and isinstance(m["options"].get("formats"), list), path,
           '"options" must be an object with a "formats" list')
    _check(isinstance(m.get("source"), dict), path, '"source" must be an object')
    splits = m.get("splits")
    _check(isinstance(splits, dict) and splits, path, '"splits" must be a non-empty object')
    for split, phases in splits.items():
        _check(isinstance(phases, dict) and phases, path, f'splits.{split} must be a non-empty object of phases')
        for phase, entry in phases.items():
            _validate_phase(entry, f"splits.{split}.{phase}", len(classes), path, m["format_version"])


def _validate_samples(samples, where: str, n_classes: int, path: str) -> None:
    for i, s in enumerate(samples):
        _check(isinstance(s, dict) and isinstance(s.get("key"), str) and _is_int(s.get("label"))
               and s["label"] < n_classes and _is_int(s.get("units"), 1)
               and isinstance(s.get("class"), str) and isinstance(s.get("video"), str), path,
               f"{where}[{i}] needs a key, a label in 0..{n_classes - 1}, units >= 1, class and video; "
               f"found {s!r:.120}")


def _validate_phase(entry, where: str, n_classes: int, path: str, version: int) -> None:
    _check(isinstance(entry, dict), path, f"{where} must be an object")
    _check(isinstance(entry.get("skipped"), list), path, f'{where} needs a "skipped" list')
    if version == 1:
        _check(isinstance(entry.get("samples"), list), path, f'{where} needs a "samples" list')
        _validate_samples(entry["samples"], f"{where}.samples", n_classes, path)
    else:
        t = entry.get("table")
        _check(isinstance(t, dict) and _is_relative(t.get("path")) and _is_int(t.get("rows"))
               and _is_int(t.get("bytes")) and isinstance(t.get("sha256"), str), path,
               f'{where}.table needs a relative path, rows, bytes and sha256; found {t!r:.120}')
        _check(_is_int(entry.get("units")) and isinstance(entry.get("label_counts"), list)
               and len(entry["label_counts"]) == n_classes and all(map(_is_int, entry["label_counts"]))
               and sum(entry["label_counts"]) == t["rows"], path,
               f'{where} needs "units" and "label_counts" (one count per class, {t["rows"]} in all)')
    if "webdataset" in entry:
        shards = entry["webdataset"].get("shards") if isinstance(entry["webdataset"], dict) else None
        _check(isinstance(shards, list), path, f'{where}.webdataset needs a "shards" list')
        for i, s in enumerate(shards):
            _check(isinstance(s, dict) and _is_relative(s.get("path")) and _is_int(s.get("samples"))
                   and _is_int(s.get("bytes")) and isinstance(s.get("sha256"), str)
                   and (version == 1 or (_is_int(s.get("first")) and _is_int(s.get("table_offset")))), path,
                   f"{where}.webdataset.shards[{i}] needs a relative path, samples, bytes and sha256"
                   f"{', first and table_offset' if version > 1 else ''}; found {s!r:.120}")
    if "zarr" in entry:
        z = entry["zarr"]
        _check(isinstance(z, dict) and _is_relative(z.get("path")) and isinstance(z.get("files"), list)
               and all(isinstance(f, dict) and _is_relative(f.get("path")) and _is_int(f.get("bytes"))
                       for f in z["files"]), path, f'{where}.zarr needs a relative path and a "files" list')


def phase_summary(entry: dict, n_classes: int) -> dict:
    """{"videos", "units", "label_counts"} of a phase entry, without reading a version 2 table."""
    if "table" in entry:
        return {"videos": entry["table"]["rows"], "units": entry["units"], "label_counts": entry["label_counts"]}
    counts = [0] * n_classes
    for s in entry["samples"]:
        counts[s["label"]] += 1
    return {"videos": len(entry["samples"]), "units": sum(s["units"] for s in entry["samples"]), "label_counts": counts}


def iter_phases(manifest: dict):
    """Yield (split, phase, phase_entry) in a fixed order."""
    for split in sorted(manifest["splits"]):
        for phase, entry in manifest["splits"][split].items():
            yield split, phase, entry


def listed_files(manifest: dict) -> set:
    """Every file of the set the manifest names (paths relative to the set), manifest.json included."""
    files = {MANIFEST_NAME}
    for _, _, entry in iter_phases(manifest):
        if "table" in entry:
            files.add(entry["table"]["path"])
        files.update(s["path"] for s in entry.get("webdataset", {}).get("shards", []))
        files.update(f["path"] for f in entry.get("zarr", {}).get("files", []))
    return files


def unlisted_files(root: str, manifest: dict) -> list:
    """Files under a local set that its manifest does not name (leftovers of a killed writer, say)."""
    listed, found = listed_files(manifest), []
    for folder, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if rel not in listed:
                found.append(rel)
    return sorted(found)
