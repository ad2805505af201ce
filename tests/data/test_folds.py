import itertools

import numpy as np
import pandas as pd
import pytest

from mmbrca.data.folds import make_folds, site_preserved_folds, stratified_folds
from mmbrca.errors import UserError


def cohort(n_sites=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        for i in range(int(rng.integers(3, 12))):
            rows.append((f"S{s}-P{i:02d}", f"S{s}", "pos" if rng.random() < 0.15 + 0.08 * s else "neg"))
    frame = pd.DataFrame(rows, columns=["patient", "site", "label"]).set_index("patient")
    return frame["label"], frame["site"]


def test_stratified_is_balanced_and_deterministic():
    labels, _ = cohort()
    folds = stratified_folds(labels, 5, seed=1)
    assert sorted(folds.index) == sorted(labels.index)
    counts = pd.crosstab(folds, labels.reindex(folds.index))
    assert (counts.max() - counts.min()).max() <= 1
    pd.testing.assert_series_equal(folds, stratified_folds(labels, 5, seed=1))
    assert not folds.equals(stratified_folds(labels, 5, seed=2))


def test_site_preserved_keeps_each_site_in_one_fold_and_every_class_in_every_fold():
    labels, sites = cohort(n_sites=12)
    folds = make_folds(labels, sites, 5, "site-preserved", seed=0)
    per_site = pd.DataFrame({"fold": folds, "site": sites.reindex(folds.index)}).groupby("site")["fold"].nunique()
    assert (per_site == 1).all()
    assert set(folds) == set(range(5))
    assert (pd.crosstab(folds, labels.reindex(folds.index)) > 0).all().all()
    pd.testing.assert_series_equal(folds, site_preserved_folds(labels, sites, 5, seed=0))


def _imbalance(folds: pd.Series, labels: pd.Series, n_folds: int) -> float:
    table = pd.crosstab(folds, labels.reindex(folds.index)).reindex(index=range(n_folds), fill_value=0)
    share = table.sum() / n_folds
    return float(((table - share).abs() / table.sum()).sum().sum())


def test_site_preserved_is_optimal_on_a_small_instance():
    """The MILP's balance equals the best of all 3**6 assignments (brute force)."""
    labels, sites = cohort(n_sites=6, seed=3)
    n_folds = 3
    found = _imbalance(site_preserved_folds(labels, sites, n_folds, seed=0), labels, n_folds)
    names = sorted(sites.unique())
    best = np.inf
    for assignment in itertools.product(range(n_folds), repeat=len(names)):
        folds = sites.map(dict(zip(names, assignment)))
        table = pd.crosstab(folds, labels).reindex(index=range(n_folds), fill_value=0)
        if (table == 0).any().any():
            continue
        best = min(best, _imbalance(folds, labels, n_folds))
    assert found == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_folds": 10}, "9 sites for --folds 10"),
    ({"n_folds": 1}, "--folds must be at least 2"),
])
def test_site_preserved_errors(kwargs, message):
    labels, sites = cohort(n_sites=9)
    with pytest.raises(UserError, match=message):
        site_preserved_folds(labels, sites, seed=0, **kwargs)


def test_unknown_sites_rejected_for_site_preserved():
    labels, sites = cohort()
    sites.iloc[0] = "unknown"
    with pytest.raises(UserError, match="1 patients have no known site"):
        site_preserved_folds(labels, sites, 5, seed=0)


def test_infeasible_site_split_says_so():
    labels = pd.Series(["pos"] * 3 + ["neg"] * 30, index=[f"P{i}" for i in range(33)])
    sites = pd.Series(["A"] * 3 + [f"S{i % 6}" for i in range(30)], index=labels.index)  # all positives at site A
    with pytest.raises(UserError, match="gives every fold every class"):
        site_preserved_folds(labels, sites, 3, seed=0)


def test_small_class_and_small_cohort_errors():
    labels = pd.Series(["a"] * 10 + ["b"] * 3, index=[f"P{i}" for i in range(13)])
    with pytest.raises(UserError, match="class 'b' has only 3 patients, fewer than --folds 5"):
        stratified_folds(labels, 5, seed=0)
    with pytest.raises(UserError, match="only 3 patients left for --folds 5"):
        stratified_folds(labels.iloc[-4:-1], 5, seed=0)
    with pytest.raises(UserError, match="only one class left"):
        stratified_folds(labels.iloc[:10], 5, seed=0)


def test_strata_are_spread_while_classes_stay_balanced():
    labels, _ = cohort(n_sites=10, seed=4)
    strata = pd.Series(np.where(np.arange(len(labels)) % 4 == 0, "no-slide", "both"), index=labels.index)
    folds = stratified_folds(labels, 5, seed=0, strata=strata)
    by_class = pd.crosstab(folds, labels.reindex(folds.index))
    assert (by_class.max() - by_class.min()).max() <= 1
    for cls in labels.unique():
        in_class = labels.index[labels == cls]
        per_fold = pd.crosstab(folds[in_class], strata[in_class])
        assert (per_fold.max() - per_fold.min()).max() <= 1  # each stratum of each class spread evenly
