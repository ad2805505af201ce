"""Where the time of one fold goes, and how peak memory scales with the cohort.

    python bench/train_profile.py [--cohort COHORT] [--fold 0] [--epochs 40] [--memory-tiles 3000]

(1) Every fold of cross-attention on the demo cohort in one process: wall-time shares of data
    loading, training, evaluation, metric logging, artifacts and model logging, for the first fold
    (which also pays the process's one-time costs: the matplotlib import, MLflow's scan of the
    installed packages when it first writes a model's requirements) and for the later ones (median);
    target: logging + saving ≤ 10 % of a fold.
(2) Peak resident memory of a fold (in a fresh process each) on a cohort of N patients and on one
    of 2N patients, whose feature files hold `--memory-tiles` tiles per slide; prints the ratio
    2N/N of the peak and of the feature bytes on disk. Features are read lazily, so the peak
    should stay nearly flat while the data doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmbrca.config import load_config
from mmbrca.data.cohort import CohortOptions, build_cohort, load_cohort
from mmbrca.data.demo import DemoConfig, write_demo
from mmbrca.data.labels import LabelMap
from mmbrca.train import train_fold
from mmbrca.wsi.features import feature_file_names, write_features

from _workspace import workspace  # bench/ is on sys.path when a benchmark runs

PEAK_SNIPPET = """
import resource, sys
import mlflow
from mmbrca.config import load_config
from mmbrca.train import train_fold
mlflow.set_tracking_uri(sys.argv[2])
config = load_config(None, ["model.modality=cross_attention", "epochs=2", "bag_size=64", "fold=0"])
train_fold(sys.argv[1], config, progress=False, log_model=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


PHASES = ("data", "train", "eval", "reports", "log_metrics", "log_artifacts", "log_model")
LOGGING = ("log_metrics", "log_artifacts", "log_model")  # what MLflow costs; reports are written without it too


def share(timings: dict[str, float], phases=LOGGING) -> float:
    return sum(timings[p] for p in phases) / sum(timings.values())


def profile_fold(cohort: Path, fold: int, epochs: int, tracking_uri: str) -> None:
    """Every fold of the cohort in one process, starting with `fold`: the first pays the process's
    one-time costs (as `mlflow run . -P fold=k` does), the others run as a sweep runs its folds."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    n_folds = load_cohort(cohort).n_folds
    runs = []
    for k in [(fold + i) % n_folds for i in range(n_folds)]:
        config = load_config(None, [f"fold={k}", f"epochs={epochs}", f"patience={epochs}"])
        timings = train_fold(cohort, config, progress=False).timings
        runs.append((k, {phase: timings.get(phase, 0.0) for phase in PHASES}))
    first = runs[0][1]
    later = {phase: float(np.median([t[phase] for _, t in runs[1:]])) for phase in PHASES}
    print(f"(1) cross_attention, {epochs} epochs per fold; fold {runs[0][0]} first in the process, then folds "
          f"{', '.join(str(k) for k, _ in runs[1:])} (median)")
    print(f"    {'phase':<14} {'first fold':>18} {'later folds':>18} {'one-time':>9}")
    for phase in PHASES:
        print(f"    {phase:<14} {first[phase]:7.2f} s {share(first, [phase]):7.1%} "
              f"{later[phase]:7.2f} s {share(later, [phase]):7.1%} {first[phase] - later[phase]:7.2f} s")
    print(f"    {'fold':<14} {sum(first.values()):7.2f} s {'':8} {sum(later.values()):7.2f} s")
    print(f"    logging + saving share of a fold (later folds): {share(later):.3f} (target ≤ 0.10); "
          f"with the reports counted as logging {share(later, ('reports', *LOGGING)):.3f}")
    print(f"    first fold, with the process's one-time costs: {share(first):.3f}")
    print("    per fold:", ", ".join(f"fold {k} {share(t):.3f}" for k, t in runs))


def synthetic_feature_cohort(root: Path, patients: int, tiles: int) -> tuple[Path, int]:
    """A demo cohort (small slides) whose feature files hold `tiles` random tiles per slide."""
    raw = write_demo(root / "raw", DemoConfig(patients=patients, sites=4, genes=300, slide_width=1024,
                                              slide_height=1024), progress=False)
    cohort = build_cohort(root / "cohort", expression_path=raw / "expression.tsv", labels_path=raw / "labels.csv",
                          slides_dir=raw / "slides", options=CohortOptions(label_map=LabelMap.default())).path
    slides = sorted({p for paths in load_cohort(cohort).table["slide_paths"] for p in paths})
    names = feature_file_names(slides)
    rng = np.random.default_rng(0)
    for slide in slides:
        features = rng.normal(10, 1, (tiles, 2048)).astype(np.float16)
        coords = rng.integers(0, 1000, (tiles, 2))
        write_features(cohort / "features" / names[slide], features, coords, np.ones(tiles), {"key": "bench"})
    (cohort / "features" / "manifest.json").write_text(json.dumps({"params": {}, "slides": names}))
    size = sum(f.stat().st_size for f in (cohort / "features").glob("*.h5"))
    return cohort, size


def peak_memory(cohort: Path, tracking_uri: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, str(cohort), tracking_uri], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return int(out.stdout.strip().splitlines()[-1])  # KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, help="a cohort with features [default: a fresh demo]")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--memory-patients", type=int, default=40, help="0 skips part (2)")
    parser.add_argument("--memory-tiles", type=int, default=3000)
    args = parser.parse_args()
    with workspace(args.cohort) as (tmp, cohort, uri):
        profile_fold(cohort, args.fold, args.epochs, uri)
        if args.memory_patients <= 0:
            return
        small, small_bytes = synthetic_feature_cohort(tmp / "n", args.memory_patients, args.memory_tiles)
        large, large_bytes = synthetic_feature_cohort(tmp / "2n", 2 * args.memory_patients, args.memory_tiles)
        peak_small, peak_large = peak_memory(small, uri), peak_memory(large, uri)
    print(f"(2) peak RSS of a fold: {peak_small / 1024:.0f} MiB with N={args.memory_patients} patients "
          f"({small_bytes / 2**20:.0f} MiB of features), {peak_large / 1024:.0f} MiB with 2N "
          f"({large_bytes / 2**20:.0f} MiB of features)")
    print(f"    ratio 2N/N: peak memory {peak_large / peak_small:.2f}, feature bytes {large_bytes / small_bytes:.2f}")


if __name__ == "__main__":
    main()
