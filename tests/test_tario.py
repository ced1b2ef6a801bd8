"""The mapped tar reader: same members as tarfile for USTAR, GNU and v7 archives; damaged headers named."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from shards.errors import ShardCorruptError
from shards.tario import forget_mapped_shards, iter_mapped_members, mapped_samples

MEMBERS = {
    "k000.json": b'{"label": 1}',
    "k000.lr_rgb.npy": bytes(range(256)) * 5,  # not a multiple of 512: the reader must skip the padding
    "k001.json": b"",  # empty member
    "deep/" * 20 + "k002.json": b"{}",  # 120 characters: USTAR stores it as prefix + name
}


def write_tar(path, fmt, members=MEMBERS):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: skipped
    return path


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_members_equal_tarfiles(tmp_path, fmt):
    members = MEMBERS if fmt == tarfile.USTAR_FORMAT else {k: v for k, v in MEMBERS.items() if len(k) <= 100}
    path = write_tar(str(tmp_path / "a.tar"), fmt, members)
    got = [(name, bytes(view)) for name, view in iter_mapped_members(path, "a.tar")]
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert got == expected == list(members.items())


def test_v7_header_goes_through_tarfile(tmp_path):
    path = str(tmp_path / "v7.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    data = bytearray(open(path, "rb").read())
    data[257:265] = bytes(8)  # no magic: a pre-POSIX (v7) header
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + 256 + sum(data[156:512]))
    open(path, "wb").write(bytes(data))
    assert [(n, bytes(v)) for n, v in iter_mapped_members(path, "v7.tar")] == [("k.json", b"{}")]


def test_bad_checksum_is_named(tmp_path):
    path = write_tar(str(tmp_path / "b.tar"), tarfile.USTAR_FORMAT)
    data = bytearray(open(path, "rb").read())
    data[512 * 2 + 3] ^= 0x20  # a letter of the second member's name
    open(path, "wb").write(bytes(data))
    with pytest.raises(ShardCorruptError) as e:
        list(iter_mapped_members(path, "b.tar"))
    assert str(e.value) == "b.tar: truncated or not a tar file (bad header at byte 1024: bad checksum)"


def test_mapped_samples_skip_take_and_a_rewritten_shard_is_read_again(tmp_path):
    members = {f"k{i:03d}.{f}": f"{i}{f}".encode() for i in range(5) for f in ("json", "lr_rgb.npy")}
    path = write_tar(str(tmp_path / "c.tar"), tarfile.USTAR_FORMAT, members)
    as_bytes = lambda samples: [{k: v if k == "__key__" else bytes(v) for k, v in s.items()} for s in samples]  # noqa: E731
    every = as_bytes(mapped_samples(path, "c.tar"))
    assert [s["__key__"] for s in every] == [f"k{i:03d}" for i in range(5)]
    assert every[3] == {"__key__": "k003", "json": b"3json", "lr_rgb.npy": b"3lr_rgb.npy"}
    assert as_bytes(mapped_samples(path, "c.tar", skip=1, take=2)) == every[1:3]
    assert as_bytes(mapped_samples(path, "c.tar", skip=4)) == every[4:]
    from shards.tario import _mapped_shard
    table = _mapped_shard(path, "c.tar")[2]  # what a process keeps per shard: arrays, ~60 bytes a sample
    assert table.rows is None and table.spans.dtype == np.uint32 and table.spans.shape == (5, 2, 2)
    assert table.keys.dtype.kind == "S" and len(table) == 5
    uneven = write_tar(str(tmp_path / "e.tar"), tarfile.USTAR_FORMAT, {"a.json": b"1", "a.x": b"2", "b.json": b"3"})
    assert _mapped_shard(uneven, "e.tar")[2].rows is not None  # samples with other fields keep their dicts
    assert as_bytes(mapped_samples(uneven, "e.tar", skip=1)) == [{"__key__": "b", "json": b"3"}]
    # the writer replaces shards by rename: a new file at the same path is parsed again, not served from the table
    rewritten = write_tar(str(tmp_path / "d.tar"), tarfile.USTAR_FORMAT, {"z.json": b"{}"})
    os.replace(rewritten, path)
    assert as_bytes(mapped_samples(path, "c.tar")) == [{"__key__": "z", "json": b"{}"}]
    forget_mapped_shards()  # maps and tables dropped: the next read maps and parses again
    assert as_bytes(mapped_samples(path, "c.tar")) == [{"__key__": "z", "json": b"{}"}]


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def sample_members(arrays: dict) -> dict:
    """k000.. samples: metadata and the given (units, D) arrays per stream."""
    members = {}
    for i, (lr, hr) in enumerate(zip(arrays["lr_rgb"], arrays["hr_rgb"])):
        members.update({f"k{i:03d}.json": b'{"label": %d}' % i,
                        f"k{i:03d}.lr_rgb.npy": npy_bytes(lr), f"k{i:03d}.hr_rgb.npy": npy_bytes(hr)})
    return members


def as_compared(samples):
    return [(s["__key__"], s["meta"], [(f, s[f].dtype.str, s[f].tolist()) for f in ("lr_rgb", "hr_rgb")])
            for s in samples]


@pytest.mark.parametrize("odd_one", [None, "float16", "fortran", "3-d"])
def test_decoded_samples_equal_decode_sample_on_the_fast_path_and_off_it(tmp_path, odd_one):
    """A shard whose stream members share one .npy layout gets its arrays from the table's spans; one
    member with another layout sends that stream back to reading every header: the same samples both ways."""
    from shards.tario import _mapped_shard, decode_sample, iter_decoded_samples

    rng = np.random.default_rng(3)
    arrays = {f: [rng.standard_normal((units, 8)).astype(np.float32) for units in (1, 4, 2, 7, 3)]
              for f in ("lr_rgb", "hr_rgb")}
    if odd_one:
        a = arrays["lr_rgb"][2]
        arrays["lr_rgb"][2] = {"float16": a.astype(np.float16), "fortran": np.asfortranarray(a),
                               "3-d": a.reshape(2, 1, 8)}[odd_one]
    path = write_tar(str(tmp_path / "s.tar"), tarfile.USTAR_FORMAT, sample_members(arrays))
    fields = ("lr_rgb", "hr_rgb")
    for skip, take in [(0, None), (1, 3), (4, 1)]:
        expected = [decode_sample(raw, "s.tar", fields) for raw in mapped_samples(path, "s.tar", skip, take)]
        got = list(iter_decoded_samples(path, skip, take, fields=fields))
        assert as_compared(got) == as_compared(expected) and len(got) == len(arrays["lr_rgb"][skip:][:take])
        assert all(not s["lr_rgb"].flags.writeable for s in got)  # views of the read-only map
    table = _mapped_shard(path, path)[2]
    assert table._arrays["hr_rgb.npy"] == (128, np.dtype("<f4"), 8)  # fast path
    assert table._arrays["lr_rgb.npy"] == (None if odd_one else (128, np.dtype("<f4"), 8))


def test_kept_samples_are_decoded_once_within_the_budget_and_equal_a_fresh_decode(tmp_path, monkeypatch):
    """keep=True hands out the same sample objects on later reads, up to the process cache's budget; past
    it samples are decoded afresh; a rewritten shard and forget_mapped_shards give the room back."""
    from shards import tario
    from shards.mapcache import SHARD_CACHE

    forget_mapped_shards()  # other tests' kept samples out of the count
    monkeypatch.setattr(SHARD_CACHE, "max_decoded", 3)
    fields = ("lr_rgb", "hr_rgb")
    rng = np.random.default_rng(5)
    path = write_tar(str(tmp_path / "s.tar"), tarfile.USTAR_FORMAT, sample_members(
        {f: [rng.standard_normal((units, 8)).astype(np.float32) for units in (1, 4, 2, 7, 3)] for f in fields}))

    first = list(tario.iter_decoded_samples(path, 1, 3, fields=fields, keep=True))
    assert [s["__key__"] for s in first] == ["k001", "k002", "k003"] and SHARD_CACHE.decoded == 3
    again = list(tario.iter_decoded_samples(path, fields=fields, keep=True))
    fresh = list(tario.iter_decoded_samples(path, fields=fields))
    assert as_compared(again) == as_compared(fresh) and len(again) == 5
    assert [a is b for a, b in zip(again, [None, *first, None])] == [False, True, True, True, False]
    assert all(a is not b for a, b in zip(fresh, again))  # keep=False never hands out kept samples
    assert SHARD_CACHE.decoded == 3  # the budget was full: k000 and k004 were not kept

    other = {f: [np.full((units, 8), 9.0, np.float32) for units in (2, 2, 5)] for f in fields}
    write_tar(path, tarfile.USTAR_FORMAT, sample_members(other))  # rewritten: another size
    rewritten = list(tario.iter_decoded_samples(path, fields=fields, keep=True))
    assert [s["lr_rgb"].shape[0] for s in rewritten] == [2, 2, 5] and all((s["hr_rgb"] == 9).all() for s in rewritten)
    assert SHARD_CACHE.decoded == 3  # the old table's three given back, the new one's kept
    assert all(a is b for a, b in zip(rewritten, tario.iter_decoded_samples(path, fields=fields, keep=True)))
    forget_mapped_shards()
    assert SHARD_CACHE.decoded == 0


@pytest.mark.parametrize("text", [b'{"label": 3, "video": "v\\u00e9"}', b' {"label": 3}\n', b"[1, 2]", b"7",
                                  '{"label": 3}'.encode("utf-16"), '\ufeff{"a": "\u00e9"}'.encode()])
def test_metadata_decodes_as_json_loads(text):
    from shards.tario import decode_meta

    assert decode_meta(memoryview(text), "s.tar", "k") == json.loads(text)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "s.tar: key k001: lr_rgb: truncated: header promises 128 data bytes, found 64"),
    ("metadata", "s.tar: key k001: unreadable metadata (Expecting value: line 1 column 1 (char 0))"),
])
def test_decoded_samples_name_a_damaged_member(tmp_path, damage, message):
    from shards.tario import iter_decoded_samples

    arrays = {f: [np.ones((units, 8), np.float32) for units in (2, 4, 3)] for f in ("lr_rgb", "hr_rgb")}
    members = sample_members(arrays)
    if damage == "truncated":
        members["k001.lr_rgb.npy"] = members["k001.lr_rgb.npy"][:128 + 64]
    else:
        members["k001.json"] = b"not json"
    path = write_tar(str(tmp_path / "s.tar"), tarfile.USTAR_FORMAT, members)
    got = iter_decoded_samples(path, fields=("lr_rgb", "hr_rgb"))
    assert next(got)["__key__"] == "k000"  # samples before the damaged one are delivered
    with pytest.raises(ShardCorruptError) as e:
        next(got)
    assert str(e.value).replace(path, "s.tar") == message


def test_writer_publishes_on_a_clean_with_exit_and_leaves_nothing_on_an_error(tmp_path):
    import numpy as np

    from shards.schema import STREAMS
    from shards.tario import iter_tar_samples
    from shards.tarwrite import TarShardWriter

    arrays = {s: np.ones((2, 4), np.float32) * i for i, s in enumerate(STREAMS)}
    with TarShardWriter(str(tmp_path / "a.tar")) as w:
        offset, size = w.write("k0", arrays, {"label": 0, "units": 2})
    assert os.listdir(tmp_path) == ["a.tar"] and os.path.getsize(tmp_path / "a.tar") == 10240  # one tar record
    assert (offset, size) == (0, 5 * 1024)  # five members, each one header block and one data block
    assert [s["__key__"] for s in iter_tar_samples(str(tmp_path / "a.tar"))] == ["k0"]
    with pytest.raises(RuntimeError):
        with TarShardWriter(str(tmp_path / "b.tar")) as w:
            w.write("k0", arrays, {"label": 0, "units": 2})
            raise RuntimeError("the task failed")
    assert os.listdir(tmp_path) == ["a.tar"]


@pytest.mark.parametrize("name", ["a", "v0123456789abcdef0123.hr_rgb.npy", "x" * 100, "d" * 60 + "/" + "x" * 60, "é" * 40])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456_789, 8 ** 11 - 1])
def test_member_headers_are_the_ones_tarfile_writes(name, size):
    from shards.tarwrite import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    if size == 8 ** 11 - 1:  # the largest a USTAR member can be, as tarfile says
        with pytest.raises(ValueError, match="^overflow in number field$"):
            ustar_header(name, size + 1)
