"""Gene preprocessing fitted on the training patients of a fold only, and saved with the model.

Steps: log2(x + 1) when the values look like raw counts or RSEM (non-negative, maximum above
LOG_THRESHOLD) or when asked; keep the `top_genes` genes of highest variance on the training
patients; standardise each gene with the training mean and standard deviation (scikit-learn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from mmbrca.errors import UserError

LOG_THRESHOLD = 50.0  # log-scale expression rarely exceeds ~20; raw RSEM/counts reach thousands


@dataclass
class GenePreprocessor:
    genes: list[str]
    log_transform: bool
    mean: np.ndarray  # (G,) after the log transform
    scale: np.ndarray  # (G,)

    @classmethod
    def fit(cls, train: pd.DataFrame, *, top_genes: int, log_transform: str = "auto",
            standardize: bool = True) -> GenePreprocessor:
        """Fit on training patients × genes (raw values)."""
        values = train.to_numpy(np.float64)
        if log_transform == "auto":
            use_log = bool(values.min() >= 0 and values.max() > LOG_THRESHOLD)
        else:
            use_log = log_transform == "yes"
        if use_log and values.min() < 0:
            raise UserError(f"preprocess.log_transform=yes but the expression has negative values (min {values.min()})")
        transformed = np.log2(values + 1) if use_log else values
        variance = transformed.var(axis=0)
        keep = np.sort(np.argsort(-variance, kind="stable")[: min(top_genes, len(variance))])
        scaler = StandardScaler(with_mean=standardize, with_std=standardize).fit(transformed[:, keep])
        mean = scaler.mean_ if standardize else np.zeros(len(keep))
        scale = scaler.scale_ if standardize else np.ones(len(keep))
        return cls(genes=[str(g) for g in train.columns[keep]], log_transform=use_log, mean=mean, scale=scale)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def transform(self, frame: pd.DataFrame, *, impute_missing: bool = False) -> np.ndarray:
        """Raw patients × genes (any superset of `genes`) → (N, G) float32 model input.

        With `impute_missing`, absent genes and NaN values become the training mean (0 after
        standardisation); without it they are an error.
        """
        missing = [g for g in self.genes if g not in frame.columns]
        if missing and not impute_missing:
            raise UserError(f"expression lacks {len(missing)} gene(s) the model uses, e.g. {missing[:5]}")
        values = frame.reindex(columns=self.genes).to_numpy(np.float64)
        if np.isnan(values).any() and not impute_missing:
            raise UserError("expression has missing (NaN) values for genes the model uses")
        if self.log_transform:
            values = np.log2(np.clip(values, 0, None) + 1)
        standardized = (values - self.mean) / self.scale
        return np.nan_to_num(standardized, nan=0.0).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps({"genes": self.genes, "log_transform": self.log_transform,
                           "mean": self.mean.tolist(), "scale": self.scale.tolist()})

    @classmethod
    def from_json(cls, text: str) -> GenePreprocessor:
        data = json.loads(text)
        return cls(genes=data["genes"], log_transform=data["log_transform"], mean=np.asarray(data["mean"]),
                   scale=np.asarray(data["scale"]))


@dataclass
class TileNormalizer:
    """Per-dimension standardisation of tile features, fitted on the training patients' tiles.

    CNN features share a large common offset (here often 10× their spread across tiles); without
    centring, every tile looks alike to the attention and the weights stay nearly uniform.
    """

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)

    @classmethod
    def fit(cls, feature_files: list) -> TileNormalizer:
        """Streams every training tile once (per-file sums), so memory stays flat."""
        from mmbrca.wsi.features import read_features

        total = squares = None
        count = 0
        for path in feature_files:
            features = read_features(path).features.astype(np.float64)  # (n, F)
            total = features.sum(0) if total is None else total + features.sum(0)
            squares = (features ** 2).sum(0) if squares is None else squares + (features ** 2).sum(0)
            count += len(features)
        if not count:
            raise UserError("no training tiles to fit the tile normaliser on")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
        return cls(mean=mean.astype(np.float32), scale=np.where(std > 1e-6, std, 1.0).astype(np.float32))

    def to_json(self) -> str:
        return json.dumps({"mean": self.mean.tolist(), "scale": self.scale.tolist()})

    @classmethod
    def from_json(cls, text: str) -> TileNormalizer:
        data = json.loads(text)
        return cls(mean=np.asarray(data["mean"], np.float32), scale=np.asarray(data["scale"], np.float32))
