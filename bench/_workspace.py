"""What the benchmarks start from: a scratch directory with its own MLflow store, and a cohort."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow


@contextmanager
def workspace(cohort: Path | None) -> Iterator[tuple[Path, Path, str]]:
    """(scratch directory, `cohort` or a fresh demo cohort with features in it, tracking URI); the
    sqlite store becomes this process's tracking URI and goes with the directory."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        if cohort is None:
            from mmbrca.cli import _build_demo

            cohort = _build_demo(root / "demo")
        yield root, cohort, uri
