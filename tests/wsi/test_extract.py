"""Feature extraction on real slide files: cache, invalidation, atomicity, failures, determinism."""

import csv
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from torchvision.models import resnet50

from mmbrca.errors import UserError
from mmbrca.wsi.extract import ExtractOptions, extract_slides
from mmbrca.wsi.features import read_features, read_key, write_features
from tests.conftest import subprocess_env
from tests.wsi import slides

FAST = dict(weights="none", tiles_per_slide=3, tile_size=64, mpp=1.0, batch_size=2, workers=1)


@pytest.fixture(scope="module")
def good_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    return [str(slides.aperio(root / f"S{i}.svs", seed=i)[0]) for i in range(2)]


def test_features_shape_cache_hit_and_invalidation(good_slides, tmp_path):
    out = tmp_path / "features"
    first = extract_slides(good_slides, out, ExtractOptions(**FAST), progress=False)
    assert sorted(first.done) == sorted(good_slides) and first.encoder_loaded
    for path in good_slides:
        feats = read_features(out / f"{os.path.basename(path)[:-4]}.h5")
        assert feats.features.shape == (3, 2048) and feats.features.dtype == np.float16
        assert feats.coords.shape == (3, 2) and np.isfinite(feats.features.astype(float)).all()
        assert feats.attrs["params"]["tiles_per_slide"] == 3
    second = extract_slides(good_slides, out, ExtractOptions(**FAST), progress=False)
    assert sorted(second.cached) == sorted(good_slides) and not second.done
    assert not second.encoder_loaded and second.tiles == 0
    changed = extract_slides(good_slides, out, ExtractOptions(**{**FAST, "tiles_per_slide": 2}), progress=False)
    assert sorted(changed.done) == sorted(good_slides)
    os.utime(good_slides[0], ns=(time.time_ns(), time.time_ns()))  # the slide file changed
    touched = extract_slides(good_slides, out, ExtractOptions(**{**FAST, "tiles_per_slide": 2}), progress=False)
    assert touched.done == [good_slides[0]] and touched.cached == [good_slides[1]]


def test_deterministic_across_runs_and_worker_counts(good_slides, tmp_path):
    extract_slides(good_slides, tmp_path / "a", ExtractOptions(**FAST), progress=False)
    extract_slides(good_slides, tmp_path / "b", ExtractOptions(**{**FAST, "workers": 0, "batch_size": 3}),
                   progress=False)
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".h5"):
            a, b = read_features(tmp_path / "a" / name), read_features(tmp_path / "b" / name)
            np.testing.assert_array_equal(a.coords, b.coords)
            np.testing.assert_allclose(a.features.astype(float), b.features.astype(float), atol=2e-2, rtol=1e-2)


def test_failures_are_recorded_and_the_rest_processed(good_slides, tmp_path):
    bad = {
        str(slides.truncated(tmp_path / "truncated.svs")): "corrupt or truncated TIFF",
        str(slides.not_a_slide(tmp_path / "text.svs")): "not a slide format",
        str(slides.white(tmp_path / "white.svs")): "no tissue",
        str(slides.generic(tmp_path / "nompp.tif")): "no resolution metadata",
        str(tmp_path / "gone.svs"): "cannot stat slide",
    }
    out = tmp_path / "features"
    result = extract_slides(list(bad) + good_slides, out, ExtractOptions(**FAST), progress=False)
    assert sorted(result.done) == sorted(good_slides)
    assert set(result.failed) == set(bad)
    for path, reason in bad.items():
        assert reason in result.failed[path]
    with open(out / "failures.csv") as fh:
        rows = {r["slide"]: r["reason"] for r in csv.DictReader(fh)}
    assert rows == result.failed
    assert sorted(p.name for p in out.glob("*.h5")) == ["S0.h5", "S1.h5"]
    assumed = extract_slides([str(tmp_path / "nompp.tif")], out, ExtractOptions(**FAST, assume_mpp=0.5),
                             progress=False)
    assert assumed.done and read_features(out / "nompp.h5").attrs["mpp_source"] == "assumed"


def test_exception_mid_write_leaves_no_file(tmp_path):
    target = tmp_path / "slide.h5"
    with pytest.raises(TypeError):
        write_features(target, np.zeros((2, 2048)), np.zeros((2, 2)), np.ones(2), {"key": "k", "bad": object()})
    assert not target.exists() and not list(tmp_path.iterdir())


def test_killed_run_resumes_without_partial_files(demo_cohort, tmp_path):
    import shutil

    cohort = tmp_path / "cohort"
    shutil.copytree(demo_cohort.path, cohort)
    env = subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    command = [sys.executable, "-m", "mmbrca", "extract", str(cohort), "--weights", "none", "--tiles-per-slide", "4",
               "--tile-size", "96", "--workers", "1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    features = cohort / "features"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(features.glob("*.h5"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = list(features.glob("*.h5"))
    assert finished, "the run was killed before any slide finished"
    for path in finished:  # every visible feature file is complete
        with h5py.File(path) as h5:
            assert h5["features"].shape == (4, 2048) and h5.attrs["key"]
    keys_before = {p.name: read_key(p) for p in finished}
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    n_slides = int(demo_cohort.table["n_slides"].sum())
    assert f"{len(finished)} cached" in rerun.stdout and f"{n_slides - len(finished)} done" in rerun.stdout
    assert not list(features.glob(".*.tmp"))
    assert {p.name: read_key(p) for p in finished} == keys_before


def test_weights_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens: fail fast, as offline
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    from mmbrca.wsi.features import build_encoder

    with pytest.raises(UserError, match=r"--weights imagenet: .*not in the torch cache .*--weights PATH.*--weights none"):
        build_encoder("imagenet")
    model = resnet50(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    encoder, identity = build_encoder(str(tmp_path / "w.pth"))
    assert identity.startswith("sha256:")
    torch.testing.assert_close(encoder.conv1.weight, model.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a ResNet-50 state dict"):
        build_encoder(str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="file not found"):
        build_encoder(str(tmp_path / "missing.pth"))
    a, _ = build_encoder("none")
    b, _ = build_encoder("none")
    torch.testing.assert_close(a.conv1.weight, b.conv1.weight)  # the same network every time


def test_lazy_partial_read(good_slides, tmp_path):
    extract_slides(good_slides[:1], tmp_path, ExtractOptions(**FAST), progress=False)
    path = next(tmp_path.glob("*.h5"))
    full = read_features(path)
    part = read_features(path, indices=np.array([2, 0]))
    np.testing.assert_array_equal(part.features, full.features[[0, 2]])


@pytest.mark.parametrize(("field", "value"), [("mpp", 0), ("tile_size", 8), ("tiles_per_slide", 0),
                                              ("min_tissue", 1.5), ("assume_mpp", -1.0)])
def test_invalid_options(field, value):
    with pytest.raises(UserError, match="invalid value"):
        ExtractOptions(**{field: value})
