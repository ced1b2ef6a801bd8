"""The seed's two-stream bidirectional GRU, and its checkpoint formats."""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp choices -> autocast dtype


DEVICES = ("auto", "cpu", "cuda")  # --device choices (cuda:N also accepted)


def autocast(device_type: str, amp: str):
    """The mixed-precision context for --amp (a no-op for "off"); the classifier and loss stay float32."""
    return torch.autocast(device_type, dtype=AMP[amp]) if AMP[amp] else nullcontext()


def check_device(device: str) -> None:
    """Refuse a --device this machine cannot run (before any work)."""
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPUs are visible")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """--device as a torch.device: auto picks this rank's GPU when there is one, else the CPU."""
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if device == "cuda" else device)


def normalise_units(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """L2-normalise every unit (last dim) in float32, as the seed's loader does; padded zero units stay zero.

    inplace: divide `x` itself when it is already float32 (a training step's own merged batch),
    saving a batch-sized allocation per input and step."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.div_(norm) if inplace else x / norm


def pack_units(lengths, *units: torch.Tensor) -> list:
    """PackedSequences of sequences stored end to end: each of `units` is (sum(lengths), D).

    The sequences are ordered longest first (ties keep their order) by one gather on the units'
    device; sorted_indices let the GRU give its final states back in the input order. All inputs
    share the lengths, so the index is built once (what pack_padded_sequence does, without padding)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    order = torch.sort(lengths, descending=True, stable=True).indices
    sorted_lengths = lengths[order]
    steps = torch.arange(int(sorted_lengths[0]))[:, None]  # (T, 1)
    alive = sorted_lengths[None, :] > steps  # (T, N): sequence n has a unit at step t
    starts = (torch.cumsum(lengths, 0) - lengths)[order]
    index = (starts[None, :] + steps)[alive]  # time-major, longest first: the packed layout
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    device = units[0].device
    index, order, inverse = index.to(device), order.to(device), inverse.to(device)
    return [PackedSequence(x.index_select(0, index), alive.sum(1), order, inverse) for x in units]


def model_inputs(lengths, rgb: torch.Tensor, flow: torch.Tensor) -> list:
    """The GRUs' inputs from a batch's own units (end to end, as the loaders give them): each unit
    L2-normalised in place (in float32), then packed."""
    return pack_units(lengths, normalise_units(rgb, inplace=True), normalise_units(flow, inplace=True))


class TwoStreamGRU(nn.Module):
    """rnn1 reads the RGB stream, rnn2 the flow stream; the final hidden states of both directions
    of both streams are summed and classified. Attribute names match the seed's checkpoints."""

    def __init__(self, input_size: int = 4096, hidden_size: int = 512, num_classes: int = 51):
        super().__init__()
        self.rnn1 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.rnn2 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, rgb, flow, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """rgb, flow: PackedSequences (pack_units), or (B, T, D) zero-padded past `lengths` (B,) as the
        seed feeds them; units L2-normalised. -> logits (B, classes), in the input order."""
        if not isinstance(rgb, PackedSequence):
            lengths = lengths.cpu()
            rgb = pack_padded_sequence(rgb, lengths, batch_first=True, enforce_sorted=False)
            flow = pack_padded_sequence(flow, lengths, batch_first=True, enforce_sorted=False)
        _, h_rgb = self.rnn1(rgb)
        _, h_flow = self.rnn2(flow)
        hidden = h_rgb.sum(0) + h_flow.sum(0)  # (2, B, H) each -> (B, H): both directions, both streams
        # the classifier and everything after it run in float32 (the loss needs it under fp16/bf16);
        # autocast would cast F.linear's inputs back down, so it is off here
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.classifier.weight.float(), self.classifier.bias.float())


def model_from_state_dict(state: dict, path: str) -> TwoStreamGRU:
    """Build a model whose sizes are read off a seed-format state_dict, and load it."""
    try:
        hidden = state["rnn1.weight_hh_l0"].shape[1]
        model = TwoStreamGRU(state["rnn1.weight_ih_l0"].shape[1], hidden, state["classifier.weight"].shape[0])
        model.load_state_dict(state)
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: not the weights of this project's two-stream GRU ({reason})") from None
    return model


def load_weights(path: str) -> tuple:
    """(model, classes or None) from a project checkpoint or a seed `state_dict` file; never unpickles."""
    blob = load_checkpoint(path)
    if isinstance(blob.get("model"), dict):  # our checkpoint: {"model": state_dict, "classes": [...], ...}
        return model_from_state_dict(blob["model"], path), blob.get("classes")
    if "rnn1.weight_ih_l0" in blob:  # the seed's torch.save(model.state_dict())
        return model_from_state_dict(blob, path), None
    raise CheckpointError(f"{path}: neither a project checkpoint nor a seed state_dict "
                          f"(keys: {', '.join(sorted(map(str, blob))[:5]) or 'none'})")


def export_seed_state_dict(model: TwoStreamGRU, path: str) -> None:
    """Save in the seed's format: a plain state_dict with rnn1.*, rnn2.*, classifier.* keys."""
    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def score_batches(model, batches, device, amp: str = "off"):
    """(batch, logits) of each LR batch (elr.data.batches) through `model`, in order, without gradients:
    the scoring loop of training's test epochs and of elr-eval jobs."""
    device = torch.device(device)
    ctx = autocast(device.type, amp)
    with torch.no_grad():
        for b in batches:
            with ctx:
                logits = model(*model_inputs(b["lengths"], b["lr_rgb"].to(device), b["lr_flow"].to(device)))
            yield b, logits
