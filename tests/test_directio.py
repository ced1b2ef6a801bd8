"""DirectFile: exact bytes and hashes around the staging buffer's and O_DIRECT's alignment edges."""

import errno
import fcntl
import hashlib
import os

import numpy as np
import pytest

from shards.directio import ALIGN, BLOCK, DirectFile, write_file_atomic

PIECES = [0, 1, 511, ALIGN, ALIGN + 1, BLOCK - 3, BLOCK + 5, 2 * BLOCK, 7]


@pytest.mark.parametrize("direct", [True, False])
def test_pieces_are_written_exactly(tmp_path, direct):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in PIECES]
    path = str(tmp_path / "f.bin")
    f = DirectFile(path, direct)
    flags = fcntl.fcntl(f.fd, fcntl.F_GETFL)
    if direct and f.direct:  # asked and granted: the file really is open with O_DIRECT
        assert flags & os.O_DIRECT
    elif direct:  # asked and refused: only where the filesystem refuses O_DIRECT itself
        with pytest.raises(OSError):
            os.close(os.open(str(tmp_path / "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    else:
        assert f.direct is False and not flags & os.O_DIRECT
    for p in pieces:
        f.write(p)
    f.close()
    expected = b"".join(pieces)
    assert open(path, "rb").read() == expected
    assert f.nbytes == len(expected) == os.path.getsize(path)
    assert f.sha256.hexdigest() == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("size", [0, 100, ALIGN, 3 * ALIGN + 17])
def test_small_files_and_array_buffers(tmp_path, size):
    data = np.arange(size, dtype=np.uint8)  # any buffer, not only bytes
    info = write_file_atomic(str(tmp_path / "a.bin"), data)
    assert open(tmp_path / "a.bin", "rb").read() == data.tobytes()
    assert info == {"bytes": size, "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_file_atomic(str(tmp_path / "b.bin"), "not a buffer")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_in_the_writer_thread_is_raised(tmp_path):
    f = DirectFile("/dev/full", direct=False)  # every write fails: ENOSPC
    with pytest.raises(OSError) as err:
        for _ in range(3):
            f.write(bytes(BLOCK))  # the first full block goes to the writer thread
        f.close()
    assert err.value.errno == errno.ENOSPC
    f.abandon()
    assert f.fd == -1
