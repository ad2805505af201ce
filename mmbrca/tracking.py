"""MLflow helpers shared by every step that records a run."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd

if TYPE_CHECKING:
    from mmbrca.config import Config
    from mmbrca.data.cohort import Cohort
    from mmbrca.models import Classifier
    from mmbrca.train import FoldData

PROJECT_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the command it starts


def start_run(experiment: str, run_name: str, tags: dict[str, str] | None = None, *,
              parent_run_id: str | None = None, use_project_run: bool = True) -> mlflow.ActiveRun:
    """Start a tracked run, or continue the one `mlflow run` created for this command.

    Under `mlflow run` the project's run (and so its experiment, chosen with
    `mlflow run --experiment-name`) is reused for the command's main step; the run gets our name
    and tags. Other runs are created explicitly (`mlflow.start_run` alone would resume the
    project run): a child names its parent, which keeps the tree right with parallel workers.
    """
    tags = dict(tags or {})
    client = mlflow.MlflowClient()
    project_run = os.environ.get(PROJECT_RUN_ENV)
    if parent_run_id is not None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
    elif use_project_run and project_run and mlflow.active_run() is None:
        run = mlflow.start_run(run_id=project_run)
        mlflow.set_tags({**tags, "mlflow.runName": run_name})
        return run
    else:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    created = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return mlflow.start_run(run_id=created.info.run_id, nested=mlflow.active_run() is not None)


def log_config(config: Config, extra: dict | None = None) -> None:
    """Every hyperparameter as a param (one batched call)."""
    mlflow.log_params({**config.flat(), **(extra or {})})


def log_cohort_input(cohort: Cohort, data: FoldData) -> None:
    """The cohort as an MLflow dataset input, with this run's split of each patient."""
    split_of = data.split_of()
    table = cohort.table.drop(columns=["slide_paths"]).assign(
        fold=lambda t: t["patient_id"].map(cohort.folds), split=lambda t: t["patient_id"].map(split_of).fillna("unused"))
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice, and hints at integer columns as if this were
        # a model signature: neither concerns a dataset record
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_pandas(table, source=str(cohort.path.resolve()), name=cohort.path.resolve().name,
                                          targets="class_name", digest=cohort.fingerprint)
        for attempt in range(5):
            try:
                mlflow.log_input(dataset, context="training")
                return
            except mlflow.exceptions.MlflowException as exc:
                # Two workers registering the same dataset at once: the store's get-or-create races and one
                # insert violates the unique key; the row exists now, so the next attempt links to it.
                if "UNIQUE" not in str(exc) and "unique" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))


def write_fold_reports(workdir: Path, config: Config, cohort: Cohort, data: FoldData, predictions: pd.DataFrame) -> None:
    """The fold's results as files: PR curve, confusion matrix, test predictions, fold assignment, config."""
    from mmbrca.plots import confusion_matrix_png, pr_curve_png

    classes = data.classes
    predictions.to_csv(workdir / "test_predictions.csv", index=False)
    split_of = data.split_of()
    folds = cohort.folds.rename_axis("patient_id").reset_index()
    folds["split"] = folds["patient_id"].map(split_of).fillna("excluded (missing modality)")
    folds.to_csv(workdir / "folds.csv", index=False)
    (workdir / "config.yaml").write_text(config.to_yaml())
    y_true = predictions["true_class"].map(classes.index).to_numpy()
    scores = predictions[f"prob_{classes[-1]}"].to_numpy()
    predicted = predictions["predicted_class"].map(classes.index).to_numpy()
    title = f"{config.model.modality} fold {config.train.fold} (test)"
    pr_curve_png(workdir / "pr_curve.png", y_true == len(classes) - 1, scores, title=title, positive=classes[-1])
    confusion_matrix_png(workdir / "confusion_matrix.png", y_true, predicted, classes, title=title)


def log_model(workdir: Path, model: Classifier, config: Config, data: FoldData, cohort: Cohort):
    """The fold model; its input example is two test patients."""
    from mmbrca.registry import log_fold_model, model_input
    from mmbrca.wsi.extract import extraction_settings

    example = model_input(data.records["test"][:2], data.expression)
    # the settings that made the features, so a registered model can make them again from slides
    extraction = extraction_settings(cohort.path) if model.uses_tiles else None
    return log_fold_model(model=model.cpu(), config=config, preprocessor=data.preprocessor,
                          tile_normalizer=data.tile_normalizer, classes=data.classes, input_example=example,
                          workdir=workdir, extraction=extraction)


class MetricBuffer:
    """Per-epoch metrics sent in batches (one `log_batch` every `interval` seconds and at the end).

    One `log_metrics` call per epoch costs a round trip each; batching keeps logging out of the
    training time while the UI still sees progress every few seconds.
    """

    def __init__(self, run_id: str, interval: float = 10.0) -> None:
        import time

        self.run_id, self.interval, self._clock = run_id, interval, time.monotonic
        self.pending: list = []
        self.last_flush = self._clock()

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if self._clock() - self.last_flush >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        self.last_flush = self._clock()
