"""Tissue detection on a low-resolution thumbnail: Otsu on saturation, minus glass, pen and borders.

H&E tissue is more saturated than glass. Otsu's threshold (scikit-image) on the HSV saturation
separates the two; pixels that are nearly black (scanner borders, folds out of focus), nearly
white, or green/cyan in hue (marker pen; H&E has no green) are removed; small specks are
dropped and small holes filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects


@dataclass(frozen=True)
class TissueMasker:
    """Fit/transform-style tissue masker; thresholds are fractions in [0, 1].

    min_saturation: floor for the Otsu threshold, so a tissue-free slide yields an empty mask
    instead of splitting glass noise in two.
    """

    min_saturation: float = 0.07
    max_value_for_black: float = 0.15
    pen_hue: tuple[float, float] = (70 / 360, 200 / 360)  # green to cyan
    min_object_um2: float = 2000.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_saturation < 1:
            raise ValueError(f"min_saturation must be in [0, 1), got {self.min_saturation=}")

    def threshold(self, rgb: np.ndarray) -> float:
        """Otsu threshold of saturation, never below `min_saturation`."""
        saturation = rgb2hsv(rgb)[..., 1]
        if np.ptp(saturation) == 0:
            return 1.0
        return max(float(threshold_otsu(saturation)), self.min_saturation)

    def transform(self, rgb: np.ndarray, mpp: float, threshold: float | None = None) -> np.ndarray:
        """Boolean tissue mask (H, W) of an RGB thumbnail whose pixels are `mpp` µm wide."""
        hsv = rgb2hsv(rgb)  # (H, W, 3) in [0, 1]
        hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        threshold = self.threshold(rgb) if threshold is None else threshold
        mask = saturation > threshold
        mask &= value > self.max_value_for_black
        pen = (hue >= self.pen_hue[0]) & (hue <= self.pen_hue[1]) & (saturation > self.min_saturation)
        mask &= ~ndimage.binary_dilation(pen, iterations=2)
        min_pixels = max(1, int(self.min_object_um2 / (mpp * mpp)))
        mask = remove_small_objects(mask, max_size=min_pixels)
        return remove_small_holes(mask, max_size=min_pixels)

    def fit_transform(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        return self.transform(rgb, mpp)
