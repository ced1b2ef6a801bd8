"""Read and write `.npy` bytes without ever unpickling, with errors that say what is wrong."""

import functools
import io
import os

import numpy as np


class NpyFormatError(ValueError):
    """The bytes are not a readable numeric `.npy` array; the message says why."""


def parse_npy_header(fp):
    """Read the header of an open `.npy` file: (shape, fortran_order, dtype, data_offset)."""
    try:
        version = np.lib.format.read_magic(fp)
    except ValueError:
        raise NpyFormatError("not a .npy file (bad magic bytes)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise NpyFormatError(f"unsupported .npy version {version[0]}.{version[1]}")
    except NpyFormatError:
        raise
    except Exception as e:  # numpy raises ValueError/SyntaxError on mangled headers
        raise NpyFormatError(f"unreadable .npy header ({e})") from None
    if dtype.hasobject:
        raise NpyFormatError(f"holds Python objects (dtype {dtype}); refusing to unpickle")
    return shape, fortran, dtype, fp.tell()


_LENGTH_FIELD = {b"\x93NUMPY\x01\x00": 2, b"\x93NUMPY\x02\x00": 4}  # magic + version -> bytes of the length


def header_length(raw) -> int | None:
    """Bytes of the whole header (magic, length field, dict) that `raw` starts with; None if `raw` is too
    short to say, or is not a format 1.0/2.0 header (the parser then says what is wrong)."""
    head = bytes(raw[:12])  # one small copy: slicing and comparing a memoryview twice cost more
    size = _LENGTH_FIELD.get(head[:8])
    if size is None or len(head) < 8 + size:
        return None
    return 8 + size + int.from_bytes(head[8:8 + size], "little")


def npy_layout(raw) -> tuple:
    """(shape, order, dtype, data offset, data bytes) of the `.npy` bytes `raw` starts with."""
    end = header_length(raw)
    if end is not None and end <= len(raw) and end <= 1 << 16:
        return _cached_layout(bytes(raw[:end]))
    return _layout(raw[:1 << 16])  # raises what is wrong


def read_npy_layout(path: str) -> tuple:
    """npy_layout of a file and its size in bytes, reading only its header (FileNotFoundError if absent)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        head = os.pread(fd, 4096, 0)
        end = header_length(head)
        if end is not None and end > len(head):
            head = os.pread(fd, min(end, 1 << 16), 0)
        return npy_layout(head), os.fstat(fd).st_size
    finally:
        os.close(fd)


def _layout(head) -> tuple:
    """(shape, order, dtype, data offset, data bytes) parsed from a header."""
    shape, fortran, dtype, offset = parse_npy_header(io.BytesIO(head))
    return shape, "F" if fortran else "C", dtype, offset, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


# Shard members and source files repeat a few headers, and numpy's parser compiles every one with
# ast.literal_eval: complete headers are parsed once.
_cached_layout = functools.lru_cache(maxsize=4096)(_layout)


def npy_from_bytes(raw) -> np.ndarray:
    """Decode `.npy` bytes (or a memoryview) into an array viewing `raw` (no copy, no pickle)."""
    shape, order, dtype, offset, expected = npy_layout(raw)
    found = len(raw) - offset
    if found < expected:
        raise NpyFormatError(f"truncated: header promises {expected} data bytes, found {found}")
    if found > expected:
        raise NpyFormatError(f"{found - expected} unexpected trailing bytes after the array data")
    return np.ndarray(shape, dtype, buffer=raw, offset=offset, order=order)  # one call: frombuffer + reshape


def npy_parts(arr: np.ndarray) -> list:
    """Canonical `.npy` encoding (version 1.0, C order, little-endian) as [header bytes, data view]:
    written one after the other they are the file, and the data is never copied."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return [_npy_header(arr.shape, arr.dtype), memoryview(arr).cast("B")]


@functools.lru_cache(maxsize=4096)
def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()

