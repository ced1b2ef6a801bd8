"""Accuracy reports of merged evaluation parts: JSON, Markdown, CSV and a confusion-matrix PNG."""

import csv
import io
import json
import os

import numpy as np

from elr.metrics import save_figure
from shards.atomic import write_text_atomic


def score(labels: np.ndarray, logits: np.ndarray, n_classes: int) -> dict:
    pred = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {"videos": int(len(labels)), "top1": float((pred == labels).mean()),
            "top5": float((top5 == labels[:, None]).any(1).mean()),
            "per_class": per_class.tolist(), "confusion": confusion.tolist()}


def write_reports(folder: str, stamp: dict, keys, labels, logits, classes) -> dict:
    """Write report.json, report.md, predictions.csv and confusion.png into `folder`; returns the scores."""
    s = score(labels, logits, len(classes))
    s.update({"checkpoint": stamp["checkpoint"], "checkpoint_sha256": stamp["checkpoint_sha256"],
              "split": stamp["split"], "phase": stamp["phase"], "num_jobs": stamp["num_jobs"], "classes": classes})
    write_text_atomic(os.path.join(folder, "report.json"), json.dumps(s, indent=1, sort_keys=True) + "\n")
    write_text_atomic(os.path.join(folder, "report.md"), markdown(s))
    pred = logits.argmax(1)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["key", "label", "class", "predicted", "predicted_class", "correct"])
    for k, y, p in zip(keys, labels, pred):
        w.writerow([k, int(y), classes[y], int(p), classes[p], int(y == p)])
    write_text_atomic(os.path.join(folder, "predictions.csv"), text.getvalue())
    plot_confusion(np.array(s["confusion"]), classes, os.path.join(folder, "confusion.png"),
                   f"{stamp['split']}/{stamp['phase']} LR, top-1 {100 * s['top1']:.1f}%")
    return s


def markdown(s: dict) -> str:
    lines = [f"# Evaluation: {s['split']}/{s['phase']} (LR)", "",
             f"- checkpoint: `{s['checkpoint']}`", f"- videos: {s['videos']} (scored by {s['num_jobs']} jobs)",
             f"- top-1: **{100 * s['top1']:.2f}%**, top-5: {100 * s['top5']:.2f}%", "",
             "| class | videos | accuracy |", "|---|---:|---:|"]
    confusion = np.array(s["confusion"])
    for c, (name, acc) in enumerate(zip(s["classes"], s["per_class"])):
        lines.append(f"| {name} | {int(confusion[c].sum())} | {100 * acc:.1f}% |")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, classes: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = max(5, min(18, 0.28 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), classes, fontsize=7 if n > 20 else 9)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def format_table(s: dict, folder: str) -> str:
    return (f"{s['split']}/{s['phase']} LR: {s['videos']} videos, top-1 {100 * s['top1']:.2f}%, "
            f"top-5 {100 * s['top5']:.2f}% (chance {100 / len(s['classes']):.2f}%)\n"
            f"reports: {folder}/report.md, report.json, predictions.csv, confusion.png")
