"""Atomic file writes: a published file appears whole under its name, or not at all.

Every writer of the project (shards, manifests, checkpoints, evaluation parts, reports, plots) writes
under a temporary name beside the target and renames it into place; a failed write removes its
temporary file. Temporary names carry TEMP_MARK, so a publisher can tell leftovers of a killed
process from real files.
"""

import errno
import json
import os
import re
import secrets
from contextlib import contextmanager, suppress

TEMP_MARK = ".partial-"


def temp_path(path: str) -> str:
    """A temporary name beside `path`, unique across processes and calls."""
    return f"{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"


_TEMP_NAME = re.compile(r"\.partial-\d+-[0-9a-f]{6}$")  # what temp_path makes, and nothing else


def is_temp(name: str) -> bool:
    return _TEMP_NAME.search(os.path.basename(name)) is not None


def temp_files(folder: str, prefix: str = "") -> list:
    """Temporary files under `folder` (recursively) whose names start with `prefix`, sorted."""
    found = []
    for parent, _, files in os.walk(folder):
        found += [os.path.join(parent, n) for n in files if n.startswith(prefix) and is_temp(n)]
    return sorted(found)


def remove_dead_temps(folder: str, prefix: str = "") -> list:
    """Remove what killed writers left under `folder`. Call only while holding the folder's lock
    (shards.lock): then no live writer has a temporary file there. Returns the paths removed."""
    found = temp_files(folder, prefix)
    for path in found:
        remove_quietly(path)
    return found


def remove_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


@contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """`with atomic_write(path) as f: f.write(...)`: readers see the old file or the new one, never half.

    The folder is created if needed. On any exception (a full disk, say) the temporary file is removed
    and the exception propagates; `path` is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for, not the temporary one
        code, reason = e.errno, e.strerror or str(e)
        if code is None and disk_full(path):  # numpy's short writes say "4096 requested and 3040 written"
            code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        remove_quietly(tmp)
        raise OSError(code, reason, path) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def disk_full(path: str) -> bool:
    try:
        return os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        return False


def write_json_atomic(path: str, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
