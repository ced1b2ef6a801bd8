"""Checkpoints: written atomically, loaded without unpickling, every failure one line naming the file."""

import io
import pickle
import zipfile

import torch

from shards.atomic import atomic_write
from shards.errors import ELRError


class CheckpointError(ELRError):
    """A checkpoint that cannot be read, or that belongs to another run, model or shard set."""


def save_checkpoint(path: str, state: dict) -> None:
    """Serialise in memory, then write with plain file I/O: a full disk is an OSError naming the file
    (torch.save straight to disk reports it as an `inline_container.cc` enforce failure), and the
    previous checkpoint stays until the new one is whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: str) -> dict:
    """A checkpoint's dict of tensors and plain values (weights_only: nothing is unpickled)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    except PermissionError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (empty, cut off or another format: {reason})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(blob).__name__}, expected a dict)")
    return blob
