"""Shared fixtures: one small demo dataset and its cohort per test session (real files, fixed seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmbrca.data.cohort import CohortOptions, build_cohort
from mmbrca.data.demo import DemoConfig, write_demo
from mmbrca.data.labels import LabelMap

SMALL_DEMO = DemoConfig(patients=40, sites=5, genes=300, seed=7, slide_width=1024, slide_height=1024)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "raw", SMALL_DEMO, progress=False)


@pytest.fixture(scope="session")
def demo_cohort(demo_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    return build_cohort(out, expression_path=demo_raw / "expression.tsv", labels_path=demo_raw / "labels.csv",
                        slides_dir=demo_raw / "slides", options=CohortOptions(label_map=LabelMap.default(), seed=3))
