"""MLflow helpers shared by every step that records a run."""

from __future__ import annotations

import os

import mlflow

PROJECT_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the command it starts


def start_run(experiment: str, run_name: str, tags: dict[str, str] | None = None) -> mlflow.ActiveRun:
    """Start a tracked run, or continue the one `mlflow run` created for this command.

    Under `mlflow run` the project's run (and so its experiment, chosen with
    `mlflow run --experiment-name`) is reused; the run gets our name and tags.
    """
    tags = dict(tags or {})
    if os.environ.get(PROJECT_RUN_ENV):
        run = mlflow.start_run(run_id=os.environ[PROJECT_RUN_ENV])
        mlflow.set_tags({**tags, "mlflow.runName": run_name})
        return run
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags)
