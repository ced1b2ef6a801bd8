"""C3D (Tran et al., ICCV 2015) in PyTorch: 16-frame clips in, the 4096-d fc6 feature per clip out.

The layer names and shapes are those of the public c3d-pytorch port (DavideA/c3d-pytorch), whose
`c3d.pickle` holds the Sports-1M weights as a state_dict: conv1.weight ... fc8.bias. Only the layers up
to fc6 run; fc7 and fc8 are accepted in a weights file and ignored.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from shards.errors import ELRError

CLIP_FRAMES = 16  # frames per C3D unit
FEATURE_DIM = 4096  # fc6
INPUT_SIDE = 112  # the published weights see 112x112 crops of 128x171 frames
# The Sports-1M weights were trained in Caffe (C3D-v1.0), which reads frames as B, G, R, and
# c3d-pytorch's c3d.pickle was converted from them without a channel swap: frames reach C3D as B, G, R
# (a flow image's x, y, magnitude as magnitude, y, x), less the per-channel average of the Sports-1M
# training mean (sport1m_train16_128_mean) in the same order.
CHANNELS = "bgr"
C3D_MEAN_BGR = (90.25, 97.66, 101.41)
# pool5: Caffe pools with ceil-mode windows and no padding; the c3d-pytorch port pads one pixel on
# each side instead, which groups other rows and columns together (the same output size at 112)
POOL5 = ("caffe", "port")

# name -> (in channels, out channels); every conv is 3x3x3 with padding 1
CONVS = {
    "conv1": (3, 64), "conv2": (64, 128), "conv3a": (128, 256), "conv3b": (256, 256),
    "conv4a": (256, 512), "conv4b": (512, 512), "conv5a": (512, 512), "conv5b": (512, 512),
}
OPTIONAL_KEYS = {"fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias"}


class WeightsError(ELRError):
    """A C3D weights file that is not the state_dict C3D needs."""


def pool5_features(side: int, pool5: str = "caffe") -> int:
    """Inputs to fc6 for `side`x`side` clips: 512 x 1 x s x s after pool5 (8192 at side 112)."""
    s = side
    for _ in range(4):  # pool1 .. pool4 halve the frame (floor)
        s //= 2
    return 512 * (-(-s // 2) if pool5 == "caffe" else (s + 2) // 2) ** 2  # ceil, or one pixel padded each side


class C3D(nn.Module):
    """conv1 .. conv5b and fc6; forward(clips (B, 3, 16, S, S), B, G, R less the mean) -> (B, 4096) after
    ReLU. pool5: "caffe" (ceil-mode windows, as the weights were trained) or "port" (c3d-pytorch's)."""

    def __init__(self, side: int = INPUT_SIDE, padding_mode: str = "zeros", pool5: str = "caffe"):
        super().__init__()
        if pool5 not in POOL5:
            raise ValueError(f"--pool5 must be one of {', '.join(POOL5)}, got {pool5!r}")
        self.pool5 = pool5
        for name, (cin, cout) in CONVS.items():
            setattr(self, name, nn.Conv3d(cin, cout, kernel_size=3, padding=1, padding_mode=padding_mode))
        self.fc6 = nn.Linear(pool5_features(side, pool5), FEATURE_DIM)

    def forward(self, x):
        relu = functools.partial(F.relu, inplace=True)  # in place: one less pass over memory (~5% on CPU)
        x = F.max_pool3d(relu(self.conv1(x)), (1, 2, 2))  # (B, 64, 16, S/2, S/2): time kept at first
        x = F.max_pool3d(relu(self.conv2(x)), 2)  # (B, 128, 8, S/4, S/4)
        x = F.max_pool3d(relu(self.conv3b(relu(self.conv3a(x)))), 2)  # (B, 256, 4, ...)
        x = F.max_pool3d(relu(self.conv4b(relu(self.conv4a(x)))), 2)  # (B, 512, 2, ...)
        x = relu(self.conv5b(relu(self.conv5a(x))))
        if self.pool5 == "caffe":
            x = F.max_pool3d(x, 2, ceil_mode=True)  # (B, 512, 1, 4, 4) at 112: windows [0,1] .. [6]
        else:
            x = F.max_pool3d(x, 2, padding=(0, 1, 1))  # (B, 512, 1, 4, 4) at 112: windows [-1,0] .. [5,6]
        return relu(self.fc6(x.flatten(1)))  # (B, 4096)


def random_c3d(seed: int, side: int = INPUT_SIDE, pool5: str = "caffe") -> C3D:
    """C3D with seeded random weights, for tests and demos only.

    A deep ReLU network with independent random layers maps all inputs to nearly parallel outputs
    (cosine ~0.99 here), which no classifier can learn from quickly. So only conv1 (zero-sum filters:
    a flat input gives no response) and fc6 are random; conv2..conv5b start as identities plus a little
    noise (delta-orthogonal style) and borders replicate instead of padding with zeros. The features are
    then a random projection of pooled conv1 responses: they keep what tells clips apart."""
    generator = torch.Generator().manual_seed(seed)
    model = C3D(side, padding_mode="replicate", pool5=pool5)

    def he_normal(weight):
        return torch.randn(weight.shape, generator=generator) * (2 / weight[0].numel()) ** 0.5

    with torch.no_grad():
        for name, module in model.named_children():
            module.bias.zero_()
            if name == "conv1":
                w = he_normal(module.weight)
                module.weight.copy_(w - w.mean(dim=(1, 2, 3, 4), keepdim=True))
            elif name.startswith("conv"):
                nn.init.dirac_(module.weight)
                module.weight.add_(0.1 * he_normal(module.weight))
            else:
                module.weight.copy_(he_normal(module.weight))
    return model.eval()


class C3DClassifier(C3D):
    """C3D as the paper trains it: conv1 .. fc6 (C3D), then dropout, fc7, ReLU, dropout and a new fc8
    for the dataset's classes; forward(clips) -> logits. Its state_dict has c3d.pickle's key names,
    so extract-features reads a fine-tuned one like the published weights (fc7 and fc8 ignored)."""

    def __init__(self, classes: int, side: int = INPUT_SIDE, padding_mode: str = "zeros", pool5: str = "caffe",
                 dropout: float = 0.5):
        super().__init__(side, padding_mode, pool5)
        self.padding_mode = padding_mode
        self.fc7 = nn.Linear(FEATURE_DIM, FEATURE_DIM)
        self.fc8 = nn.Linear(FEATURE_DIM, classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, keep=None):
        """Logits of clips x; keep: (b, 2, 4096) dropout masks for fc7's and fc8's inputs (1/(1-p) where
        kept, 0 where dropped), drawn by the caller per clip (nn.Dropout's own masks otherwise)."""
        x = super().forward(x)
        x = x * keep[:, 0] if keep is not None else self.dropout(x)
        x = F.relu(self.fc7(x))
        return self.fc8(x * keep[:, 1] if keep is not None else self.dropout(x))


RANDOM_SCALE = 128.0  # pixel units to unit scale, for random_c3d's fine-tuning


def c3d_classifier(classes: int, side: int, pool5: str, init: str | None = None, random_seed: int | None = None,
                   dropout: float = 0.5) -> C3DClassifier:
    """C3DClassifier from the Sports-1M weights (`init`: conv1 .. fc7 of c3d.pickle) or, for tests and
    demos, random_c3d's seeded weights; fc8 (and fc7 where the weights lack it) drawn from N(0, 0.01)
    with `random_seed` or 0, as Caffe's fine-tuning examples initialise a new layer."""
    generator = torch.Generator().manual_seed(random_seed or 0)
    if init is not None:  # read once: conv1 .. fc6 for the trunk, fc7 below
        state, padding = read_c3d_weights(init, side, pool5)
        trunk = c3d_from_state(state, padding, init, side, pool5)
    else:
        trunk, padding, state = random_c3d(random_seed, side, pool5), "replicate", {}
        # random_c3d answers in pixel units (~100s), where SGD's steps are far too long for fc6 (its
        # gradient is 84x its weights on demo clips) or, scaled there instead, for conv1. Dividing both
        # by sqrt(128) balances them (gradients 1.3x and 0.65x the weights) and the features are
        # random_c3d's / 128 exactly (its biases are 0, ReLU and max-pooling positively homogeneous)
        with torch.no_grad():
            for layer in (trunk.conv1, trunk.fc6):
                layer.weight.div_(RANDOM_SCALE ** 0.5)
                layer.bias.div_(RANDOM_SCALE ** 0.5)
    model = C3DClassifier(classes, side, padding, pool5, dropout)
    model.load_state_dict(trunk.state_dict(), strict=False)
    model.new_layers = []  # drawn here, not loaded: the trainer gives them a larger learning rate
    with torch.no_grad():
        for name in ("fc7", "fc8"):
            layer = getattr(model, name)
            weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
            if name == "fc7" and weight is not None and tuple(weight.shape) == tuple(layer.weight.shape):
                layer.weight.copy_(weight.float())
                layer.bias.copy_(bias.float())
            else:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
                layer.bias.zero_()
                model.new_layers.append(name)
    return model


def load_state_file(path: str, error: type, what: str, mmap: bool = False):
    """torch.load without unpickling code (weights_only); a missing or unreadable file is one `error`.
    mmap: tensors are read when used (a checkpoint's conventions, without its weights)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except Exception as e:  # noqa: BLE001 - pickles of whole models, archives of other kinds, garbage
        # (garbage is a KeyError of the bytes torch took for a magic number: no words for a user)
        detail = "torch.load cannot read it" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise error(f"{path}: not a PyTorch state_dict file ({detail})") from None


FINE_TUNED = ("crop_size", "pool5", "padding_mode")  # what an elr-train-c3d checkpoint says of how it ran


def is_fine_tuned(state) -> bool:
    """Whether a loaded weights file is an elr-train-c3d checkpoint (its model and how it ran)."""
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and all(k in state for k in FINE_TUNED)


def weights_conventions(path: str) -> dict | None:
    """{"crop_size", "pool5", "padding_mode"} when `path` is a C3D fine-tuned by elr-train-c3d (its
    best.pt or last.pt); None for a plain state_dict such as c3d.pickle, and for a file that cannot be
    read (load_c3d says what is wrong with it, when the run loads its weights)."""
    try:
        state = load_state_file(path, WeightsError, "weights", mmap=True)
    except WeightsError:
        return None
    return {k: state[k] for k in FINE_TUNED} if is_fine_tuned(state) else None


def read_c3d_weights(path: str, side: int, pool5: str) -> tuple:
    """(state_dict of tensors, border padding) of a weights file: a state_dict such as c3d.pickle
    (DataParallel's "module." prefixes dropped), or the model of an elr-train-c3d checkpoint, whose
    crop size and pool5 windows must be `side` and `pool5` (its padding is the one it trained with).
    Anything else is one WeightsError."""
    state = load_state_file(path, WeightsError, "weights")
    padding = "zeros"
    if is_fine_tuned(state):
        if (state["crop_size"], state["pool5"]) != (side, pool5):
            raise WeightsError(f"{path}: fine-tuned on {state['crop_size']}x{state['crop_size']} crops with --pool5 "
                               f"{state['pool5']}; this run has --crop-size {side} --pool5 {pool5}")
        state, padding = state["model"], state["padding_mode"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state_dict (found {type(state).__name__}, expected a dict of tensors "
                           "with keys conv1.weight ... fc6.bias)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, padding


def load_c3d(path: str, side: int = INPUT_SIDE, pool5: str = "caffe") -> C3D:
    """C3D with the weights of a state_dict file, or of a checkpoint of elr-train-c3d (run with the
    padding it was trained with); one WeightsError naming what differs otherwise."""
    state, padding = read_c3d_weights(path, side, pool5)
    return c3d_from_state(state, padding, path, side, pool5)


def c3d_from_state(state: dict, padding: str, path: str, side: int, pool5: str) -> C3D:
    """C3D (conv1 .. fc6) with the tensors of `state`, read from `path`; a WeightsError naming the keys
    or shapes that are not C3D's at `side`."""
    model = C3D(side, padding_mode=padding, pool5=pool5)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state), key=list(expected).index)
    unexpected = sorted(set(state) - set(expected) - OPTIONAL_KEYS)
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")] if unexpected else [])
        raise WeightsError(f"{path}: not C3D weights: {'; '.join(parts)} (expected keys conv1.weight ... fc6.bias "
                           "of the c3d-pytorch port)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise WeightsError(f"{path}: {k} has shape {tuple(state[k].shape)}, C3D at {side}x{side} needs {shape}"
                               + (f" (the published weights need --crop-size {INPUT_SIDE})" if side != INPUT_SIDE else ""))
    model.load_state_dict({k: state[k].float() for k in expected})
    return model.eval()


def clips_to_input(clips: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 R, G, B clips (B, 16, S, S, 3) -> float (B, 3, 16, S, S) in C3D's B, G, R order, less `mean`
    (C3D_MEAN_BGR)."""
    return clips.permute(0, 4, 1, 2, 3).flip(1).float() - mean.view(1, 3, 1, 1, 1)
