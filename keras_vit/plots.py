"""Figures as PNG files (matplotlib, Agg backend): the training curves of a run and a confusion
matrix; keras_vit.inspect draws the paper's analysis figures with the same two helpers."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from keras_vit.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Write the figure as a PNG (atomically) and close it."""
    plt = pyplot()
    path = os.fspath(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def read_metrics_csv(path: str) -> Dict[str, List[float]]:
    """Columns of a metrics.csv written by keras.callbacks.CSVLogger, as float lists."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit()]
    columns: Dict[str, List[float]] = {}
    for name in (rows[0].keys() if rows else ()):
        try:
            columns[name] = [float(r[name]) for r in rows]
        except (TypeError, ValueError):
            continue
    return columns


def plot_training_curves(metrics: Dict[str, Sequence[float]], path: str) -> str:
    """Loss, accuracy and learning rate per epoch (training and validation) in three panels."""
    plt = pyplot()
    epochs = np.asarray(metrics.get("epoch", range(len(metrics.get("loss", [])))), dtype=float) + 1
    panels = [("loss", "loss"), ("accuracy", "top-1 accuracy"), ("learning_rate", "learning rate")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            if name in metrics and len(metrics[name]) == len(epochs):
                ax.plot(epochs, metrics[name], style, marker="o", markersize=3,
                        label="validation" if name.startswith("val_") else "training")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and key != "learning_rate":
            ax.legend()
    return save_figure(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str,
                          title: Optional[str] = None) -> str:
    """A confusion matrix (rows: true class, columns: predicted), shaded by the row's share."""
    plt = pyplot()
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * n + 2), 20.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        ticks = np.arange(n)
        ax.set_xticks(ticks, [str(c) for c in class_names], rotation=90 if n > 10 else 0)
        ax.set_yticks(ticks, [str(c) for c in class_names])
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(matrix.sum())} images)")
    return save_figure(fig, path)
