"""Training metrics: one JSON line per epoch, and a PNG of the curves (both rewritten whole each epoch)."""

import io
import json
import os

from shards.atomic import atomic_write, write_text_atomic


def write_metrics(path: str, records: list) -> None:
    """metrics.jsonl from the run's history (kept in the checkpoint, so a resumed run writes the same file)."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list, path: str) -> None:
    """Loss and LR test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    tested = [r for r in records if r.get("test_acc") is not None]
    ax_acc.plot([r["epoch"] for r in tested], [100 * r["test_acc"] for r in tested], marker="o", color="C1")
    if records and records[-1].get("chance"):
        ax_acc.axhline(100 * records[-1]["chance"], ls="--", color="gray", label="chance")
        ax_acc.legend()
    ax_acc.set(xlabel="epoch", ylabel="top-1 %", title="LR test accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: str) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())
