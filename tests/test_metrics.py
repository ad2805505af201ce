"""The shared metrics: scikit-learn's definitions, the last class positive, one-class splits quiet."""

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, matthews_corrcoef, precision_recall_curve

from mmbrca.metrics import classification_metrics


def test_metrics_follow_scikit_learn_with_the_last_class_positive():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.2, 0.9, 0.6])
    values = classification_metrics(y, np.stack([1 - p1, p1], axis=1), split="test", loss=0.5)
    assert values["test_pr_auc"] == pytest.approx(average_precision_score(y, p1))
    precision, recall, _ = precision_recall_curve(y, p1)
    assert values["test_pr_auc"] != pytest.approx(auc(recall, precision))  # not the trapezoid rule
    predicted = (p1 > 0.5).astype(int)
    assert values["test_accuracy"] == pytest.approx((predicted == y).mean())
    assert values["test_mcc"] == pytest.approx(matthews_corrcoef(y, predicted))
    assert values["test_loss"] == 0.5
    flipped = classification_metrics(1 - y, np.stack([p1, 1 - p1], axis=1), split="test")
    assert flipped["test_pr_auc"] != pytest.approx(values["test_pr_auc"])  # the positive class matters


def test_a_split_of_one_class_gives_nan_curves_and_no_warnings():
    y = np.zeros(5, dtype=int)
    p1 = np.array([0.1, 0.2, 0.7, 0.3, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = classification_metrics(y, np.stack([1 - p1, p1], axis=1), split="val")
        all_right = classification_metrics(y, np.stack([1 - p1 / 2, p1 / 2], axis=1), split="val")
    assert math.isnan(values["val_pr_auc"]) and math.isnan(values["val_roc_auc"])
    assert values["val_accuracy"] == pytest.approx(0.8) and values["val_balanced_accuracy"] == pytest.approx(0.8)
    assert all_right["val_mcc"] == 0.0 and all_right["val_accuracy"] == 1.0
