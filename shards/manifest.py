"""manifest.json: the single index of a shard set, written last and atomically, validated on load."""

import hashlib
import json
import os

from . import remote
from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "elr-shards"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")


def file_sha256(path: str, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The identity of a shard set's content: checkpoints and evaluation parts record it."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def load_manifest(root: str) -> dict:
    """The validated manifest of a shard set: a local folder or any fsspec URL (http(s)://, s3://...).

    Anything malformed is one ManifestError naming the file and the field."""
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
    return manifest


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
    _check(m.get("format") == FORMAT_NAME and m.get("format_version") == FORMAT_VERSION, path,
           f"format {m.get('format')!r} version {m.get('format_version')!r}, expected {FORMAT_NAME!r} "
           f"version {FORMAT_VERSION}")
    classes = m.get("classes")
    _check(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
           and len(set(classes)) == len(classes), path, f'"classes" must be a non-empty list of distinct names, found {classes!r:.80}')
    _check(_is_int(m.get("dim"), 1), path, f'"dim" must be a positive integer, found {m.get("dim")!r}')
    _check(m.get("dtype") in DTYPES, path, f'"dtype" must be one of {", ".join(DTYPES)}, found {m.get("dtype")!r}')
    _check(isinstance(m.get("options"), dict) and isinstance(m["options"].get("formats"), list), path,
           '"options" must be an object with a "formats" list')
    _check(isinstance(m.get("source"), dict), path, '"source" must be an object')
    splits = m.get("splits")
    _check(isinstance(splits, dict) and splits, path, '"splits" must be a non-empty object')
    for split, phases in splits.items():
        _check(isinstance(phases, dict) and phases, path, f'splits.{split} must be a non-empty object of phases')
        for phase, entry in phases.items():
            _validate_phase(entry, f"splits.{split}.{phase}", len(classes), path)


def _validate_phase(entry, where: str, n_classes: int, path: str) -> None:
    _check(isinstance(entry, dict), path, f"{where} must be an object")
    samples = entry.get("samples")
    _check(isinstance(samples, list) and isinstance(entry.get("skipped"), list), path,
           f'{where} needs "samples" and "skipped" lists')
    for i, s in enumerate(samples):
        _check(isinstance(s, dict) and isinstance(s.get("key"), str) and _is_int(s.get("label"))
               and s["label"] < n_classes and _is_int(s.get("units"), 1)
               and isinstance(s.get("class"), str) and isinstance(s.get("video"), str), path,
               f"{where}.samples[{i}] needs a key, a label in 0..{n_classes - 1}, units >= 1, class and video; "
               f"found {s!r:.120}")
    if "webdataset" in entry:
        shards = entry["webdataset"].get("shards") if isinstance(entry["webdataset"], dict) else None
        _check(isinstance(shards, list), path, f'{where}.webdataset needs a "shards" list')
        for i, s in enumerate(shards):
            _check(isinstance(s, dict) and _is_relative(s.get("path")) and _is_int(s.get("samples"))
                   and _is_int(s.get("bytes")) and isinstance(s.get("sha256"), str), path,
                   f"{where}.webdataset.shards[{i}] needs a relative path, samples, bytes and sha256; found {s!r:.120}")
    if "zarr" in entry:
        z = entry["zarr"]
        _check(isinstance(z, dict) and _is_relative(z.get("path")) and isinstance(z.get("files"), list)
               and all(isinstance(f, dict) and _is_relative(f.get("path")) and _is_int(f.get("bytes"))
                       for f in z["files"]), path, f'{where}.zarr needs a relative path and a "files" list')


def iter_phases(manifest: dict):
    """Yield (split, phase, phase_entry) in a fixed order."""
    for split in sorted(manifest["splits"]):
        for phase, entry in manifest["splits"][split].items():
            yield split, phase, entry


def listed_files(manifest: dict) -> set:
    """Every file of the set the manifest names (paths relative to the set), manifest.json included."""
    files = {MANIFEST_NAME}
    for _, _, entry in iter_phases(manifest):
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
