"""Metric names and computation (scikit-learn underneath), shared by training, sweeps and reports.

Names are `{split}_{name}`; PR-AUC is average precision, not the trapezoid rule. The positive
class is the last class of the label map.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, f1_score,
                             matthews_corrcoef, roc_auc_score)

SPLITS = ("train", "val", "test")
METRIC_NAMES = ("loss", "accuracy", "pr_auc", "f1", "roc_auc", "mcc", "balanced_accuracy")
TEST_METRICS = tuple(f"test_{n}" for n in METRIC_NAMES if n != "loss")


def metric_name(split: str, name: str) -> str:
    if split not in SPLITS or name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {split=}, {name=}")
    return f"{split}_{name}"


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, *, split: str,
                           loss: float | None = None) -> dict[str, float]:
    """All metrics for one split. probabilities: (N, C); positive class = C - 1.

    ROC-AUC and PR-AUC are NaN when the split holds one class only.
    """
    y_true = np.asarray(y_true)
    positive = probabilities.shape[1] - 1
    predicted = probabilities.argmax(axis=1)
    is_positive = (y_true == positive).astype(int)
    score = probabilities[:, positive]
    both = 0 < is_positive.sum() < len(is_positive)
    with warnings.catch_warnings():
        # a split of one class (a small validation split): MCC is 0, balanced accuracy that class's recall
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        values = {
            "accuracy": accuracy_score(y_true, predicted),
            "pr_auc": average_precision_score(is_positive, score) if both else math.nan,
            "f1": f1_score(is_positive, (predicted == positive).astype(int), zero_division=0),
            "roc_auc": roc_auc_score(is_positive, score) if both else math.nan,
            "mcc": matthews_corrcoef(y_true, predicted),
            "balanced_accuracy": balanced_accuracy_score(y_true, predicted),
        }
    if loss is not None:
        values["loss"] = loss
    return {metric_name(split, k): float(v) for k, v in values.items()}
