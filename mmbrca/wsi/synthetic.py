"""Synthetic H&E slides written as real pyramidal TIFF files (Aperio SVS layout or generic tiled TIFF).

The renderer draws tissue in stain concentration space and converts it to RGB with the
Beer-Lambert law (Ruifrok & Johnston stain vectors), so a site's stain shift is a change of
stain vectors and intensities, as with real scanners and staining protocols. Tissue appearance
follows a `TissueStyle`: nuclear density, size and pleomorphism, hematoxylin darkness, gland-like
structures and lymphocytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from mmbrca.io import atomic_path

# Optical density per unit stain, RGB (Ruifrok & Johnston 2001).
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)
GLASS = np.array([243.0, 241.0, 246.0], dtype=np.float32)
APERIO_VERSION = "Aperio Image Library v12.0.15"


@dataclass(frozen=True)
class Stain:
    """How a site stains and scans: stain vectors, stain strengths and the colour of empty glass."""

    hematoxylin: tuple[float, float, float] = tuple(HEMATOXYLIN)
    eosin: tuple[float, float, float] = tuple(EOSIN)
    h_strength: float = 1.0
    e_strength: float = 1.0
    glass: tuple[float, float, float] = tuple(GLASS)

    @classmethod
    def random(cls, rng: np.random.Generator) -> Stain:
        """A plausible site: stain vectors tilted a little, strengths ±30 %, glass tint ±4 levels."""

        def tilt(vector: np.ndarray) -> tuple[float, float, float]:
            v = np.clip(vector + rng.normal(0, 0.06, 3), 0.02, None)
            return tuple(float(x) for x in v / np.linalg.norm(v))

        return cls(hematoxylin=tilt(HEMATOXYLIN), eosin=tilt(EOSIN), h_strength=float(rng.uniform(0.75, 1.3)),
                   e_strength=float(rng.uniform(0.7, 1.3)),
                   glass=tuple(float(x) for x in np.clip(GLASS + rng.normal(0, 4, 3), 225, 252)))


@dataclass(frozen=True)
class TissueStyle:
    """Morphology of a tumour. Lengths are in micrometres, densities in nuclei per 1000 µm²."""

    nuclear_density: float = 6.0
    nuclear_radius: float = 3.5
    pleomorphism: float = 0.15  # relative s.d. of nuclear radius; also drives elongation
    darkness: float = 1.0  # hematoxylin concentration inside nuclei
    gland_fraction: float = 0.0  # share of nuclei lining gland-like lumens
    lymphocyte_density: float = 0.0  # small round dark nuclei per 1000 µm²
    stroma: float = 0.55  # eosin concentration of the background tissue


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def tissue_mask(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """Boolean mask of one or two smooth tissue fragments covering about `coverage` of the slide."""
    low = (max(shape[0] // 32, 8), max(shape[1] // 32, 8))
    yy, xx = np.mgrid[0:low[0], 0:low[1]].astype(np.float32)
    field = 0.6 * _smooth_noise(rng, low, sigma=min(low) / 10)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.3, 0.7) * low[0], rng.uniform(0.3, 0.7) * low[1]
        ry, rx = rng.uniform(0.2, 0.35) * low[0], rng.uniform(0.2, 0.35) * low[1]
        field = np.maximum(field, 2.0 - 2.0 * np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) + field * 0.3)
    # fade the field towards the edges so tissue ends inside the glass with a natural outline
    border = max(2.0, min(low) / 8)
    edge_distance = np.minimum.reduce([yy, xx, low[0] - 1 - yy, low[1] - 1 - xx])
    field = field - 4.0 * np.clip(1.0 - edge_distance / border, 0.0, 1.0) ** 2
    zoom = (shape[0] / low[0], shape[1] / low[1])
    full = ndimage.zoom(field, zoom, order=1)[: shape[0], : shape[1]]
    threshold = np.quantile(full, 1.0 - coverage)
    return full > threshold


def _stamp_nuclei(target: np.ndarray, rng: np.random.Generator, centres: np.ndarray, radius: np.ndarray,
                  intensity: np.ndarray, elongation: np.ndarray) -> None:
    """Draw filled ellipses (nuclei) into a concentration map, in place.

    Nuclei are grouped by the half-size of their bounding box so each group is one vectorised
    (N, K) inside-test over a box of K pixels, not one box of the largest size for all.
    """
    if len(centres) == 0:
        return
    angle = rng.uniform(0, np.pi, len(centres)).astype(np.float32)
    a = radius * (1 + elongation)  # semi-major axis, px
    b = radius / (1 + elongation)
    half = np.ceil(a).astype(int) + 1
    for size in np.unique(half):
        group = np.nonzero(half == size)[0]
        dy, dx = np.mgrid[-size:size + 1, -size:size + 1].reshape(2, -1).astype(np.float32)  # (K,)
        cos, sin = np.cos(angle[group])[:, None], np.sin(angle[group])[:, None]  # (N, 1)
        u = dx * cos + dy * sin  # (N, K)
        v = -dx * sin + dy * cos  # (N, K)
        inside = (u / a[group, None]) ** 2 + (v / b[group, None]) ** 2 <= 1.0  # (N, K)
        n_idx, k_idx = np.nonzero(inside)
        ys = centres[group[n_idx], 0].astype(np.int64) + dy[k_idx].astype(np.int64)
        xs = centres[group[n_idx], 1].astype(np.int64) + dx[k_idx].astype(np.int64)
        ok = (ys >= 0) & (ys < target.shape[0]) & (xs >= 0) & (xs < target.shape[1])
        ys, xs, values = ys[ok], xs[ok], intensity[group[n_idx[ok]]]
        target[ys, xs] = np.maximum(target[ys, xs], values)


def _points_in(mask: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n points drawn uniformly inside a boolean mask, as (n, 2) float (y, x)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0 or n <= 0:
        return np.zeros((0, 2), dtype=np.float32)
    pick = rng.integers(0, len(ys), n)
    jitter = rng.uniform(-0.5, 0.5, (n, 2))
    return np.stack([ys[pick], xs[pick]], axis=1).astype(np.float32) + jitter


def _glands(mask: np.ndarray, rng: np.random.Generator, n_lining: int, nuc_r: float, mpp: float,
            lumen: np.ndarray) -> np.ndarray:
    """Carve gland-like lumens into `lumen` (in place) and return the centres of their lining nuclei."""
    lining: list[np.ndarray] = []
    inner = ndimage.binary_erosion(mask[::8, ::8], iterations=3)
    while sum(len(x) for x in lining) < n_lining:
        centre = _points_in(inner, rng, 1)
        if len(centre) == 0:
            break
        cy, cx = centre[0] * 8
        radius = rng.uniform(12, 28) / mpp  # lumen radius, px
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, mask.shape[0]))
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, mask.shape[1]))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        lumen[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius - nuc_r) ** 2
        n = max(int(2 * np.pi * (radius + nuc_r) / (2.2 * nuc_r)), 6)
        theta = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        ring = radius + nuc_r * rng.uniform(0.6, 1.4, n)
        lining.append(np.stack([cy + ring * np.sin(theta), cx + ring * np.cos(theta)], axis=1))
    return np.concatenate(lining).astype(np.float32) if lining else np.zeros((0, 2), dtype=np.float32)


def _pen_stroke(rng: np.random.Generator, shape: tuple[int, int], tissue: np.ndarray) -> np.ndarray:
    """A thick wavy marker line on the glass, away from the tissue."""
    stroke = np.zeros(shape, dtype=bool)
    h, w = shape
    t = np.linspace(0, 1, 400)
    y = h * (0.08 + 0.05 * np.sin(2 * np.pi * (t * rng.uniform(1, 2) + rng.uniform())))
    if rng.random() < 0.5:
        y = h - y
    x = w * (0.15 + 0.7 * t)
    width = max(int(min(shape) * 0.006), 2)
    for yi, xi in zip(y.astype(int), x.astype(int)):
        stroke[max(yi - width, 0):yi + width, max(xi - width, 0):xi + width] = True
    return stroke & ~ndimage.binary_dilation(tissue[::4, ::4], iterations=4).repeat(4, 0).repeat(4, 1)[:h, :w]


def render_he(rng: np.random.Generator, shape: tuple[int, int], style: TissueStyle, stain: Stain, *,
              mpp: float = 0.5, coverage: float = 0.4, pen_mark: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Render an H&E-like RGB image (H, W, 3) uint8 and its boolean tissue mask (H, W)."""
    h, w = shape
    tissue = tissue_mask(rng, shape, coverage)
    area_um2 = tissue.sum() * mpp * mpp
    nuc_r = style.nuclear_radius / mpp  # px

    eosin = np.where(tissue, style.stroma, 0.0).astype(np.float32)  # (H, W)
    fibres = ndimage.gaussian_filter(rng.standard_normal((h // 2, w // 2), dtype=np.float32), (0.8, 4.0))
    eosin *= 1.0 + 0.25 * _smooth_noise(rng, (h // 16, w // 16), 3).repeat(16, 0).repeat(16, 1)[:h, :w]
    eosin *= 1.0 + 0.6 * fibres.repeat(2, 0).repeat(2, 1)[:h, :w]
    hema = np.zeros(shape, dtype=np.float32)  # (H, W)
    lumen = np.zeros(shape, dtype=bool)

    n_nuclei = int(style.nuclear_density * area_um2 / 1000)
    n_lining = int(n_nuclei * style.gland_fraction)
    lining = _glands(tissue, rng, n_lining, nuc_r, mpp, lumen) if n_lining else np.zeros((0, 2), np.float32)
    free = _points_in(tissue & ~lumen, rng, n_nuclei - len(lining))
    centres = np.concatenate([lining, free])
    radius = np.clip(nuc_r * (1 + style.pleomorphism * rng.standard_normal(len(centres))), nuc_r * 0.4, nuc_r * 2.2)
    intensity = np.clip(style.darkness * (1 + 0.15 * rng.standard_normal(len(centres))), 0.3, 2.5)
    elongation = np.clip(np.abs(rng.normal(0, style.pleomorphism * 1.5 + 0.05, len(centres))), 0, 0.8)
    _stamp_nuclei(hema, rng, centres, radius.astype(np.float32), intensity.astype(np.float32),
                  elongation.astype(np.float32))
    n_lymph = int(style.lymphocyte_density * area_um2 / 1000)
    if n_lymph:
        lymph = _points_in(tissue & ~lumen, rng, n_lymph)
        _stamp_nuclei(hema, rng, lymph, np.full(n_lymph, 2.2 / mpp, np.float32),
                      np.full(n_lymph, style.darkness * 1.5, np.float32), np.full(n_lymph, 0.05, np.float32))
    hema *= 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)  # chromatin texture
    hema = ndimage.gaussian_filter(hema, 0.7)
    eosin[lumen] *= 0.08
    eosin[hema > 0.2] *= 0.5

    od = (hema[..., None] * np.asarray(stain.hematoxylin, np.float32) * stain.h_strength
          + np.clip(eosin, 0, None)[..., None] * np.asarray(stain.eosin, np.float32) * stain.e_strength)  # (H, W, 3)
    rgb = np.asarray(stain.glass, np.float32) * np.exp(-od)
    if pen_mark:
        stroke = _pen_stroke(rng, shape, tissue)
        rgb[stroke] = rgb[stroke] * np.array([0.25, 0.55, 0.35], np.float32)  # green marker
    rgb += 2.0 * rng.standard_normal(rgb.shape, dtype=np.float32)  # sensor noise
    return np.clip(rgb, 0, 255).astype(np.uint8), tissue


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample by an integer factor (edges cropped to a multiple of it)."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    block = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).astype(np.float32)
    return np.ascontiguousarray(block.mean(axis=(1, 3)).round().astype(np.uint8))


def _label_image(rng: np.random.Generator, size: tuple[int, int] = (160, 160)) -> np.ndarray:
    """A slide label: white paper with a random 1-D barcode."""
    label = np.full((*size, 3), 250, dtype=np.uint8)
    bars = np.repeat(rng.random(size[1] // 4) < 0.5, 2)  # (W/2,)
    label[20:70, 10:10 + len(bars)][:, bars] = 20
    return label


def write_aperio_svs(path: str | os.PathLike, rgb: np.ndarray, *, mpp: float | None, app_mag: int | None,
                     downsamples: tuple[int, ...] = (4, 16), tile: int = 256, quality: int = 85,
                     rng: np.random.Generator | None = None) -> Path:
    """Write `rgb` as an Aperio SVS: tiled JPEG levels as separate pages, a stripped thumbnail
    as the second page, and label and macro images; the first ImageDescription carries AppMag and
    MPP (either may be left out, as on some real scanners' files).
    The file appears only when complete (temp file + rename).
    """
    path = Path(path)
    rng = rng or np.random.default_rng(0)
    h, w = rgb.shape[:2]
    head = f"{APERIO_VERSION} \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"
    meta = "|".join(
        ([f"AppMag = {app_mag}"] if app_mag else []) + ["StripeWidth = 2040", "ScanScope ID = SS1302",
                                                       f"Filename = {path.stem}"] + ([f"MPP = {mpp:.4f}"] if mpp else []))
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb", "metadata": None}
    thumb = downsample(rgb, max(1, max(h, w) // 768))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        tiff.write(rgb, tile=(tile, tile), description=f"{head} JPEG/RGB Q={quality}|{meta}", **jpeg)
        tiff.write(thumb, description=f"{APERIO_VERSION} \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - |{meta}",
                   **jpeg)
        for factor in downsamples:
            level = downsample(rgb, factor)
            tiff.write(level, tile=(tile, tile), subfiletype=1,
                       description=f"{head} -> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q={quality}", **jpeg)
        label = _label_image(rng)
        tiff.write(label, compression="lzw", photometric="rgb", metadata=None, subfiletype=1,
                   description=f"{APERIO_VERSION} \r\nlabel {label.shape[1]}x{label.shape[0]}")
        macro = downsample(rgb, max(1, max(h, w) // 512))
        tiff.write(macro, subfiletype=9, description=f"{APERIO_VERSION} \r\nmacro {macro.shape[1]}x{macro.shape[0]}",
                   **jpeg)
    return path


def write_generic_tiff(path: str | os.PathLike, rgb: np.ndarray, *, downsamples: tuple[int, ...] = (4,),
                       tile: int = 256, resolution_mpp: float | None = None) -> Path:
    """Write a generic tiled pyramidal TIFF (levels as separate pages), optionally with a
    TIFF resolution (pixels per centimetre), and no vendor metadata."""
    path = Path(path)
    options: dict = {"tile": (tile, tile), "compression": "jpeg", "photometric": "rgb", "metadata": None}
    if resolution_mpp is not None:
        options |= {"resolution": (1e4 / resolution_mpp, 1e4 / resolution_mpp), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        tiff.write(rgb, **options)
        for factor in downsamples:
            tiff.write(downsample(rgb, factor), subfiletype=1, **options)
    return path
