"""The model is the seed's architecture: seed checkpoints load and give the seed's logits."""

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from elr.model import TwoStreamGRU, export_seed_state_dict, load_weights, normalise_units, pack_units


class SeedRNN(nn.Module):
    """The seed's models/rnn.py, restated as the reference (its forward takes packed sequences)."""

    def __init__(self, input_size=4096, hidden_size=512, num_classes=51):
        super().__init__()
        self.rnn1 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.rnn2 = nn.GRU(input_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, x1, x2):
        _, hx1 = self.rnn1(x1, None)
        _, hx2 = self.rnn2(x2, None)
        return self.classifier(hx1[0] + hx2[0] + hx1[1] + hx2[1])


def seed_logits(model, rgb, flow, lengths):
    """As the seed's train loop does: sort by length (descending), pack, run, then undo the sort."""
    order = torch.argsort(lengths, descending=True)
    pack = lambda x: pack_padded_sequence(x[order], lengths[order], batch_first=True)  # noqa: E731
    out = model(pack(rgb), pack(flow))
    return out[torch.argsort(order)]


def batch(d=24, lengths=(5, 2, 7, 3)):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor(lengths)
    rgb, flow = (torch.rand(len(lengths), max(lengths), d, generator=g) for _ in range(2))
    for i, n in enumerate(lengths):
        rgb[i, n:] = flow[i, n:] = 0
    return normalise_units(rgb), normalise_units(flow), lengths


def test_seed_state_dict_loads_and_gives_seed_logits(tmp_path):
    torch.manual_seed(1)
    seed = SeedRNN(24, 16, 7).eval()
    torch.save(seed.state_dict(), tmp_path / "state_dict-epoch-50.pth")
    ours, classes = load_weights(str(tmp_path / "state_dict-epoch-50.pth"))
    assert classes is None and set(ours.state_dict()) == set(seed.state_dict())
    rgb, flow, lengths = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(rgb, flow, lengths), seed_logits(seed, rgb, flow, lengths),
                                   rtol=1e-6, atol=1e-6)


def test_export_to_seed_format_round_trips(tmp_path):
    torch.manual_seed(2)
    ours = TwoStreamGRU(24, 16, 7).eval()
    export_seed_state_dict(ours, str(tmp_path / "exported.pth"))
    seed = SeedRNN(24, 16, 7).eval()
    seed.load_state_dict(torch.load(tmp_path / "exported.pth", weights_only=True))  # strict: same keys
    rgb, flow, lengths = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(rgb, flow, lengths), seed_logits(seed, rgb, flow, lengths), rtol=1e-6, atol=1e-6)


def end_to_end(padded, lengths):
    """The units of a padded batch, sequence after sequence (the loaders' layout)."""
    return torch.cat([x[:n] for x, n in zip(padded, lengths)])


def test_pack_units_is_pack_padded_sequence_without_the_padding():
    rgb, flow, lengths = batch(lengths=(5, 2, 7, 3))  # distinct lengths: one longest-first order
    ours = pack_units(lengths, end_to_end(rgb, lengths), end_to_end(flow, lengths))
    for packed, padded in zip(ours, (rgb, flow)):
        theirs = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        assert torch.equal(packed.data, theirs.data) and torch.equal(packed.batch_sizes, theirs.batch_sizes)
        assert packed.sorted_indices.tolist() == [2, 0, 3, 1] and packed.unsorted_indices.tolist() == [1, 3, 0, 2]


def test_packed_inputs_give_the_padded_logits_in_input_order():
    """Ties in length keep their order; the logits come back in the order the sequences went in."""
    torch.manual_seed(3)
    model = TwoStreamGRU(24, 16, 7).eval()
    rgb, flow, lengths = batch(lengths=(5, 2, 7, 3, 5, 2))
    with torch.no_grad():
        packed = model(*pack_units(lengths, end_to_end(rgb, lengths), end_to_end(flow, lengths)))
        torch.testing.assert_close(packed, model(rgb, flow, lengths), rtol=1e-6, atol=1e-6)


def test_normalise_units_is_per_unit_l2_and_keeps_padding_zero():
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]], dtype=torch.float16)
    y = normalise_units(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[[0.6, 0.8], [0.0, 0.0]]]))


def test_default_sizes_are_the_seeds():
    m = TwoStreamGRU()
    sizes = (m.rnn1.input_size, m.rnn1.hidden_size, m.rnn1.bidirectional, m.classifier.out_features)
    assert sizes == (4096, 512, True, 51)


def test_classifier_runs_in_float32_under_bf16_autocast():
    """--amp bf16: the GRUs may run in bf16, the classifier must not (autocast would cast F.linear down)."""
    from elr.model import autocast

    torch.manual_seed(0)
    model = TwoStreamGRU(8, 16, 5)
    lengths = torch.tensor([3, 5, 2])
    units = torch.randn(int(lengths.sum()), 8)
    hidden = {}
    model.rnn1.register_forward_hook(lambda m, i, o: hidden.__setitem__("rnn1", o[1]))
    model.rnn2.register_forward_hook(lambda m, i, o: hidden.__setitem__("rnn2", o[1]))
    with autocast("cpu", "bf16"):
        logits = model(*pack_units(lengths, units, units.clone()))
    summed = (hidden["rnn1"].sum(0) + hidden["rnn2"].sum(0)).float()
    expected = torch.nn.functional.linear(summed, model.classifier.weight, model.classifier.bias)  # float32, no autocast
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)  # bit for bit: a bf16 matmul would round
