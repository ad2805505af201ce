"""Patient-level K-fold assignments: stratified, or site-preserved (each site in exactly one fold).

Site-preserved folds follow Howard et al., Nat Commun 2021: assign every tissue source site to one
fold by a small integer program that makes each fold's class counts as close as possible to an
even share. It is solved with `scipy.optimize.milp` (HiGHS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp

from mmbrca.errors import UserError

Split = Literal["stratified", "site-preserved"]
SPLITS = ("stratified", "site-preserved")
UNKNOWN_SITE = "unknown"


def _check_counts(labels: pd.Series, n_folds: int) -> None:
    if n_folds < 2:
        raise UserError(f"--folds must be at least 2, got {n_folds}")
    if len(labels) < n_folds:
        raise UserError(f"only {len(labels)} patients left for --folds {n_folds}: need at least one patient per fold")
    counts = labels.value_counts()
    if len(counts) < 2:
        raise UserError(f"only one class left after filtering ({counts.index[0]!r}, {counts.iloc[0]} patients); "
                        "need two classes to classify")
    small = counts[counts < n_folds]
    if len(small):
        raise UserError(f"class {small.index[0]!r} has only {small.iloc[0]} patients, fewer than --folds {n_folds}: "
                        "some fold would lack that class")


def stratified_folds(labels: pd.Series, n_folds: int, seed: int, strata: pd.Series | None = None) -> pd.Series:
    """Fold (0..K-1) per patient; `labels` is indexed by patient id. Deterministic for a seed.

    Within each class, patients are shuffled (seeded), ordered by `strata` (e.g. which
    modalities they have) and dealt to the folds in turn, continuing from class to class. Every
    fold then holds each class to within one patient, and each stratum is spread over the folds
    too. (scikit-learn's StratifiedKFold stratifies by one key only; stratifying by class ×
    stratum there loses the exact class balance.)
    """
    _check_counts(labels, n_folds)
    labels = labels.sort_index()
    strata = (strata.reindex(labels.index) if strata is not None else pd.Series("", index=labels.index)).astype(str)
    rng = np.random.default_rng(seed)
    folds = pd.Series(-1, index=labels.index, name="fold")
    offset = 0
    for cls in sorted(labels.unique()):
        members = labels.index[labels == cls][rng.permutation(int((labels == cls).sum()))]
        ordered = sorted(members, key=lambda patient: strata[patient])  # stable: shuffled within a stratum
        for position, patient in enumerate(ordered):
            folds[patient] = (offset + position) % n_folds
        offset = (offset + len(ordered)) % n_folds
    return folds


def _solve_site_assignment(counts: np.ndarray, n_folds: int, time_limit: float) -> np.ndarray:
    """counts: sites × classes. Returns the fold of each site, minimising Σ |fold class count − share|/class size.

    Variables: x[s, f] ∈ {0, 1} (site s in fold f), d[f, c] ≥ 0 (deviation of fold f for class c).
    Every site in one fold; every fold holds every class at least once.
    """
    n_sites, n_classes = counts.shape
    n_x, n_d = n_sites * n_folds, n_folds * n_classes
    share = counts.sum(axis=0) / n_folds  # (C,)
    cost = np.concatenate([np.zeros(n_x), np.tile(1.0 / counts.sum(axis=0), n_folds)])

    rows, lower, upper = [], [], []
    for s in range(n_sites):  # each site in exactly one fold
        row = np.zeros(n_x + n_d)
        row[s * n_folds:(s + 1) * n_folds] = 1
        rows.append(row), lower.append(1), upper.append(1)
    for f in range(n_folds):
        for c in range(n_classes):
            fold_count = np.zeros(n_x + n_d)
            fold_count[np.arange(n_sites) * n_folds + f] = counts[:, c]
            dev = np.zeros(n_x + n_d)
            dev[n_x + f * n_classes + c] = 1
            rows.append(fold_count - dev), lower.append(-np.inf), upper.append(share[c])  # count - d <= share
            rows.append(fold_count + dev), lower.append(share[c]), upper.append(np.inf)  # count + d >= share
            rows.append(fold_count), lower.append(1), upper.append(np.inf)  # the fold holds the class
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_d)])
    bounds = Bounds(np.zeros(n_x + n_d), np.concatenate([np.ones(n_x), np.full(n_d, np.inf)]))
    result = milp(cost, constraints=LinearConstraint(np.array(rows), lower, upper), integrality=integrality,
                  bounds=bounds, options={"time_limit": time_limit})
    if result.x is None:
        raise UserError(f"--split site-preserved: no assignment of {n_sites} sites to {n_folds} folds gives every "
                        f"fold every class ({result.message.strip()}); use fewer --folds or --split stratified")
    assignment = result.x[:n_x].reshape(n_sites, n_folds)
    return assignment.argmax(axis=1)


def site_preserved_folds(labels: pd.Series, sites: pd.Series, n_folds: int, seed: int, *,
                         time_limit: float = 60.0) -> pd.Series:
    """Fold per patient such that every site lies in exactly one fold, class counts balanced.

    The seed shuffles the order of sites given to the solver, so that equally good solutions
    are chosen reproducibly.
    """
    _check_counts(labels, n_folds)
    sites = sites.reindex(labels.index)
    if (sites == UNKNOWN_SITE).any() or sites.isna().any():
        n_unknown = int(((sites == UNKNOWN_SITE) | sites.isna()).sum())
        raise UserError(f"--split site-preserved: {n_unknown} patients have no known site; "
                        "give TCGA barcodes or --site-column")
    site_names = sorted(sites.unique())
    if len(site_names) < n_folds:
        raise UserError(f"--split site-preserved: {len(site_names)} sites for --folds {n_folds}: "
                        "need at least one site per fold")
    order = np.random.default_rng(seed).permutation(len(site_names))
    site_names = [site_names[i] for i in order]
    table = pd.crosstab(sites, labels).reindex(index=site_names).fillna(0)
    fold_of_site = dict(zip(site_names, _solve_site_assignment(table.to_numpy(float), n_folds, time_limit)))
    return pd.Series([fold_of_site[s] for s in sites], index=labels.index, name="fold").sort_index()


def make_folds(labels: pd.Series, sites: pd.Series, n_folds: int, split: Split, seed: int,
               strata: pd.Series | None = None) -> pd.Series:
    if split == "stratified":
        folds = stratified_folds(labels, n_folds, seed, strata)
    elif split == "site-preserved":
        folds = site_preserved_folds(labels, sites, n_folds, seed)
    else:
        raise UserError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    check_every_fold_has_every_class(folds, labels)
    return folds


def check_every_fold_has_every_class(folds: pd.Series, labels: pd.Series, classes: Sequence[str] | None = None) -> None:
    classes = list(classes) if classes is not None else sorted(labels.unique())
    table = pd.crosstab(folds, labels.reindex(folds.index)).reindex(columns=classes, fill_value=0)
    for fold, row in table.iterrows():
        missing = [c for c in classes if row[c] == 0]
        if missing:
            raise UserError(f"fold {fold} has no patient of class {missing[0]!r}; use fewer --folds or another --seed")
