"""Demo slides are real Aperio-layout pyramidal TIFFs that OpenSlide reads with resolution metadata."""

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from mmbrca.wsi.synthetic import Stain, TissueStyle, render_he, write_generic_tiff


def _slides(demo_raw):
    return sorted((demo_raw / "slides").glob("*.svs"))


def test_demo_slides_open_as_aperio_with_mpp_and_power(demo_raw):
    slides = _slides(demo_raw)
    assert slides
    for path in slides[:5]:
        with openslide.OpenSlide(path) as slide:
            props = slide.properties
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == pytest.approx(0.499)
            assert float(props["openslide.mpp-y"]) == pytest.approx(0.499)
            assert int(props["openslide.objective-power"]) == 20
            assert slide.level_count >= 3
            assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
            assert {"thumbnail", "label", "macro"} <= set(slide.associated_images)


def test_pages_are_tiled_jpeg_levels_with_a_stripped_thumbnail(demo_raw):
    with tifffile.TiffFile(_slides(demo_raw)[0]) as tif:
        pages = tif.pages
        assert pages[0].is_tiled and pages[0].compression == tifffile.COMPRESSION.JPEG
        assert pages[0].description.startswith("Aperio Image Library")
        assert "AppMag = 20" in pages[0].description and "MPP = 0.4990" in pages[0].description
        assert not pages[1].is_tiled  # thumbnail
        assert all(p.is_tiled for p in pages[2:4])  # lower levels, separate pages (not SubIFDs)
        assert not pages[0].subifds


def _tissue_fraction(rgb: np.ndarray) -> np.ndarray:
    """Pixels darker or more saturated than glass."""
    rgb = rgb.astype(float)
    saturation = (rgb.max(axis=-1) - rgb.min(axis=-1)) / np.maximum(rgb.max(axis=-1), 1)
    return saturation > 0.12


def test_tissue_covers_part_of_the_slide_and_the_border_is_glass(demo_raw):
    for path in _slides(demo_raw)[:5]:
        with openslide.OpenSlide(path) as slide:
            level = slide.level_count - 2
            rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        tissue = _tissue_fraction(rgb)
        assert 0.15 < tissue.mean() < 0.7
        border = np.concatenate([rgb[:4].reshape(-1, 3), rgb[-4:].reshape(-1, 3)])
        assert border.mean() > 215  # white/empty glass


def _mean_darkness(path) -> float:
    """Fraction of tissue pixels that are nuclei (dark), at full resolution."""
    with openslide.OpenSlide(path) as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB")).astype(float)
    tissue = _tissue_fraction(rgb)
    dark = rgb.mean(axis=-1) < 140
    return float(dark[tissue].mean())


def test_appearance_depends_on_class(demo_raw, demo_cohort):
    table = demo_cohort.table[demo_cohort.table["has_slide"]]
    darkness = pd.Series({row.patient_id: _mean_darkness(row.slide_paths[0]) for row in table.itertuples()})
    by_class = darkness.groupby(table.set_index("patient_id")["class_name"]).mean()
    assert by_class["Basal/Her2"] > 1.5 * by_class["Luminal"]


def test_sites_stain_differently():
    rng = np.random.default_rng(0)
    style = TissueStyle()
    a, mask_a = render_he(np.random.default_rng(1), (512, 512), style, Stain.random(rng))
    b, mask_b = render_he(np.random.default_rng(1), (512, 512), style, Stain.random(rng))
    assert (mask_a == mask_b).all()  # same tissue ...
    difference = np.abs(a[mask_a].astype(float).mean(axis=0) - b[mask_b].astype(float).mean(axis=0))
    assert difference.max() > 5  # ... another colour


def test_generic_tiff_has_no_vendor_resolution(tmp_path):
    rgb, _ = render_he(np.random.default_rng(0), (1024, 1024), TissueStyle(), Stain())
    path = write_generic_tiff(tmp_path / "plain.tif", rgb)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in slide.properties
        assert slide.level_count == 2
    with_res = write_generic_tiff(tmp_path / "res.tif", rgb, resolution_mpp=0.25)
    with openslide.OpenSlide(with_res) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
