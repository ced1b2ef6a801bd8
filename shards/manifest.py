"""manifest.json: the single index of a shard set, written last and atomically."""

import hashlib
import json
import os
import tempfile

from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "elr-shards"
FORMAT_VERSION = 1


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers see old or new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(shards_dir: str) -> dict:
    """Load and sanity-check `<shards_dir>/manifest.json`."""
    path = os.path.join(shards_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        hint = " (an interrupted build? run build-shards --resume)" if os.path.isdir(shards_dir + ".building") else ""
        raise ManifestError(f"{path}: no manifest; not a finished shard set{hint}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return manifest


def iter_phases(manifest: dict):
    """Yield (split, phase, phase_entry) in a fixed order."""
    for split in sorted(manifest["splits"]):
        for phase, entry in manifest["splits"][split].items():
            yield split, phase, entry

