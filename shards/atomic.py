"""Atomic file writes: a published file appears whole under its name, or not at all.

Every writer of the project (shards, manifests, checkpoints, evaluation parts, reports, plots) writes
under a temporary name beside the target and renames it into place; a failed write removes its
temporary file. Temporary names carry TEMP_MARK, so a publisher can tell leftovers of a killed
process from real files.
"""

import json
import os
import secrets
from contextlib import contextmanager, suppress

TEMP_MARK = ".partial-"


def temp_path(path: str) -> str:
    """A temporary name beside `path`, unique across processes and calls."""
    return f"{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"


def is_temp(name: str) -> bool:
    return TEMP_MARK in os.path.basename(name)


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
        remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
