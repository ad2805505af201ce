"""Sweep benchmarks on the demo cohort, each measured side by side in one run.

    python bench/sweep_bench.py pruning [--cohort COHORT] [--trials 12] [--epochs 10]
    python bench/sweep_bench.py workers [--cohort COHORT] [--trials 8]

pruning: the same study (TPE, seed 0, same budget of trials, all five folds, objective val_loss) with MedianPruner
    (n_startup_trials=3, n_warmup_steps=1), WilcoxonPruner (default threshold) and NopPruner;
    prints the fraction of fold trainings each pruner saves against no pruning, and the best
    objectives.
workers: trials per minute of one study with 1, 2 and 4 worker processes on a journal file,
    after a one-trial warm-up sweep that pays the one-time costs (store creation, imports).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import optuna
import yaml

from mmbrca.sweep import load_sweep, run_sweep
from _workspace import workspace  # bench/ is on sys.path when a benchmark runs

PRUNERS = {
    "MedianPruner": {"name": "MedianPruner", "args": {"n_startup_trials": 3, "n_warmup_steps": 1}},
    "WilcoxonPruner": {"name": "WilcoxonPruner"},
    "NopPruner": {"name": "NopPruner"},
}


def spec_file(root: Path, name: str, cohort: Path, *, pruner: dict, trials: int, epochs: int, folds,
              modality: str = "cross_attention", objective: dict | None = None) -> Path:
    data = {
        "study_name": name, "cohort": str(cohort), "n_trials": trials, "folds": folds,
        "objective": objective or {"metric": "val_pr_auc", "direction": "maximize"},
        "sampler": {"name": "TPESampler", "args": {"seed": 0, "n_startup_trials": 4}}, "pruner": pruner,
        "fixed": {"model.modality": modality, "train.epochs": epochs, "train.patience": epochs},
        "search_space": {"train.lr": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
                         "model.dropout": {"type": "float", "low": 0.0, "high": 0.6},
                         "model.fusion_dim": {"type": "categorical", "choices": [32, 64, 128]}},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def folds_trained(study: optuna.Study) -> int:
    return sum(len(t.user_attrs.get("fold_run_ids", [])) for t in study.trials)


def bench_pruning(cohort: Path, root: Path, trials: int, epochs: int) -> None:
    results = {}
    for label, pruner in PRUNERS.items():
        spec = load_sweep(spec_file(root, f"prune-{label}", cohort, pruner=pruner, trials=trials, epochs=epochs,
                                    folds="all", modality="image",
                                    objective={"metric": "val_loss", "direction": "minimize"}))
        started = time.perf_counter()
        study = run_sweep(spec, storage=str(root / f"{label}.journal"), register=False)
        results[label] = (folds_trained(study), study.best_value, time.perf_counter() - started,
                          sum(t.state.name == "PRUNED" for t in study.trials))
    base_folds = results["NopPruner"][0]
    print(f"pruning: {trials} trials x 5 folds, image modality, objective val_loss (val PR-AUC saturates at 1.0 "
          f"on the demo), {epochs} epochs, TPE seed 0")
    for label, (folds, best, seconds, pruned) in results.items():
        print(f"  {label:<15} fold trainings {folds:3d}  saved {1 - folds / base_folds:6.1%}  pruned trials "
              f"{pruned:2d}  best val_loss {best:.4f}  {seconds:6.1f} s")


def bench_workers(cohort: Path, root: Path, trials: int) -> None:
    print(f"workers: {trials} trials x 2 folds, cross_attention, 3 epochs, journal file storage, "
          f"{os.cpu_count()} cores")
    rates = {}
    warm = load_sweep(spec_file(root, "warm-up", cohort, pruner={"name": "NopPruner"}, trials=1, epochs=1, folds=[0]))
    run_sweep(warm, storage=str(root / "warm.journal"), register=False)  # one-time costs (store, imports) first
    for workers in (1, 2, 4):
        spec = load_sweep(spec_file(root, f"workers-{workers}", cohort, pruner={"name": "NopPruner"}, trials=trials,
                                    epochs=3, folds=[0, 1]))
        started = time.perf_counter()
        run_sweep(spec, storage=str(root / f"w{workers}.journal"), workers=workers, register=False)
        rates[workers] = trials / (time.perf_counter() - started) * 60
        print(f"  {workers} worker(s): {rates[workers]:5.2f} trials/min  (x{rates[workers] / rates[1]:.2f} vs 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["pruning", "workers"])
    parser.add_argument("--cohort", type=Path)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with workspace(args.cohort) as (root, cohort, _):
        if args.what == "pruning":
            bench_pruning(cohort.resolve(), root, args.trials or 12, args.epochs)
        else:
            bench_workers(cohort.resolve(), root, args.trials or 8)


if __name__ == "__main__":
    main()
