"""Choosing tiles: a grid at the target resolution, kept where the tissue mask covers enough, sampled."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from mmbrca.wsi.reader import SlideError, SlideReader, TileGeometry
from mmbrca.wsi.tissue import TissueMasker

MASK_MPP = 8.0  # µm per pixel of the thumbnail the tissue mask is computed on


@dataclass(frozen=True)
class TilePlan:
    """The tiles to encode for one slide: level-0 top-left corners and how to read them."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y)
    geometry: TileGeometry
    tissue_fraction: np.ndarray  # (N,) float32
    n_candidates: int  # grid tiles with enough tissue, before sampling


def tissue_fractions(mask: np.ndarray, mask_scale: float, coords: np.ndarray, size: int) -> np.ndarray:
    """Mean of `mask` over each level-0 square (x, y, size) via a summed-area table.

    mask_scale: level-0 pixels per mask pixel.
    """
    table = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (H+1, W+1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / mask_scale).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / mask_scale).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size) / mask_scale).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size) / mask_scale).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return (total / area).astype(np.float32)


def slide_seed(seed: int, slide_name: str) -> int:
    """A per-slide seed that depends only on the run seed and the slide's file name."""
    return (seed * 1_000_003 + zlib.crc32(slide_name.encode())) % (2**32)


def plan_tiles(reader: SlideReader, *, target_mpp: float, tile_size: int, max_tiles: int, min_tissue: float,
               seed: int, masker: TissueMasker = TissueMasker()) -> TilePlan:
    """Tissue tiles of `reader`'s slide, at most `max_tiles`, sampled uniformly over the tissue area.

    The grid is aligned to level 0 with no overlap; a tile is kept when at least `min_tissue` of
    it is tissue. Sampling without replacement, seeded per slide, so a rerun picks the same tiles.
    """
    geometry = reader.geometry(target_mpp, tile_size)
    thumbnail, thumb_mpp = reader.thumbnail(max(MASK_MPP, target_mpp))
    mask = masker.fit_transform(thumbnail, thumb_mpp)
    mask_scale = thumb_mpp / reader.mpp
    width, height = reader.dimensions
    step = geometry.level0_size
    xs = np.arange(0, width - step + 1, step)
    ys = np.arange(0, height - step + 1, step)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)  # (G, 2)
    fraction = tissue_fractions(mask, mask_scale, grid, step)
    keep = fraction >= min_tissue
    if not keep.any():
        raise SlideError(f"no tissue: no {tile_size}px tile at {target_mpp} µm/px is ≥{min_tissue:.0%} tissue "
                         f"(tissue covers {mask.mean():.1%} of the thumbnail)")
    candidates, fraction = grid[keep], fraction[keep]
    rng = np.random.default_rng(slide_seed(seed, reader.path.name))
    chosen = np.sort(rng.permutation(len(candidates))[:max_tiles])
    return TilePlan(coords=candidates[chosen], geometry=geometry, tissue_fraction=fraction[chosen],
                    n_candidates=len(candidates))
