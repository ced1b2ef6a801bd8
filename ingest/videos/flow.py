"""Optical flow between consecutive frames, and its 3-channel image that C3D reads like RGB.

Methods: "dis" (OpenCV's DIS, the default: fast and good), "farneback" (OpenCV), "tvl1" (OpenCV
contrib's TV-L1, the classic for action recognition) and "raft" (torchvision's RAFT, on the extraction
device, from a weights file). Flow is in pixels of the frame it is computed on: (H, W, 2) float32, x then y.
"""

import numpy as np

from shards.errors import ELRError

METHODS = ("dis", "farneback", "tvl1", "raft")
CV_METHODS = ("dis", "farneback", "tvl1")  # computed per frame pair on the CPU
DEFAULT_BOUND = 20.0  # pixels: flow beyond this is clipped in the flow image


class FlowMethodError(ELRError):
    """A flow method that this installation cannot run."""


def cv_flow_function(method: str):
    """A function (prev_gray, next_gray) -> (H, W, 2) float32 flow, for an OpenCV method."""
    import cv2

    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return lambda prev, nxt: dis.calc(np.ascontiguousarray(prev), np.ascontiguousarray(nxt), None)
    if method == "farneback":
        return lambda prev, nxt: cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise FlowMethodError("--flow tvl1 needs OpenCV's contrib modules: pip uninstall opencv-python-headless "
                                  "&& pip install opencv-contrib-python-headless (same version; the two share cv2)")
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda prev, nxt: tvl1.calc(prev, nxt, None)
    raise FlowMethodError(f"unknown flow method {method!r} (choose from {', '.join(METHODS)})")


def check_method(method: str, raft_weights: str | None = None) -> None:
    """Fail before any work starts when `method` cannot run here."""
    if method in CV_METHODS:
        cv_flow_function(method)
    elif method == "raft":
        if not raft_weights:
            raise FlowMethodError("--flow raft needs --raft-weights FILE (torchvision's raft_large or raft_small "
                                  "state_dict, e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth)")
        load_raft(raft_weights)
    else:
        raise FlowMethodError(f"unknown flow method {method!r} (choose from {', '.join(METHODS)})")


def flow_to_image(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """(H, W, 2) flow in pixels -> (H, W, 3) uint8: x and y mapped from [-bound, bound] to 0..255
    (128: no motion), and the magnitude from [0, bound] to 0..255."""
    scale = 255.0 / (2 * bound)
    xy = np.clip((flow + bound) * scale, 0, 255)
    magnitude = np.clip(np.sqrt((flow ** 2).sum(axis=-1)) * (255.0 / bound), 0, 255)
    image = np.empty(flow.shape[:2] + (3,), np.uint8)
    np.rint(xy, out=xy)
    image[..., :2] = xy
    image[..., 2] = np.rint(magnitude)
    return image


def load_raft(path: str):
    """torchvision's RAFT (large or small, told apart by the weights) with the weights in `path`."""
    import torch

    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError:
        raise FlowMethodError("--flow raft needs torchvision built for this torch (pip install torchvision==<the "
                              f"release matching torch {torch.__version__}>)") from None
    from ingest.c3d.network import load_state_file

    state = load_state_file(path, FlowMethodError, "RAFT weights")
    for build in (raft_large, raft_small):
        model = build(weights=None)
        try:
            model.load_state_dict(state)
            return model.eval()
        except (RuntimeError, TypeError, AttributeError):
            continue
    raise FlowMethodError(f"{path}: not the weights of torchvision's raft_large or raft_small")


def raft_flow(model, prev, nxt):
    """RAFT on batches of frame pairs: uint8 (N, H, W, 3) tensors on the model's device -> (N, H, W, 2) float32."""
    import torch
    import torch.nn.functional as F

    h, w = prev.shape[1:3]
    pad_h, pad_w = -h % 8, -w % 8  # RAFT needs sides divisible by 8

    def prepare(x):
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # RAFT's [-1, 1] input
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

    with torch.no_grad():
        flow = model(prepare(prev), prepare(nxt), num_flow_updates=12)[-1]  # (N, 2, H', W')
    return flow[:, :, :h, :w].permute(0, 2, 3, 1).float()
