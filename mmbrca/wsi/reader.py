"""Reading whole-slide images by physical resolution (µm per pixel), not by pyramid level.

Resolution comes from `openslide.mpp-x`; failing that from `openslide.objective-power` with the
common rule mpp = 10 / power (40× → 0.25 µm/px, 20× → 0.5 µm/px); failing that from a value the
user assumes. A slide with none of these cannot be tiled at a physical resolution and fails with
a clear reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

MICRONS_PER_OBJECTIVE_POWER = 10.0  # mpp ≈ 10 / objective power
LEVEL_TOLERANCE = 1e-3  # a level whose downsample is within 0.1 % of the wanted one counts as exact


class SlideError(Exception):
    """A slide that cannot be used: the message is the reason recorded in failures.csv."""


@dataclass(frozen=True)
class TileGeometry:
    """How to read a tile of `tile_size` px at `target_mpp` from a slide."""

    level: int
    level_mpp: float
    read_size: int  # pixels read at `level` (then resized to tile_size)
    tile_size: int
    level0_size: int  # the tile's extent in level-0 pixels
    downsample: float  # of `level`


class SlideReader:
    """An open slide with its resolution; reads tiles at a target resolution."""

    def __init__(self, path: str | os.PathLike, *, assume_mpp: float | None = None) -> None:
        self.path = Path(path)
        try:
            self.slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(_unsupported_reason(self.path)) from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"cannot open slide: {exc}") from None
        self.mpp, self.mpp_source = self._resolution(assume_mpp)

    def _resolution(self, assume_mpp: float | None) -> tuple[float, str]:
        props = self.slide.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        if mpp is not None and float(mpp) > 0:
            return float(mpp), "openslide.mpp-x"
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if power is not None and float(power) > 0:
            return MICRONS_PER_OBJECTIVE_POWER / float(power), "objective-power"
        if assume_mpp is not None:
            return float(assume_mpp), "assumed"
        raise SlideError("no resolution metadata (openslide.mpp-x or objective-power); pass --assume-mpp")

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.slide.dimensions

    def geometry(self, target_mpp: float, tile_size: int) -> TileGeometry:
        """The coarsest level at least as fine as `target_mpp`, and how much to read there.

        Reading finer and downsampling keeps detail; a target finer than level 0 upsamples level 0.
        """
        wanted = target_mpp / self.mpp  # downsample from level 0
        level = self.slide.get_best_level_for_downsample(wanted * (1 + LEVEL_TOLERANCE))
        downsample = float(self.slide.level_downsamples[level])
        level_mpp = self.mpp * downsample
        read_size = max(1, int(round(tile_size * target_mpp / level_mpp)))
        return TileGeometry(level=level, level_mpp=level_mpp, read_size=read_size, tile_size=tile_size,
                            level0_size=int(round(read_size * downsample)), downsample=downsample)

    def read_tile(self, x: int, y: int, geometry: TileGeometry) -> np.ndarray:
        """RGB uint8 (tile_size, tile_size, 3) whose top-left corner is (x, y) in level-0 pixels."""
        try:
            region = self.slide.read_region((int(x), int(y)), geometry.level, (geometry.read_size, geometry.read_size))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read tile at ({x}, {y}): {exc}") from None
        rgb = _flatten_alpha(region)
        if geometry.read_size != geometry.tile_size:
            rgb = rgb.resize((geometry.tile_size, geometry.tile_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(rgb)

    def thumbnail(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """RGB thumbnail at about `target_mpp` (never larger than level 0) and its exact mpp."""
        width, height = self.dimensions
        scale = max(target_mpp / self.mpp, 1.0)
        size = (max(1, int(round(width / scale))), max(1, int(round(height / scale))))
        try:
            image = self.slide.get_thumbnail(size)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read thumbnail: {exc}") from None
        return np.asarray(_flatten_alpha(image)), self.mpp * width / image.size[0]


def _unsupported_reason(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    if magic[:2] in (b"II", b"MM"):
        return "corrupt or truncated TIFF: OpenSlide cannot read it"
    return "not a slide format OpenSlide can read"


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGBA from OpenSlide → RGB on white (transparent = outside the scanned area = glass)."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background
