"""Read and write `.npy` bytes without ever unpickling, with errors that say what is wrong."""

import functools
import io

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


@functools.lru_cache(maxsize=4096)
def _cached_layout(head: bytes):
    """(shape, order, dtype, data offset, data bytes) of a complete header. Shard members repeat a
    few headers, and numpy's parser compiles every one with ast.literal_eval."""
    shape, fortran, dtype, offset = parse_npy_header(io.BytesIO(head))
    return shape, "F" if fortran else "C", dtype, offset, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def npy_from_bytes(raw) -> np.ndarray:
    """Decode `.npy` bytes (or a memoryview) into an array viewing `raw` (no copy, no pickle)."""
    if raw[:8] == b"\x93NUMPY\x01\x00":  # format 1.0: the header length is in bytes 8-9
        shape, order, dtype, offset, expected = _cached_layout(bytes(raw[:10 + int.from_bytes(raw[8:10], "little")]))
    else:
        fp = io.BytesIO(raw[:1 << 16])  # the header is at most 64 KiB (format 2.0); the data is not copied
        shape, fortran, dtype, offset = parse_npy_header(fp)
        order, expected = "F" if fortran else "C", int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - offset
    if found < expected:
        raise NpyFormatError(f"truncated: header promises {expected} data bytes, found {found}")
    if found > expected:
        raise NpyFormatError(f"{found - expected} unexpected trailing bytes after the array data")
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize if dtype.itemsize else 0, offset=offset)
    return arr.reshape(shape, order=order)


def npy_parts(arr: np.ndarray) -> list:
    """Canonical `.npy` encoding (version 1.0, C order, little-endian) as [header bytes, data view]:
    written one after the other they are the file, and the data is never copied."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    return [header.getvalue(), memoryview(arr).cast("B")]

