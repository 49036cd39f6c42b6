"""Plots and reports: a training's curves, confusion matrix and per-class scores, and the overlay
of several runs' curves for a comparison.

matplotlib is imported inside the plotting functions, never on the training path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline import constants as names
from pipeline.constants import NUM_CLASSES


def confusion_matrix(true_labels: np.ndarray, predicted_labels: np.ndarray) -> np.ndarray:
    """counts[i, j] = examples of class i predicted as class j."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (true_labels, predicted_labels), 1)
    return counts


def classification_report(counts: np.ndarray) -> dict[str, object]:
    """Per-class precision, recall, F1 and support, plus accuracy and macro/weighted averages
    (the layout of scikit-learn's `classification_report(output_dict=True)`)."""
    true_positives = np.diag(counts).astype(float)
    support = counts.sum(axis=1).astype(float)
    predicted = counts.sum(axis=0).astype(float)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    report: dict[str, object] = {
        str(label): {
            "precision": float(precision[label]),
            "recall": float(recall[label]),
            "f1-score": float(f1[label]),
            "support": int(support[label]),
        }
        for label in range(NUM_CLASSES)
    }
    total = support.sum()
    report["accuracy"] = float(true_positives.sum() / total) if total else 0.0
    report["macro avg"] = {
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1-score": float(f1.mean()),
        "support": int(total),
    }
    weights = support / total if total else np.zeros_like(support)
    report["weighted avg"] = {
        "precision": float(precision @ weights),
        "recall": float(recall @ weights),
        "f1-score": float(f1 @ weights),
        "support": int(total),
    }
    return report


def _figure(width: float, height: float, **margins: float):
    """A matplotlib Figure drawn with Agg, without pyplot (no global state: safe off the main
    thread) and with fixed margins (tight_layout costs a full extra draw)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=80)
    figure.subplots_adjust(**margins)
    return figure


def plot_training_curves(
    history: Sequence[Mapping[str, float]],
    lr_changes: Sequence[Mapping[str, object]],
    best_epoch: int | None,
    path: Path,
) -> None:
    """Loss, accuracy and learning rate per epoch; LR changes and the best epoch marked."""
    epochs = np.arange(len(history))
    series = {key: [row.get(key, np.nan) for row in history] for key in names.EPOCH_METRICS}
    figure = _figure(15, 4, left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
    loss_axis, accuracy_axis, lr_axis = figure.subplots(1, 3)
    for axis, metric, title in ((loss_axis, names.LOSS, "Loss"), (accuracy_axis, names.ACCURACY, "Accuracy")):
        axis.plot(epochs, series[metric], "b-o", markersize=3, label=f"training {metric}")
        axis.plot(epochs, series[f"val_{metric}"], "r-o", markersize=3, label=f"validation {metric}")
        axis.set_title(title)
    lr_axis.step(epochs, series[names.LEARNING_RATE], "g-", where="post", label="learning rate")
    lr_axis.set_yscale("log")
    lr_axis.set_title("Learning rate (used during the epoch)")
    for axis in (loss_axis, accuracy_axis, lr_axis):
        for change in lr_changes:
            axis.axvline(float(change["epoch"]) + 0.5, color="orange", linestyle=":", linewidth=1)
        if best_epoch is not None:
            axis.axvline(best_epoch, color="purple", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if lr_changes:
        lr_axis.plot([], [], color="orange", linestyle=":", label="LR reduced")
        lr_axis.legend(fontsize=8)
    figure.savefig(path)


def plot_confusion_matrix(counts: np.ndarray, path: Path, title: str = "Confusion matrix (test split)") -> None:
    """The confusion matrix as a heat map with each count written in its cell."""
    figure = _figure(6, 5.5, left=0.1, right=0.97, bottom=0.1, top=0.93)
    axis = figure.subplots()
    image = axis.imshow(counts, cmap="Blues")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            axis.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                      color="white" if counts[i, j] > threshold else "black")
    axis.set_xticks(range(NUM_CLASSES))
    axis.set_yticks(range(NUM_CLASSES))
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.savefig(path)


def plot_run_overlay(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], metrics: Sequence[str], path: Path
) -> None:
    """One panel per metric, one line per run, over the epochs.

    Args:
        histories: run label -> metric -> (epoch, value) pairs in epoch order.
        metrics: the metrics to draw, one panel each; the learning rate is drawn on a log scale.
        path: the PNG to write.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(5 * len(metrics), 4.2)
    axes = figure.subplots(1, len(metrics), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for label, history in histories.items():
            points = history.get(metric, ())
            if metric == names.LEARNING_RATE:
                axis.step([p[0] for p in points], [p[1] for p in points], where="post", label=label)
                axis.set_yscale("log")
            else:
                axis.plot([p[0] for p in points], [p[1] for p in points], "-o", markersize=3, label=label)
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    rows = -(-len(labels) // 3)
    figure.tight_layout(rect=(0, min(0.08 * rows, 0.4), 1, 1))
    figure.savefig(path, dpi=72)
