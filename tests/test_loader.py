"""Streaming loaders: equal steps per rank on uneven shards, shuffling, resume position, HTTP streaming."""

import os
from collections import Counter

import numpy as np
import torch
import pytest

from elr.data import LR, TRAIN_INPUTS, ShardStream, StepLoader, StreamPlan, input_fields, merge_to_device
from elr.data import phase_shards
from shards.manifest import load_manifest, manifest_digest
from shards.tario import decode_sample, iter_raw_samples
from shards.schema import STREAMS
from shards.tarwrite import TarShardWriter


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Real tar shards of 1, 9, 2, 14 and 5 videos (31 in all), lengths 1..12 units."""
    folder = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    shards, n = [], 0
    for i, count in enumerate((1, 9, 2, 14, 5)):
        path = str(folder / f"s-{i}.tar")
        with TarShardWriter(path) as w:
            for _ in range(count):
                t = int(rng.integers(1, 13))
                arrays = {s: rng.standard_normal((t, 4)).astype(np.float32) for s in STREAMS}
                w.write(f"k{n:03d}", arrays, {"label": n % 3, "units": t})
                n += 1
            w.close()
        shards.append((path, count))
    return shards


def run_rank(plan, rank, world, workers, epoch=0, step=0, seed=0):
    ds = ShardStream(plan, rank, world, LR, seed, buffer=8)
    ds.set_position(epoch, step)
    return [group for group in StepLoader(ds, workers)]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (4, 1)])
def test_equal_steps_per_rank_and_every_video_seen(uneven_shards, world, workers):
    plan = StreamPlan(uneven_shards, n_streams=4, micro_batch=3)
    assert plan.n_samples == 31 and plan.steps_per_epoch == 3  # ceil(ceil(31 / 4) / 3)
    per_rank = [run_rank(plan, r, world, workers) for r in range(world)]
    assert [len(steps) for steps in per_rank] == [3] * world
    keys = Counter(k for steps in per_rank for group in steps for mb in group for k in mb["keys"])
    assert set(keys) == {f"k{i:03d}" for i in range(31)}
    slots = 3 * 4 * 3  # steps x streams x micro-batch
    assert sum(keys.values()) == slots and sum(n - 1 for n in keys.values()) == slots - 31  # only rounding repeats
    for steps in per_rank:
        for group in steps:
            assert all(len(mb["keys"]) == 3 for mb in group)


def test_step_content_does_not_depend_on_world_size(uneven_shards):
    plan = StreamPlan(uneven_shards, n_streams=4, micro_batch=3)
    one = run_rank(plan, 0, 1, 2)
    two = [run_rank(plan, r, 2, 1) for r in range(2)]
    for s in range(plan.steps_per_epoch):
        joined = {k for r in range(2) for mb in two[r][s] for k in mb["keys"]}
        assert joined == {k for mb in one[s] for k in mb["keys"]}


def test_epochs_reshuffle_and_runs_repeat(uneven_shards):
    plan = StreamPlan(uneven_shards, n_streams=2, micro_batch=4)
    order = lambda steps: [k for group in steps for mb in group for k in mb["keys"]]  # noqa: E731
    e0, e0_again, e1 = order(run_rank(plan, 0, 1, 0)), order(run_rank(plan, 0, 1, 2)), order(run_rank(plan, 0, 1, 0, epoch=1))
    assert e0 == e0_again and e0 != e1 and sorted(set(e0)) == sorted(set(e1))


def test_resume_position_skips_exactly(uneven_shards):
    plan = StreamPlan(uneven_shards, n_streams=2, micro_batch=2)
    full = run_rank(plan, 0, 1, 2, epoch=3)
    tail = run_rank(plan, 0, 1, 2, epoch=3, step=5)
    assert [g[0]["step"] for g in tail] == list(range(5, plan.steps_per_epoch))
    for a, b in zip(full[5:], tail):
        for x, y in zip(a, b):
            assert x["keys"] == y["keys"]
            np.testing.assert_array_equal(np.concatenate(x["lr_rgb"]), np.concatenate(y["lr_rgb"]))  # the samples' views


@pytest.mark.parametrize("workers", [0, 2])
def test_merged_step_stacks_lr_then_hr_exactly(uneven_shards, workers):
    """The coupled step: each input holds every video's LR units end to end, then its HR units; no padding.
    In-process (0) the step is copied from the shard maps; with workers, from their collated blocks."""
    inputs = TRAIN_INPUTS["lr+hr"]
    assert input_fields(inputs) == ("lr_rgb", "lr_flow", "hr_rgb", "hr_flow")
    plan = StreamPlan(uneven_shards, n_streams=2, micro_batch=4)
    ds = ShardStream(plan, 0, 1, input_fields(inputs), 0, buffer=4)
    group = next(iter(StepLoader(ds, workers)))
    batch = merge_to_device(group, inputs, "cpu")
    source = {s["__key__"]: s for url, _ in uneven_shards for s in (decode_sample(r, url, STREAMS)
                                                                      for r in iter_raw_samples(url))}
    keys = [k for mb in group for k in mb["keys"]]
    lengths = [source[k]["lr_rgb"].shape[0] for k in keys]
    assert batch["rgb"].shape == batch["flow"].shape == (2 * sum(lengths), 4)
    assert batch["lengths"].tolist() == 2 * lengths
    assert batch["labels"].tolist() == 2 * [source[k]["meta"]["label"] for k in keys]
    for name, (lr, hr) in inputs.items():
        expected = np.concatenate([source[k][lr] for k in keys] + [source[k][hr] for k in keys])
        np.testing.assert_array_equal(batch[name].numpy(), expected)


def test_arena_ring_wraps_and_waits_for_frees():
    from elr.arena import Arena

    ring = Arena(1000)
    a = ring.reserve(400)
    assert a == (0, 400)
    ring.commit(a[1])
    b = ring.reserve(400)
    assert b == (448, 848)  # aligned to 64 bytes
    ring.commit(b[1])
    assert ring.reserve(400) is None  # would wrap onto the unfreed first block
    ring.free(a[1])
    c = ring.reserve(400)
    assert c == (0, 1400)  # wrapped: the tail of the ring is skipped
    ring.commit(c[1])
    assert ring.reserve(1001) is None and not ring.idle()
    ring.free(b[1]), ring.free(c[1])
    assert ring.idle()


@pytest.mark.parametrize("arena_bytes", [None, 600])
def test_worker_arenas_hand_over_exactly_the_in_process_steps(uneven_shards, arena_bytes):
    """Workers write micro-batches into shared rings the trainer frees after each step. In a ring of
    600 bytes the larger micro-batches never fit and take the ordinary DataLoader path; over two
    epochs every merged step equals the in-process one exactly."""
    from elr.data import DevicePrefetcher, Rings

    inputs = TRAIN_INPUTS["lr+hr"]
    plan = StreamPlan(uneven_shards, n_streams=2, micro_batch=2)
    ds = ShardStream(plan, 0, 1, input_fields(inputs), 0, buffer=4)
    for epoch in (0, 1):
        ds.set_position(epoch)
        expected = [batch for _, batch in DevicePrefetcher(StepLoader(ds, 0), inputs, "cpu")]
        loader = StepLoader(ds, 2, arena_bytes=arena_bytes, handoff="arena")  # the CUDA default
        assert type(loader.handoff) is Rings and len(loader.handoff.arenas) == 2
        paths, merged = Counter(), []
        for group in loader:
            in_arena = ["ring" in mb for mb in group]
            paths.update("arena" if a else "copy" for a in in_arena)
            merged.append(merge_to_device(group, inputs, "cpu"))
            loader.release(group)
            assert ["lr_rgb" not in mb for mb in group] == in_arena  # freed blocks cannot be read by mistake
        assert len(merged) == len(expected) == plan.steps_per_epoch
        for got, want in zip(merged, expected):
            for name in ("rgb", "flow", "lengths", "labels"):
                assert torch.equal(got[name], want[name])
        assert all(a.idle() for a in loader.handoff.arenas)
        if arena_bytes:
            assert paths["arena"] >= 1 and paths["copy"] >= 1
        else:
            assert paths == {"arena": 2 * plan.steps_per_epoch}


@pytest.mark.parametrize("workers", [1, 2])
def test_span_handoff_gives_the_in_process_steps_read_from_the_trainers_own_maps(uneven_shards, workers):
    """The CPU default for workers: they send where each video lies (file, offset, units), no bytes and no
    rings; the trainer views its own maps of the same files. Two epochs and a resumed one equal the
    in-process steps exactly."""
    from elr.data import DevicePrefetcher, Places

    inputs = TRAIN_INPUTS["lr+hr"]
    plan = StreamPlan(uneven_shards, n_streams=2, micro_batch=2)
    ds = ShardStream(plan, 0, 1, input_fields(inputs), 0, buffer=4)
    loader = StepLoader(ds, workers)
    assert type(loader.handoff) is Places and loader.handoff.arenas == []  # nothing to allocate in shared memory
    for epoch, step in ((0, 0), (1, 0), (1, 2)):
        ds.set_position(epoch, step)
        expected = [batch for _, batch in DevicePrefetcher(StepLoader(ds, 0), inputs, "cpu")]
        got = []
        for group in loader:
            assert all(isinstance(a, np.ndarray) and not a.flags.writeable  # a view of a read-only map
                       for mb in group for f in input_fields(inputs) for a in mb[f])
            got.append(merge_to_device(group, inputs, "cpu"))
        assert len(got) == len(expected) == plan.steps_per_epoch - step
        for a, b in zip(got, expected):
            for name in ("rgb", "flow", "lengths", "labels"):
                assert torch.equal(a[name], b[name])


def test_span_handoff_copies_videos_it_cannot_place_and_keeps_step_order(uneven_shards, tmp_path):
    """A shard whose members have another layout (Fortran order here) is decoded header by header and
    its videos carry no place: their micro-batches are copied through the DataLoader, beside placed ones,
    and the steps still equal the in-process ones in order."""
    import io
    import json
    import tarfile
    from elr.data import DevicePrefetcher

    rng = np.random.default_rng(1)
    odd = str(tmp_path / "fortran.tar")
    with tarfile.open(odd, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(7):
            units = int(rng.integers(2, 9))
            members = {"json": json.dumps({"label": i % 3, "units": units}).encode()}
            for stream in STREAMS:
                buf = io.BytesIO()
                np.save(buf, np.asfortranarray(rng.standard_normal((units, 4)).astype(np.float32)))
                members[f"{stream}.npy"] = buf.getvalue()
            for field, data in members.items():
                info = tarfile.TarInfo(f"f{i:03d}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    inputs = TRAIN_INPUTS["lr+hr"]
    plan = StreamPlan(uneven_shards + [(odd, 7)], n_streams=2, micro_batch=2)
    ds = ShardStream(plan, 0, 1, input_fields(inputs), 0, buffer=4)
    expected = [batch for _, batch in DevicePrefetcher(StepLoader(ds, 0), inputs, "cpu")]
    kinds, got = Counter(), []
    for group in StepLoader(ds, 2):
        kinds.update("copied" if isinstance(mb["lr_rgb"], torch.Tensor) else "placed" for mb in group)
        got.append(merge_to_device(group, inputs, "cpu"))
    assert kinds["copied"] >= 1 and kinds["placed"] >= 1
    assert len(got) == len(expected) == plan.steps_per_epoch
    for a, b in zip(got, expected):
        for name in ("rgb", "flow", "lengths", "labels"):
            assert torch.equal(a[name], b[name])


def test_a_shard_rewritten_between_worker_and_trainer_is_named(tmp_path):
    from shards.tario import iter_decoded_samples, mapped_bytes, forget_mapped_shards
    from shards.errors import ShardCorruptError

    path = str(tmp_path / "s.tar")
    for units in (3, 5):  # the second file replaces the first by rename, as build-shards does
        with TarShardWriter(path + ".new") as w:
            w.write("k000", {s: np.ones((units, 4), np.float32) for s in STREAMS}, {"label": 0})
            w.close()
        if units == 3:
            os.replace(path + ".new", path)
            file, offsets = next(iter_decoded_samples(path, fields=LR))["__at__"]  # what a worker sends
            assert mapped_bytes(file)[offsets[0]:offsets[0] + 12 * 4].view(np.float32).tolist() == [1.0] * 12
    os.replace(path + ".new", path)
    forget_mapped_shards()  # a trainer that had not mapped it yet
    with pytest.raises(ShardCorruptError) as e:
        mapped_bytes(file)
    assert str(e.value) == f"{path}: rewritten while it was being read"


def test_bucketing_keeps_padding_small(uneven_shards):
    from elr.data import padding_fraction

    plan = StreamPlan(uneven_shards, n_streams=1, micro_batch=4)
    bucketed = list(StepLoader(ShardStream(plan, 0, 1, LR, 0, buffer=8, bucket=True), 0))
    shuffled = list(StepLoader(ShardStream(plan, 0, 1, LR, 0, buffer=8), 0))  # the default: same window, unsorted
    mean = lambda steps: np.mean([padding_fraction(g) for g in steps])  # noqa: E731
    assert mean(bucketed) < mean(shuffled)
    keys = lambda steps: sorted(k for g in steps for mb in g for k in mb["keys"])  # noqa: E731
    assert keys(bucketed) == keys(shuffled)  # the same videos, grouped otherwise


@pytest.fixture
def http_root(built, http_server):
    return http_server(built).url


def test_streaming_from_http_equals_local(built, http_root):
    """A rank reads no sample table up front: a remote shard's spans come from its own rows, when first read."""
    local_m, remote_m = load_manifest(str(built)), load_manifest(http_root, samples=False)
    assert manifest_digest(local_m) == manifest_digest(remote_m) and "samples" not in remote_m["splits"]["Split1"]["Train"]
    local = StreamPlan(phase_shards(local_m, str(built), "Split1", ["Train"]), 2, 3)
    remote = StreamPlan(phase_shards(remote_m, http_root, "Split1", ["Train"]), 2, 3)
    first = remote.shards[0]
    assert first.url.startswith("http://127.0.0.1:") and first.spans is None
    assert first.sample_spans() == local.shards[0].spans and len(first.sample_spans()) == first.samples
    a, b = run_rank(local, 0, 1, 0), run_rank(remote, 0, 1, 2)
    assert len(a) == len(b) == 3
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert x["keys"] == y["keys"]
            np.testing.assert_array_equal(np.concatenate(x["lr_flow"]), y["lr_flow"].numpy())  # samples / block


def test_float16_shards_stay_float16_until_normalised_in_float32(tmp_path):
    """Float16 storage halves what the loader copies and moves; the units are normalised in float32."""
    from elr.model import normalise_units

    rng, path, source = np.random.default_rng(1), str(tmp_path / "half.tar"), {}
    with TarShardWriter(path) as w:
        for i in range(5):
            t = int(rng.integers(1, 6))
            source[f"h{i}"] = {s: (rng.random((t, 4)) * 60).astype(np.float16) for s in STREAMS}
            w.write(f"h{i}", source[f"h{i}"], {"label": i % 2, "units": t})
        w.close()
    inputs = TRAIN_INPUTS["lr+hr"]
    ds = ShardStream(StreamPlan([(path, 5)], n_streams=1, micro_batch=5), 0, 1, input_fields(inputs), 0)
    group = next(iter(StepLoader(ds, 0)))
    batch = merge_to_device(group, inputs, "cpu")
    keys = group[0]["keys"]
    expected = np.concatenate([source[k]["lr_rgb"] for k in keys] + [source[k]["hr_rgb"] for k in keys])
    assert batch["rgb"].dtype == torch.float16
    np.testing.assert_array_equal(batch["rgb"].numpy(), expected)
    normalised = normalise_units(batch["rgb"], inplace=True)
    wide = expected.astype(np.float32)
    assert normalised.dtype == torch.float32
    np.testing.assert_allclose(normalised.numpy(), wide / np.linalg.norm(wide, axis=1, keepdims=True), rtol=1e-6)


def test_long_lived_frozen_hides_what_exists_from_collections_only_within_the_block():
    import gc
    import weakref

    from shards.memory import long_lived_frozen

    class Node:
        pass

    def cycle():  # garbage only a collection frees
        node = Node()
        node.self = node
        return weakref.ref(node)

    setup = [Node() for _ in range(1000)]
    gc.disable()  # no automatic collection between the steps below
    try:
        before = cycle()
        with long_lived_frozen():
            assert gc.get_freeze_count() >= len(setup)
            inside = cycle()
            gc.collect()
            assert inside() is None  # garbage made inside is collected
            assert before() is not None  # frozen with everything else until the block ends
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert before() is None
    finally:
        gc.enable()
