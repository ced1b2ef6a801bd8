"""The seed's two-stream bidirectional GRU, and its checkpoint formats."""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp choices -> autocast dtype


def autocast(device_type: str, amp: str):
    """The mixed-precision context for --amp (a no-op for "off"); the classifier and loss stay float32."""
    return torch.autocast(device_type, dtype=AMP[amp]) if AMP[amp] else nullcontext()


def normalise_units(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """L2-normalise every unit (last dim) in float32, as the seed's loader does; padded zero units stay zero.

    inplace: divide `x` itself when it is already float32 (a training step's own merged batch),
    saving a batch-sized allocation per input and step."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.div_(norm) if inplace else x / norm


class TwoStreamGRU(nn.Module):
    """rnn1 reads the RGB stream, rnn2 the flow stream; the final hidden states of both directions
    of both streams are summed and classified. Attribute names match the seed's checkpoints."""

    def __init__(self, input_size: int = 4096, hidden_size: int = 512, num_classes: int = 51):
        super().__init__()
        self.rnn1 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.rnn2 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # rgb, flow: (B, T, D) normalised units, zero-padded past `lengths` (B,) -> logits (B, classes)
        lengths = lengths.cpu()
        _, h_rgb = self.rnn1(pack_padded_sequence(rgb, lengths, batch_first=True, enforce_sorted=False))
        _, h_flow = self.rnn2(pack_padded_sequence(flow, lengths, batch_first=True, enforce_sorted=False))
        hidden = h_rgb.sum(0) + h_flow.sum(0)  # (2, B, H) each -> (B, H): both directions, both streams
        # the classifier and everything after it run in float32 (the loss needs it under fp16/bf16)
        return F.linear(hidden.float(), self.classifier.weight.float(), self.classifier.bias.float())


def model_from_state_dict(state: dict) -> TwoStreamGRU:
    """Build a model whose sizes are read off a seed-format state_dict, and load it."""
    hidden = state["rnn1.weight_hh_l0"].shape[1]
    model = TwoStreamGRU(state["rnn1.weight_ih_l0"].shape[1], hidden, state["classifier.weight"].shape[0])
    model.load_state_dict(state)
    return model


def load_weights(path: str) -> tuple:
    """(model, classes or None) from a project checkpoint or a seed `state_dict` file; never unpickles."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in blob:  # our checkpoint: {"model": state_dict, "classes": [...], ...}
        return model_from_state_dict(blob["model"]), blob.get("classes")
    if "rnn1.weight_ih_l0" in blob:  # the seed's torch.save(model.state_dict())
        return model_from_state_dict(blob), None
    raise ValueError(f"{path}: neither a project checkpoint nor a seed state_dict (keys: {sorted(blob)[:5]}...)")


def export_seed_state_dict(model: TwoStreamGRU, path: str) -> None:
    """Save in the seed's format: a plain state_dict with rnn1.*, rnn2.*, classifier.* keys."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
