import numpy as np
import pytest
from PIL import Image

from mmbrca.wsi.reader import SlideError, SlideReader
from tests.wsi import slides


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory):
    """Level-0 0.25 µm/px (40x), levels at downsample 1, 4, 16 → 0.25, 1.0, 4.0 µm/px."""
    path, _ = slides.aperio(tmp_path_factory.mktemp("s") / "40x.svs", mpp=0.25, app_mag=40, size=(2048, 2048))
    return path


@pytest.mark.parametrize(("target", "level", "read_size"), [
    (0.25, 0, 224), (0.5, 0, 448), (0.99, 0, 887), (1.0, 1, 224), (2.0, 1, 448), (4.0, 2, 224), (8.0, 2, 448),
    (0.2, 0, 179),  # finer than level 0: read less and upsample
])
def test_level_and_read_size_for_target_mpp(slide_40x, target, level, read_size):
    with SlideReader(slide_40x) as reader:
        geometry = reader.geometry(target, 224)
    assert (geometry.level, geometry.read_size) == (level, read_size)
    assert geometry.level0_size == pytest.approx(224 * target / 0.25, rel=0.01)


def test_tile_is_resampled_to_exact_size_and_matches_the_region(slide_40x):
    with SlideReader(slide_40x) as reader:
        geometry = reader.geometry(0.5, 224)
        tile = reader.read_tile(512, 512, geometry)
        region = reader.slide.read_region((512, 512), 0, (448, 448)).convert("RGB")
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    expected = np.asarray(region.resize((224, 224), Image.Resampling.BOX)).astype(float)
    assert np.abs(tile.astype(float) - expected).mean() < 4


def test_resolution_sources(tmp_path):
    path, _ = slides.aperio(tmp_path / "a.svs", mpp=0.4990, app_mag=20)
    with SlideReader(path) as reader:
        assert (reader.mpp, reader.mpp_source) == (pytest.approx(0.499), "openslide.mpp-x")
    path, _ = slides.aperio(tmp_path / "b.svs", mpp=None, app_mag=40)
    with SlideReader(path) as reader:
        assert (reader.mpp, reader.mpp_source) == (pytest.approx(0.25), "objective-power")
    generic = slides.generic(tmp_path / "c.tif")
    with pytest.raises(SlideError, match="no resolution metadata.*--assume-mpp"):
        SlideReader(generic)
    with SlideReader(generic, assume_mpp=0.5) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.5, "assumed")


def test_unreadable_files_say_why(tmp_path):
    with pytest.raises(SlideError, match="corrupt or truncated TIFF"):
        SlideReader(slides.truncated(tmp_path / "t.svs"))
    with pytest.raises(SlideError, match="not a slide format"):
        SlideReader(slides.not_a_slide(tmp_path / "n.svs"))
