"""C3D against plain conv3d arithmetic, its weights file checks, and optical flow on known shifts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ingest.c3d.network import C3D, CONVS, WeightsError, load_c3d
from ingest.videos.flow import CV_METHODS, FlowMethodError, cv_flow_function, flow_to_image


def known_state_dict(seed=0):
    """c3d-pytorch's keys and shapes with small seeded weights."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (cin, cout) in CONVS.items():
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, 3, generator=g) * (2 / (cin * 27)) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01
    for name, (cin, cout) in {"fc6": (8192, 4096), "fc8": (4096, 487)}.items():  # fc7, fc8: optional, ignored
        state[f"{name}.weight"] = torch.randn(cout, cin, generator=g) * (2 / cin) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01
    return state


def reference_fc6(state, x, pool5="caffe"):
    """C3D's fc6 for x (B, 3, 16, 112, 112), from the C3D paper's layer list with plain functional ops.
    pool5 "caffe": Caffe's ceil-mode windows over 7 rows (0-1, 2-3, 4-5, 6); "port": c3d-pytorch's
    one-pixel padding (-1-0, 1-2, 3-4, 5-6)."""
    def conv(h, name):
        return F.relu(F.conv3d(h, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))

    h = F.max_pool3d(conv(x, "conv1"), kernel_size=(1, 2, 2), stride=(1, 2, 2))
    h = F.max_pool3d(conv(h, "conv2"), kernel_size=2, stride=2)
    h = F.max_pool3d(conv(conv(h, "conv3a"), "conv3b"), kernel_size=2, stride=2)
    h = F.max_pool3d(conv(conv(h, "conv4a"), "conv4b"), kernel_size=2, stride=2)
    h = conv(conv(h, "conv5a"), "conv5b")
    assert h.shape[-2:] == (7, 7)
    if pool5 == "caffe":  # Caffe's pooling: ceil((7 - 2) / 2) + 1 = 4 windows, the last one row 6 alone
        h = torch.stack([torch.stack([h[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax((-3, -2, -1))
                                      for j in range(4)], -1) for i in range(4)], -2)[:, :, None]
    else:
        h = F.max_pool3d(h, kernel_size=2, stride=2, padding=(0, 1, 1))
    assert h.shape[1:] == (512, 1, 4, 4)
    return F.relu(F.linear(h.reshape(len(h), 8192), state["fc6.weight"], state["fc6.bias"]))


def test_c3d_weights_file_gives_the_reference_fc6_for_both_pool5_conventions(tmp_path):
    state = known_state_dict()
    path = tmp_path / "c3d.pickle"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as saved from DataParallel: accepted
    x = torch.randn(1, 3, 16, 112, 112, generator=torch.Generator().manual_seed(1)) * 50
    outputs = {}
    for pool5 in ("caffe", "port"):
        model = load_c3d(str(path), pool5=pool5)
        with torch.no_grad():
            outputs[pool5], expected = model(x), reference_fc6(state, x, pool5)
        assert outputs[pool5].shape == (1, 4096) and (expected > 0).float().mean() > 0.1  # not all ReLU zeros
        torch.testing.assert_close(outputs[pool5], expected, rtol=1e-4, atol=1e-4)
    assert (outputs["caffe"] - outputs["port"]).abs().max() > 1e-2  # other rows pooled together: other features


def test_frames_reach_c3d_as_bgr_less_the_bgr_mean():
    from ingest.c3d.network import C3D_MEAN_BGR, clips_to_input

    clips = torch.zeros(1, 16, 2, 2, 3, dtype=torch.uint8)
    clips[..., 0], clips[..., 1], clips[..., 2] = 200, 100, 10  # R, G, B
    x = clips_to_input(clips, torch.tensor(C3D_MEAN_BGR))
    assert x.shape == (1, 3, 16, 2, 2)
    expected = torch.tensor([10.0, 100.0, 200.0]) - torch.tensor(C3D_MEAN_BGR)  # B, G, R less (90.25, 97.66, 101.41)
    assert torch.equal(x[0, :, 0, 0, 0], expected) and torch.equal(x[0, :, 15, 1, 1], expected)


def test_weights_file_problems_are_named(tmp_path):
    # keys and names are checked before shapes: empty tensors keep these files small
    names = [f"{n}.{p}" for n in (*CONVS, "fc6") for p in ("weight", "bias")]
    empty = {name: torch.empty(0) for name in names}
    cases = {
        "model.pt": (C3D(side=16), "not a PyTorch state_dict file"),  # a pickled module: refused, code never unpickled
        "list.pt": ([torch.zeros(1)], "not a state_dict (found list, expected a dict of tensors"),
        "keys.pt": ({k: v for k, v in empty.items() if k != "conv3b.weight"} | {"head.weight": torch.zeros(1)},
                    "not C3D weights: missing conv3b.weight; unexpected head.weight"),
        "shape.pt": (empty | {"conv1.weight": torch.zeros(64, 3, 3, 3, 1)},
                     "conv1.weight has shape (64, 3, 3, 3, 1), C3D at 112x112 needs (64, 3, 3, 3, 3)"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(WeightsError) as e:
            load_c3d(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: {message}"), str(e.value)
    (tmp_path / "junk.pickle").write_bytes(b"junk\n")  # not a torch.save file at all
    with pytest.raises(WeightsError) as e:
        load_c3d(str(tmp_path / "junk.pickle"))
    assert str(e.value) == f"{tmp_path / 'junk.pickle'}: not a PyTorch state_dict file (torch.load cannot read it)"

    def zeros(*shape):  # the shape without the bytes: one element, expanded (saved as it is)
        return torch.zeros(1).expand(*shape)

    published = {"fc6.weight": zeros(4096, 8192), "fc6.bias": zeros(4096)}  # fc6 made for 112x112 crops
    for name, (cin, cout) in CONVS.items():
        published[f"{name}.weight"], published[f"{name}.bias"] = zeros(cout, cin, 3, 3, 3), zeros(cout)
    torch.save(published, tmp_path / "published.pt")
    with pytest.raises(WeightsError) as e:
        load_c3d(str(tmp_path / "published.pt"), side=32)  # --crop-size 32 with weights for 112
    assert str(e.value) == (f"{tmp_path / 'published.pt'}: fc6.weight has shape (4096, 8192), C3D at 32x32 needs "
                            "(4096, 512) (the published weights need --crop-size 112)")


def textured_pair(dx: int, dy: int, size=(96, 128), seed=0):
    """A smooth random texture and the same texture moved by (dx, dy) pixels."""
    import cv2

    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.integers(0, 256, (size[0] + 40, size[1] + 40)).astype(np.float32), (0, 0), 2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    first = big[20:20 + size[0], 20:20 + size[1]]
    second = big[20 - dy:20 - dy + size[0], 20 - dx:20 - dx + size[1]]  # content moves by (+dx, +dy)
    return first, second


@pytest.mark.parametrize("method", CV_METHODS)
def test_flow_of_a_known_shift(method):
    try:
        flow_fn = cv_flow_function(method)
    except FlowMethodError as e:
        pytest.skip(str(e))  # tvl1 needs opencv-contrib
    first, second = textured_pair(3, -2)
    flow = flow_fn(first, second)
    interior = flow[16:-16, 16:-16].reshape(-1, 2)
    assert flow.shape == (96, 128, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(np.median(interior, axis=0), [3, -2], atol=0.25)


def test_tvl1_without_contrib_is_one_clear_error():
    import cv2

    if hasattr(cv2, "optflow"):
        pytest.skip("opencv-contrib is installed here")
    with pytest.raises(FlowMethodError) as e:
        cv_flow_function("tvl1")
    assert str(e.value).startswith("--flow tvl1 needs OpenCV's contrib modules: pip uninstall opencv-python-headless")


def test_flow_image_encoding():
    flow = np.array([[[0, 0], [20, -20]], [[5, 0], [40, 10]]], np.float32)  # (2, 2, 2) pixels
    image = flow_to_image(flow, bound=20)
    assert image.dtype == np.uint8
    assert image[0, 0].tolist() == [128, 128, 0]  # no motion: mid-grey x and y, zero magnitude
    assert image[0, 1].tolist() == [255, 0, 255]  # at the bound
    assert image[1, 0].tolist() == [159, 128, 64]  # 5 px right: 127.5 + 5 * 255/40 = 159.4; |5| * 255/20 = 63.75
    assert image[1, 1].tolist() == [255, 191, 255]  # clipped beyond the bound


def test_raft_needs_weights_and_torchvision(tmp_path):
    from ingest.videos.flow import check_method

    with pytest.raises(FlowMethodError) as e:
        check_method("raft")
    assert str(e.value).startswith("--flow raft needs --raft-weights FILE")
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(FlowMethodError) as e:
            check_method("raft", str(tmp_path / "raft.pth"))
        assert str(e.value).startswith("--flow raft needs torchvision built for this torch")


def test_channels_last_3d_gives_the_contiguous_layouts_features():
    """The batcher runs C3D in channels_last_3d (oneDNN's faster layout on CPU too): the same features
    as the contiguous layout, within float rounding."""
    from types import SimpleNamespace

    from ingest.c3d.batching import FeatureBatcher
    from ingest.c3d.network import random_c3d

    clips = np.random.default_rng(0).integers(0, 256, (3, 16, 32, 32, 3), dtype=np.uint8)
    features = {}
    for layout in (torch.channels_last_3d, torch.contiguous_format):
        batcher = FeatureBatcher({"rgb": random_c3d(0, side=32)}, torch.device("cpu"), 2, memory_format=layout)
        batcher.add(SimpleNamespace(clips={"hr_rgb": clips}))
        batcher.flush()
        (_, out), = batcher.done()
        features[layout] = torch.from_numpy(out["hr_rgb"])
    scale = features[torch.contiguous_format].abs().max()
    assert scale > 0.1  # not all ReLU zeros
    # the two layouts sum each output's thousands of products in other orders: float32 rounding
    torch.testing.assert_close(features[torch.channels_last_3d], features[torch.contiguous_format], rtol=1e-4,
                               atol=1e-5 * float(scale))
