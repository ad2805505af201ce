"""Slide files for tests: real TIFFs of several kinds, with known tissue regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmbrca.wsi.synthetic import Stain, TissueStyle, render_he, write_aperio_svs, write_generic_tiff


def tissue_image(seed: int = 0, size: tuple[int, int] = (1024, 1280)) -> tuple[np.ndarray, np.ndarray]:
    return render_he(np.random.default_rng(seed), size, TissueStyle(nuclear_density=8), Stain(), coverage=0.35)


def aperio(path: Path, *, mpp: float | None = 0.5, app_mag: int | None = 20, seed: int = 0,
           size: tuple[int, int] = (1024, 1280)) -> tuple[Path, np.ndarray]:
    rgb, mask = tissue_image(seed, size)
    return write_aperio_svs(path, rgb, mpp=mpp, app_mag=app_mag), mask


def generic(path: Path, seed: int = 0) -> Path:
    rgb, _ = tissue_image(seed)
    return write_generic_tiff(path, rgb)


def white(path: Path) -> Path:
    rgb = np.full((1024, 1024, 3), 244, np.uint8)
    rgb += np.random.default_rng(0).integers(0, 3, rgb.shape, dtype=np.uint8)
    return write_aperio_svs(path, rgb, mpp=0.5, app_mag=20)


def truncated(path: Path, seed: int = 0) -> Path:
    full, _ = aperio(path, seed=seed)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 3])
    return full


def not_a_slide(path: Path) -> Path:
    path.write_text("this is a text file with a slide's name\n")
    return path
