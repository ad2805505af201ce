"""Per-patient training examples: preprocessed expression and a bag of tile features read lazily.

Tile features stay on disk: an item reads only the rows it needs from the patient's HDF5 files,
so memory does not grow with the cohort.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbrca.wsi.features import count_tiles, read_features


@dataclass
class PatientRecord:
    patient_id: str
    label: int
    site: str
    genes: np.ndarray | None = None  # (G,) preprocessed
    feature_files: list[Path] = field(default_factory=list)
    tile_counts: list[int] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return sum(self.tile_counts)


def feature_files_by_patient(cohort_path: Path, slide_paths: dict[str, list[str]]) -> dict[str, list[Path]]:
    """patient → feature files of its slides that were extracted (failed slides are absent)."""
    manifest_path = cohort_path / "features" / "manifest.json"
    if not manifest_path.is_file():
        return {}
    files = json.loads(manifest_path.read_text())["slides"]
    out = {}
    for patient, slides in slide_paths.items():
        found = [cohort_path / "features" / files[s] for s in slides if s in files]
        if found:
            out[patient] = found
    return out


def attach_tile_counts(records: list[PatientRecord]) -> None:
    for record in records:
        record.tile_counts = [count_tiles(f) for f in record.feature_files]


class PatientBags(Dataset):
    """Items are dicts: genes (G,) or None, tiles (n, F) or None, label, index.

    With `bag_size`, each epoch samples up to that many tiles per patient (seeded by seed, epoch
    and patient); without it, every tile in file order (evaluation).
    """

    def __init__(self, records: list[PatientRecord], *, use_genes: bool, use_tiles: bool,
                 bag_size: int | None = None, seed: int = 0, tile_normalizer=None) -> None:
        self.records, self.use_genes, self.use_tiles = records, use_genes, use_tiles
        self.bag_size, self.seed, self.epoch = bag_size, seed, 0
        self.tile_mean = self.tile_scale = None
        if tile_normalizer is not None:
            self.tile_mean = torch.from_numpy(tile_normalizer.mean)  # (F,)
            self.tile_scale = torch.from_numpy(tile_normalizer.scale)  # (F,)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _tiles(self, index: int, record: PatientRecord) -> torch.Tensor:
        total = record.n_tiles
        if self.bag_size is None or total <= self.bag_size:
            chosen = np.arange(total)
        else:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            chosen = np.sort(rng.choice(total, self.bag_size, replace=False))
        parts, offset = [], 0
        for path, count in zip(record.feature_files, record.tile_counts):
            rows = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
            if len(rows):
                parts.append(read_features(path, rows).features)
            offset += count
        tiles = torch.from_numpy(np.concatenate(parts).astype(np.float32))  # (n, F)
        if self.tile_mean is not None:
            tiles = (tiles - self.tile_mean) / self.tile_scale
        return tiles

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "genes": torch.tensor(record.genes) if self.use_genes else None,
            "tiles": self._tiles(index, record) if self.use_tiles else None,
            "label": record.label,
            "index": index,
        }


@dataclass
class Batch:
    genes: torch.Tensor | None  # (B, G)
    tiles: torch.Tensor | None  # (B, N, F), zero-padded
    mask: torch.Tensor | None  # (B, N) True on real tiles
    labels: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> Batch:
        move = (lambda t: t.to(device, non_blocking=True) if t is not None else None)
        return Batch(move(self.genes), move(self.tiles), move(self.mask), move(self.labels), self.index)


def collate(items: list[dict]) -> Batch:
    genes = torch.stack([i["genes"] for i in items]) if items[0]["genes"] is not None else None
    tiles = mask = None
    if items[0]["tiles"] is not None:
        longest = max(len(i["tiles"]) for i in items)
        dim = items[0]["tiles"].shape[1]
        tiles = torch.zeros(len(items), longest, dim)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, item in enumerate(items):
            tiles[row, : len(item["tiles"])] = item["tiles"]
            mask[row, : len(item["tiles"])] = True
    return Batch(genes=genes, tiles=tiles, mask=mask, labels=torch.tensor([i["label"] for i in items]),
                 index=torch.tensor([i["index"] for i in items]))
