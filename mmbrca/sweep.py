"""Optuna sweeps over the folds of a cohort, defined by `sweeps/*.yaml`.

The objective of a trial is the mean over folds of each fold's **inner-validation** metric (the
test folds are logged beside it, never optimised). After each fold the running mean is reported
to the pruner. Trials run in-process; N worker processes (or other hosts) share one Optuna
storage: a journal file on one host, PostgreSQL across hosts.

MLflow tree: sweep (parent) → trial-007 (child: sampled params, mean/std over folds) →
trial-007/fold-2 (grandchild: the trainer's full run), linked with explicit parent run ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import multiprocessing
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from mmbrca.config import load_config
from mmbrca.errors import UserError
from mmbrca.io import read_yaml_mapping

PARENT_RUN_ATTR = "mlflow_parent_run_id"
HEARTBEAT_ATTR = "mmbrca_heartbeat"
TOP_KEYS = {"study_name", "storage", "cohort", "sampler", "pruner", "n_trials", "timeout", "objective", "folds",
            "fixed", "search_space", "constraints", "register", "heartbeat_interval", "grace_period"}


@dataclass
class ParamSpec:
    name: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def suggest(self, trial: optuna.Trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)


@dataclass
class SweepSpec:
    path: Path
    text: str
    study_name: str
    storage: str | None
    cohort: str
    sampler: tuple[str, dict]
    pruner: tuple[str, dict]
    n_trials: int | None
    timeout: float | None
    metric: str
    direction: str
    folds: list[int] | None
    fixed: dict[str, object]
    space: list[ParamSpec]
    constraints: list[str]
    model_name: str
    alias: str
    heartbeat_interval: float = 30.0
    grace_period: float = 120.0


def _fail(path: Path, key: str, problem: str) -> UserError:
    return UserError(f"{path}: {key}: {problem}")


def _component(path: Path, key: str, value, module) -> tuple[str, dict]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise _fail(path, key, f"expected a name or {{name: ..., args: {{...}}}}, got {value!r}")
    name, args = value["name"], value.get("args") or {}
    if not isinstance(getattr(module, name, None), type):
        raise _fail(path, f"{key}.name", f"unknown {module.__name__.split('.')[-1][:-1]} {name!r}")
    if not isinstance(args, dict):
        raise _fail(path, f"{key}.args", f"expected a mapping, got {args!r}")
    return name, args


def _param(path: Path, name: str, raw) -> ParamSpec:
    key = f"search_space.{name}"
    if not isinstance(raw, dict) or raw.get("type") not in ("float", "int", "categorical"):
        raise _fail(path, key, "needs type: float, int or categorical")
    if raw["type"] == "categorical":
        if not isinstance(raw.get("choices"), list) or not raw["choices"]:
            raise _fail(path, f"{key}.choices", "expected a non-empty list")
        return ParamSpec(name, "categorical", choices=raw["choices"])
    for bound in ("low", "high"):
        if not isinstance(raw.get(bound), (int, float)) or isinstance(raw.get(bound), bool):
            raise _fail(path, f"{key}.{bound}", f"expected a number, got {raw.get(bound)!r}")
    if raw["low"] >= raw["high"]:
        raise _fail(path, key, f"low must be below high, got low={raw['low']}, high={raw['high']}")
    if raw.get("log") and raw["low"] <= 0:
        raise _fail(path, f"{key}.low", f"a log scale needs low > 0, got {raw['low']}")
    return ParamSpec(name, raw["type"], low=raw["low"], high=raw["high"], log=bool(raw.get("log", False)),
                     step=raw.get("step"))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; every error names the key and the problem."""
    path = Path(path)
    text, data = read_yaml_mapping(path, what="sweep")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _fail(path, sorted(unknown)[0], f"unknown key (expected {', '.join(sorted(TOP_KEYS))})")
    for required in ("study_name", "search_space", "objective"):
        if required not in data:
            raise _fail(path, required, "missing")
    objective = data["objective"]
    if not isinstance(objective, dict) or not str(objective.get("metric", "")).startswith("val_"):
        raise _fail(path, "objective.metric", f"must be an inner-validation metric (val_...), got "
                                              f"{objective.get('metric') if isinstance(objective, dict) else objective!r}")
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise _fail(path, "objective.direction", f"must be maximize or minimize, got {direction!r}")
    space = data["search_space"]
    if not isinstance(space, dict) or not space:
        raise _fail(path, "search_space", "expected a non-empty mapping of parameter → distribution")
    params = [_param(path, name, raw) for name, raw in space.items()]
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(path, "fixed", f"expected a mapping, got {fixed!r}")
    probe = {p.name: (p.choices[0] if p.kind == "categorical" else p.low) for p in params}
    try:  # names and types of fixed and searched parameters are checked against the config now
        load_config(None, [f"{k}={v}" for k, v in {**fixed, **probe}.items()
                           if k not in ("train.fold", "fold")], validate=False)
    except UserError as exc:
        raise _fail(path, "fixed/search_space", str(exc)) from None
    n_trials, timeout = data.get("n_trials"), data.get("timeout")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise _fail(path, "n_trials", f"expected a positive integer, got {n_trials!r}")
    if n_trials is None and timeout is None:
        raise _fail(path, "n_trials", "give n_trials, timeout or both")
    folds = data.get("folds", "all")
    if folds != "all" and (not isinstance(folds, list) or not all(isinstance(f, int) for f in folds) or not folds):
        raise _fail(path, "folds", f"expected 'all' or a list of fold numbers, got {folds!r}")
    constraints = data.get("constraints") or []
    if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
        raise _fail(path, "constraints", "expected a list of expressions")
    register = data.get("register") or {}
    return SweepSpec(
        path=path, text=text, study_name=str(data["study_name"]), storage=data.get("storage"),
        cohort=str(data.get("cohort", "mmbrca-demo/cohort")),
        sampler=_component(path, "sampler", data.get("sampler", {"name": "TPESampler", "args": {"seed": 0}}),
                           optuna.samplers),
        pruner=_component(path, "pruner", data.get("pruner", {"name": "MedianPruner",
                                                              "args": {"n_startup_trials": 3, "n_warmup_steps": 1}}),
                          optuna.pruners),
        n_trials=n_trials, timeout=timeout, metric=str(objective["metric"]), direction=direction,
        folds=None if folds == "all" else folds, fixed=fixed, space=params, constraints=constraints,
        model_name=str(register.get("model_name", data["study_name"])), alias=str(register.get("alias", "champion")),
        heartbeat_interval=float(data.get("heartbeat_interval", 30)), grace_period=float(data.get("grace_period", 120)))


# --------------------------------------------------------------------------------------------- storage


def resolve_storage(url: str | None, study_name: str) -> tuple[optuna.storages.BaseStorage, str]:
    """An Optuna storage and its canonical URL. Default: a journal file mmbrca-sweeps/<study>.journal."""
    url = url or f"mmbrca-sweeps/{study_name}.journal"
    if url.startswith(("postgresql", "mysql", "sqlite")):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), url
        except Exception as exc:  # sqlalchemy raises many kinds for a bad URL or an absent server
            raise UserError(f"--storage {url}: cannot open ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    path = Path(url.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend), f"journal:{path.resolve()}"


@contextlib.contextmanager
def study_lock(url: str):
    """Mutual exclusion between workers deciding whether to start a trial (exactly n_trials).

    A file lock beside a journal file (one host); a PostgreSQL advisory lock (several hosts).
    """
    if url.startswith("journal:"):
        with open(f"{url.removeprefix('journal:')}.mmbrca-lock", "a") as fh:  # Optuna owns <path>.lock
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        key = int(hashlib.sha1(url.encode()).hexdigest()[:15], 16)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        yield


class Heartbeat:
    """Records a timestamp on a running trial every `interval` seconds (works on every storage)."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def trial_id(storage, study: optuna.Study, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def fail_stale_trials(storage, study: optuna.Study, grace_period: float) -> list[int]:
    """RUNNING trials whose last heartbeat is older than `grace_period` become FAIL (a dead worker's)."""
    import mlflow

    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.system_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp())
        if now - last > grace_period:
            storage.set_trial_state_values(trial_id(storage, study, trial.number), TrialState.FAIL)
            failed.append(trial.number)
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                client = mlflow.MlflowClient()
                client.set_tag(run_id, "state", "FAIL")
                client.set_terminated(run_id, "KILLED")
    return failed


# --------------------------------------------------------------------------------------------- objective


def _check_constraints(spec: SweepSpec, params: dict[str, object]) -> str | None:
    """The first constraint the trial's full config (defaults, fixed, sampled) violates, if any."""
    values = load_config(None, [f"{k}={v}" for k, v in {**spec.fixed, **params}.items()], validate=False).flat()
    names = {k.replace(".", "__"): v for k, v in values.items()}
    for expression in spec.constraints:
        if not eval(expression.replace(".", "__"), {"__builtins__": {}}, names):  # noqa: S307 (user's own file)
            return expression
    return None


def _trial_overrides(spec: SweepSpec, params: dict[str, object], fold: int) -> list[str]:
    return [f"{k}={v}" for k, v in {**spec.fixed, **params}.items()] + [f"train.fold={fold}"]


_PRUNED = object()


def run_trial(trial: optuna.Trial, spec: SweepSpec, cohort: str, folds: list[int], parent_run_id: str) -> float:
    """Train every fold for the sampled parameters; report the running mean after each fold.

    Raises optuna.TrialPruned after the trial's MLflow run has ended normally (tag state=PRUNED).
    """
    value = _run_trial(trial, spec, cohort, folds, parent_run_id)
    if value is _PRUNED:
        raise optuna.TrialPruned()
    return value


def _run_trial(trial: optuna.Trial, spec: SweepSpec, cohort: str, folds: list[int], parent_run_id: str):
    import mlflow

    from mmbrca import tracking
    from mmbrca.train import train_fold

    import os
    import socket

    params = {p.name: p.suggest(trial) for p in spec.space}
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    client = mlflow.MlflowClient()
    with tracking.start_run("", f"trial-{trial.number:03d}", parent_run_id=parent_run_id,
                            tags={"mmbrca.step": "trial", "trial_number": str(trial.number),
                                  "study_name": spec.study_name}) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params(params)
        violated = _check_constraints(spec, params)
        if violated:
            mlflow.set_tags({"state": "PRUNED", "pruned_reason": f"constraint {violated}"})
            return _PRUNED
        per_fold: dict[str, list[float]] = {}
        fold_runs = []
        for step, fold in enumerate(folds):
            config = load_config(None, _trial_overrides(spec, params, fold))
            result = train_fold(cohort, config, progress=False, run_name=f"trial-{trial.number:03d}/fold-{fold}",
                                parent_run_id=run.info.run_id)
            fold_runs.append(result.run_id)
            for key, value in result.metrics.items():
                if key.startswith(("val_", "test_")) and not key.startswith("test_site"):
                    per_fold.setdefault(key, []).append(value)
            running = float(np.nanmean(per_fold[spec.metric]))
            trial.report(running, step)
            trial.set_user_attr("fold_run_ids", fold_runs)
            summary = {f"{k}_mean": float(np.nanmean(v)) for k, v in per_fold.items()}
            summary |= {f"{k}_std": float(np.nanstd(v)) for k, v in per_fold.items()}
            client.log_batch(run.info.run_id, metrics=[
                mlflow.entities.Metric(k, v, int(time.time() * 1000), step) for k, v in summary.items()
                if not math.isnan(v)])
            if trial.should_prune():
                mlflow.set_tags({"state": "PRUNED", "pruned_reason": f"pruner, after fold {fold}"})
                return _PRUNED
        trial.set_user_attr("cv_test", {k: [float(np.nanmean(v)), float(np.nanstd(v))]
                                        for k, v in per_fold.items() if k.startswith("test_")})
        mlflow.set_tag("state", "COMPLETE")
        return float(np.nanmean(per_fold[spec.metric]))


# --------------------------------------------------------------------------------------------- workers


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def worker(spec: SweepSpec, storage_url: str, cohort: str, folds: list[int], target: int | None,
           deadline: float | None, tracking_uri: str | None = None, n_workers: int = 1) -> int:
    """Run trials until the study holds `target` finished trials (or the deadline passes)."""
    import mlflow
    import torch

    from mmbrca.system import available_cores

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if n_workers > 1:  # share the cores: N processes × all cores each would oversubscribe them
        torch.set_num_threads(max(1, available_cores() // n_workers))
    storage, _ = resolve_storage(storage_url, spec.study_name)
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=_make(optuna.samplers, spec.sampler), pruner=_make(optuna.pruners, spec.pruner))
    parent_run_id = study.user_attrs[PARENT_RUN_ATTR]
    done = 0
    while deadline is None or time.time() < deadline:
        with study_lock(storage_url):
            fail_stale_trials(storage, study, spec.grace_period)
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if target is not None and _finished(study) + running >= target:
                break
            trial = study.ask()
        with Heartbeat(storage, trial_id(storage, study, trial.number), spec.heartbeat_interval):
            try:
                value = run_trial(trial, spec, cohort, folds, parent_run_id)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)  # failed by a peer?
            except Exception:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                run_id = trial.user_attrs.get("mlflow_run_id")
                if run_id:
                    mlflow.MlflowClient().set_tag(run_id, "state", "FAIL")
                raise
            else:
                study.tell(trial, value, skip_if_finished=True)
        done += 1
    return done


def _make(module, component: tuple[str, dict]):
    name, args = component
    try:
        return getattr(module, name)(**args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}: invalid arguments {args}: {exc}") from None


def _worker_entry(args: tuple) -> int:
    return worker(*args)


def run_sweep(spec: SweepSpec, *, cohort: str | None = None, n_trials: int | None = None, workers: int = 1,
              storage: str | None = None, study_name: str | None = None, experiment: str = "mmbrca",
              register: bool = True) -> optuna.Study:
    """Create or resume the study, run the workers, then log plots and register the best trial."""
    import mlflow

    from mmbrca.data.cohort import load_cohort

    if study_name:
        spec.study_name = study_name
    cohort = cohort or spec.cohort
    loaded = load_cohort(cohort)
    folds = spec.folds if spec.folds is not None else list(range(loaded.n_folds))
    bad = [f for f in folds if not 0 <= f < loaded.n_folds]
    if bad:
        raise UserError(f"{spec.path}: folds: fold {bad[0]} is out of range for {cohort} (0..{loaded.n_folds - 1})")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    storage_obj, storage_url = resolve_storage(storage or spec.storage, spec.study_name)
    study = optuna.create_study(study_name=spec.study_name, storage=storage_obj, direction=spec.direction,
                                sampler=_make(optuna.samplers, spec.sampler), pruner=_make(optuna.pruners, spec.pruner),
                                load_if_exists=True)
    with study_lock(storage_url):
        if PARENT_RUN_ATTR not in study.user_attrs:
            parent = _parent_run(experiment, spec, storage_url)
            client = mlflow.MlflowClient()
            client.log_batch(parent.info.run_id, params=[  # prefixed: the MLproject's own params share the run
                mlflow.entities.Param(f"sweep.{k}", str(v)[:6000]) for k, v in {
                    "study_name": spec.study_name, "sampler": spec.sampler[0], "sampler_args": spec.sampler[1],
                    "pruner": spec.pruner[0], "pruner_args": spec.pruner[1], "objective": spec.metric,
                    "direction": spec.direction, "folds": folds, "cohort": str(Path(cohort).resolve()),
                    "sweep_yaml": spec.text}.items()])
            study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
    target = n_trials or spec.n_trials
    deadline = time.time() + spec.timeout if spec.timeout else None
    args = (spec, storage_url, str(cohort), folds, target, deadline, mlflow.get_tracking_uri(), workers)
    if workers == 1:
        worker(*args)
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            pool.map(_worker_entry, [args] * workers)
    study = optuna.load_study(study_name=spec.study_name, storage=storage_obj)
    log_sweep_summary(study)
    if register and any(t.state == TrialState.COMPLETE for t in study.trials):
        from mmbrca.registry import register_best_trial

        register_best_trial(study, spec.model_name, spec.alias, cohort_fingerprint=loaded.fingerprint)
    return study


def _parent_run(experiment: str, spec: SweepSpec, storage_url: str):
    """The sweep's parent run: the `mlflow run -e sweep` run when there is one, else a new run."""
    import os

    import mlflow

    client = mlflow.MlflowClient()
    tags = {"mmbrca.step": "sweep", "study_name": spec.study_name, "storage": storage_url}
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if project_run:
        for key, value in {**tags, "mlflow.runName": f"sweep/{spec.study_name}"}.items():
            client.set_tag(project_run, key, value)
        return client.get_run(project_run)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, run_name=f"sweep/{spec.study_name}", tags=tags)


def log_sweep_summary(study: optuna.Study) -> None:
    """trials.csv and Optuna's plots (history, importances, parallel coordinates) on the parent run."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as ovm

    run_id = study.user_attrs[PARENT_RUN_ATTR]
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        client.log_artifact(run_id, str(tmp / "trials.csv"))
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        plots = {"optimization_history.png": ovm.plot_optimization_history,
                 "parallel_coordinate.png": ovm.plot_parallel_coordinate}
        if len(completed) >= 2:
            plots["param_importances.png"] = ovm.plot_param_importances
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances with a single distinct value
            figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(tmp / name, dpi=100)
            plt.close("all")
            client.log_artifact(run_id, str(tmp / name))
        best = study.best_trial if completed else None
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0) for k, v in {
            "n_complete": len(completed),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
            "n_fail": sum(t.state == TrialState.FAIL for t in study.trials),
            **({"best_value": best.value, "best_trial": best.number} if best else {})}.items()])
