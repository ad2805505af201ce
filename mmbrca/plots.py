"""Figures people look at, saved as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay  # noqa: E402


def pr_curve_png(path: Path, is_positive: np.ndarray, scores: np.ndarray, *, title: str, positive: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    PrecisionRecallDisplay.from_predictions(is_positive, scores, ax=ax, name=f"{positive} vs rest",
                                            plot_chance_level=True)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix_png(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
