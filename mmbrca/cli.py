"""The `mmbrca` command line. Each command parses options, calls the library and prints a summary.

Bad input raises `UserError`, reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmbrca.errors import UserError


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"mmbrca: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mmbrca")
def cli() -> None:
    """Multimodal breast-cancer subtyping: H&E slides + gene expression, cross-attention fusion."""


def _optional_path(_ctx, _param, value: str | None) -> Path | None:
    """An empty path (as an MLproject passes for 'not given') means the option is absent."""
    return Path(value) if value else None


def _parse_size(_ctx, _param, value: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 2560x2048, got {value!r}") from None
    return width, height


@cli.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--patients", default=60, show_default=True, help="Number of patients.")
@click.option("--sites", default=6, show_default=True, help="Number of tissue source sites (4-16).")
@click.option("--genes", default=2000, show_default=True, help="Number of genes in expression.tsv.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the output is deterministic for it.")
@click.option("--slide-size", default="2560x2048", show_default=True, callback=_parse_size,
              help="Level-0 slide size WIDTHxHEIGHT in pixels (multiples of 256).")
@click.option("--workers", type=int, default=None, help="Processes rendering slides [default: up to 4 cores].")
def demo_data(out: Path, patients: int, sites: int, genes: int, seed: int, slide_size: tuple[int, int],
              workers: int | None) -> None:
    """Write a TCGA-shaped raw demo dataset (slides/, expression.tsv, labels.csv) to OUT."""
    from mmbrca.data.demo import DemoConfig, write_demo

    config = DemoConfig(patients=patients, sites=sites, genes=genes, seed=seed, slide_width=slide_size[0],
                        slide_height=slide_size[1])
    write_demo(out, config, workers=workers)
    n_slides = len(list((out / "slides").glob("*.svs")))
    click.echo(f"demo data in {out}: {n_slides} slides, expression.tsv, labels.csv")


@cli.command("cohort")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--expression", "expression", default=None, callback=_optional_path,
              help="Expression matrix (CSV/TSV/Parquet), genes x samples or samples x genes.")
@click.option("--labels", "labels", type=click.Path(path_type=Path), required=True,
              help="Table of patient (or sample) ids and subtype labels (CSV/TSV/Parquet).")
@click.option("--slides", "slides", default=None, callback=_optional_path,
              help="Directory searched recursively for slides, matched to patients by barcode prefix.")
@click.option("--label-map", type=click.Path(path_type=Path), default=None,
              help="YAML with classes, map and drop [default: PAM50 -> Luminal vs Basal/Her2].")
@click.option("--id-column", default=None, help="Patient id column of the labels file [default: detected].")
@click.option("--label-column", default=None, help="Label column of the labels file [default: detected].")
@click.option("--site-column", default=None, help="Site column of the labels file [default: TCGA barcode].")
@click.option("--orientation", type=click.Choice(["auto", "genes-by-samples", "samples-by-genes"]),
              default="auto", show_default=True, help="Expression layout; auto matches ids to the labels.")
@click.option("--duplicate-genes", type=click.Choice(["error", "mean", "first"]), default="error",
              show_default=True, help="What to do with a gene id that appears twice.")
@click.option("--folds", default=5, show_default=True, help="Number of cross-validation folds.")
@click.option("--split", type=click.Choice(["stratified", "site-preserved"]), default="stratified",
              show_default=True, help="Stratified by class, or every site in exactly one fold.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fold assignment.")
def cohort(out: Path, expression: Path | None, labels: Path, slides: Path | None, label_map: Path | None,
           id_column: str | None, label_column: str | None, site_column: str | None, orientation: str,
           duplicate_genes: str, folds: int, split: str, seed: int) -> None:
    """Validate raw expression, labels and slides and build the cohort directory OUT."""
    from mmbrca.data.cohort import CohortOptions, build_cohort
    from mmbrca.data.labels import LabelMap
    from mmbrca.data.report import summary_lines

    options = CohortOptions(
        label_map=LabelMap.from_yaml(label_map) if label_map else LabelMap.default(),
        id_column=id_column, label_column=label_column, site_column=site_column, orientation=orientation,
        duplicate_genes=duplicate_genes, n_folds=folds, split=split, seed=seed)
    result = build_cohort(out, expression_path=expression, labels_path=labels, slides_dir=slides, options=options)
    click.echo("\n".join(summary_lines(result)))


def _extract_summary(result) -> str:
    return (f"slides: {len(result.done)} done, {len(result.cached)} cached, {len(result.failed)} failed; "
            f"{result.tiles} tiles in {result.seconds:.1f} s ({result.tiles_per_second:.1f} tiles/s)")


@cli.command("extract")
@click.argument("cohort_dir", metavar="COHORT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (torchvision IMAGENET1K_V2 from the torch cache), none (fixed random init) or PATH.")
@click.option("--tiles-per-slide", default=128, show_default=True, help="At most this many tissue tiles per slide.")
@click.option("--tile-size", default=224, show_default=True, help="Tile size in pixels at the target resolution.")
@click.option("--mpp", default=0.5, show_default=True, help="Target resolution in µm per pixel (0.5 ≈ 20x).")
@click.option("--min-tissue", default=0.5, show_default=True, help="Minimum tissue fraction of a kept tile.")
@click.option("--assume-mpp", type=float, default=None,
              help="Resolution for slides without mpp or objective-power metadata.")
@click.option("--seed", default=0, show_default=True, help="Seed of the tile sampling.")
@click.option("--batch-size", default=32, show_default=True, help="Tiles per model batch.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes reading tiles.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--experiment", default="mmbrca", show_default=True, help="MLflow experiment of the run.")
def extract(cohort_dir: Path, weights: str, tiles_per_slide: int, tile_size: int, mpp: float, min_tissue: float,
            assume_mpp: float | None, seed: int, batch_size: int, workers: int | None, device: str,
            experiment: str) -> None:
    """Tile every slide of COHORT and cache ResNet-50 features in COHORT/features (resumable)."""
    from mmbrca.wsi.extract import ExtractOptions, default_workers, extract_cohort

    options = ExtractOptions(weights=weights, mpp=mpp, tile_size=tile_size, tiles_per_slide=tiles_per_slide,
                             min_tissue=min_tissue, assume_mpp=assume_mpp, seed=seed, batch_size=batch_size,
                             workers=default_workers() if workers is None else workers, device=device)
    result = extract_cohort(cohort_dir, options, experiment=experiment)
    click.echo(_extract_summary(result))
    if result.failed:
        for slide, reason in sorted(result.failed.items()):
            click.echo(f"  failed: {Path(slide).name}: {reason}", err=True)
        click.echo(f"failures recorded in {cohort_dir / 'features' / 'failures.csv'}", err=True)
        raise SystemExit(1)


@cli.command("train")
@click.argument("cohort_dir", metavar="COHORT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fold", type=float, required=True, help="Test fold (0..K-1); the other folds train and validate.")
@click.option("--modality", type=click.Choice(["gene", "image", "concat", "cross_attention"]), default=None,
              help="Shorthand for --set model.modality=M [default: cross_attention].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config (sections model, preprocess, train).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set model.heads=8 --set lr=1e-3 (repeatable).")
@click.option("--experiment", default=None, help="MLflow experiment [default: mmbrca].")
@click.option("--demo-if-missing", is_flag=True,
              help="If COHORT does not exist, build the demo cohort with features there first.")
def train(cohort_dir: Path, fold: int, modality: str | None, config_path: Path | None, overrides: tuple[str, ...],
          experiment: str | None, demo_if_missing: bool) -> None:
    """Train and evaluate one fold of COHORT; everything is logged to MLflow."""
    from mmbrca.config import load_config
    from mmbrca.train import train_fold

    extra = [f"train.fold={fold:g}"] + ([f"model.modality={modality}"] if modality else [])
    extra += [f"experiment={experiment}"] if experiment else []
    config = load_config(config_path, list(overrides) + extra)
    if demo_if_missing and not (cohort_dir / "cohort.json").exists():
        import os

        from mmbrca.tracking import PROJECT_RUN_ENV

        project_run = os.environ.get(PROJECT_RUN_ENV)  # MLflow clears it when the demo's extract run ends
        _build_demo(cohort_dir.parent, cohort_name=cohort_dir.name, use_project_run=False)  # the run is training's
        if project_run:
            os.environ[PROJECT_RUN_ENV] = project_run
    result = train_fold(cohort_dir, config)
    test = {k: v for k, v in result.metrics.items() if k.startswith("test_") and not k.startswith("test_site")}
    click.echo(f"run {result.run_id}: best epoch {result.best_epoch} of {result.epochs_run}")
    click.echo("  ".join(f"{k}={v:.3f}" for k, v in test.items()))


@cli.command("sweep")
@click.argument("sweep_yaml", metavar="SWEEP_YAML", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--cohort", default=None, help="Cohort directory [default: the YAML's cohort].")
@click.option("--n-trials", type=float, default=None,
              help="Finished trials the study should hold [default: the YAML's; 0 also means the YAML's].")
@click.option("--workers", type=float, default=1, show_default=True, help="Worker processes on this host.")
@click.option("--storage", default=None, help="Optuna storage: postgresql://..., or a journal file path.")
@click.option("--study-name", default=None, help="Study name [default: the YAML's].")
@click.option("--experiment", default="mmbrca", show_default=True, help="MLflow experiment.")
@click.option("--no-register", is_flag=True, help="Do not register the best trial's model.")
def sweep(sweep_yaml: Path, cohort: str | None, n_trials: int | None, workers: int, storage: str | None,
          study_name: str | None, experiment: str, no_register: bool) -> None:
    """Run (or resume) an Optuna sweep over the folds; several hosts may share one storage."""
    from mmbrca.sweep import load_sweep, run_sweep

    spec = load_sweep(sweep_yaml)
    study = run_sweep(spec, cohort=cohort or None, n_trials=int(n_trials) if n_trials else None, workers=int(workers),
                      storage=storage or None, study_name=study_name or None, experiment=experiment,
                      register=not no_register)
    states = [t.state.name for t in study.trials]
    click.echo(f"study {study.study_name}: " + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states))))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        click.echo(f"best trial {study.best_trial.number}: {spec.metric} = {study.best_value:.4f} "
                   f"{study.best_trial.params}")


@cli.command("register")
@click.option("--study", "study_name", required=True, help="Study name.")
@click.option("--storage", required=True, help="The study's Optuna storage.")
@click.option("--model-name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, help="Alias moved if the new version is better.")
def register(study_name: str, storage: str, model_name: str, alias: str) -> None:
    """Register the best trial of a study (fold ensemble) in the MLflow model registry."""
    import optuna

    from mmbrca.registry import register_best_trial
    from mmbrca.sweep import resolve_storage

    storage_obj, _ = resolve_storage(storage, study_name)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_obj)
    except KeyError:
        raise UserError(f"--study {study_name}: no such study in {storage}") from None
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        raise UserError(f"--study {study_name}: no complete trial to register")
    version = register_best_trial(study, model_name, alias)
    click.echo(f"registered {model_name} version {version.version} (aliases: {', '.join(version.aliases) or 'none'})")


@cli.command("predict")
@click.option("--model", "model_uri", required=True,
              help="MLflow model URI: models:/NAME@champion, models:/NAME/3, runs:/RUN/ensemble, or a path.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output CSV.")
@click.option("--cohort", "cohort_dir", default=None, callback=_optional_path,
              help="Predict every patient of a cohort directory (its slides, or matching cached features).")
@click.option("--expression", default=None, callback=_optional_path,
              help="Expression matrix (CSV/TSV/Parquet) of the patients, either orientation.")
@click.option("--slides", "slides_dir", default=None, callback=_optional_path,
              help="Directory searched recursively for the patients' slides (matched by barcode prefix).")
@click.option("--fold", type=float, default=None,
              help="Use only the model of this test fold [default: all, averaged; -1 also means all].")
@click.option("--allow-missing-genes", is_flag=True,
              help="Impute genes missing from the input with the training mean instead of failing.")
@click.option("--cached-features/--no-cached-features", default=True, show_default=True,
              help="With --cohort: use its extracted features when they match the model's settings.")
@click.option("--out-of-fold", is_flag=True,
              help="With the model's training cohort: each patient by the fold model that did not train on it.")
@click.option("--chunk-size", default=8, show_default=True, help="Patients per model call.")
def predict(model_uri: str, out: Path, cohort_dir: Path | None, expression: Path | None, slides_dir: Path | None,
            fold: float | None, allow_missing_genes: bool, cached_features: bool, out_of_fold: bool,
            chunk_size: int) -> None:
    """Predict subtypes for new patients with a registered model, from raw slides and expression."""
    from mmbrca import predict as prediction
    from mmbrca.io import atomic_path

    if fold is not None and fold != int(fold):
        raise UserError(f"--fold must be a whole number, got {fold:g}")
    fold = None if fold is None or fold < 0 else int(fold)
    if cohort_dir is not None and (expression is not None or slides_dir is not None):
        raise UserError("--cohort cannot be combined with --expression or --slides")
    if out_of_fold and (cohort_dir is None or fold is not None):
        raise UserError("--out-of-fold needs --cohort (the model's training cohort) and no --fold")
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}")
    model = _load_model(model_uri)
    settings = getattr(model.unwrap_python_model(), "settings", None)
    if settings is None:
        raise UserError(f"--model {model_uri}: not a registered mmbrca model (a fold model's runs:/…/model takes "
                        "cached features in Python only); use models:/NAME@alias or a trial's runs:/RUN/ensemble")
    genes = settings.genes
    params = {k: v for k, v in {"fold": fold, "allow_missing_genes": allow_missing_genes or None}.items() if v is not None}
    if fold is not None and fold not in settings.folds:
        raise UserError(f"--fold {fold}: the model holds folds {settings.folds}")
    if cohort_dir is not None:
        frame = prediction.cohort_input(cohort_dir, genes, use_features=cached_features,
                                        extraction=settings.extraction)
        report = _training_cohort_check(cohort_dir, settings, out_of_fold=out_of_fold, fold=fold)
    else:
        frame, report = prediction.files_input(expression, slides_dir, genes)
    missing = prediction.missing_gene_columns(frame, genes) if genes else []
    if missing and not allow_missing_genes:
        raise UserError(prediction.describe_missing(missing, len(genes)) + " (--allow-missing-genes imputes them "
                        "with the training mean)")
    extra = [c for c in ("true_class", "fold") if c in frame]
    try:
        if out_of_fold:
            result = prediction.predict_out_of_fold(model, frame.drop(columns=extra), frame["fold"], settings,
                                                    params=params, chunk_size=chunk_size)
        else:
            result = prediction.predict_in_chunks(model, frame.drop(columns=extra), params=params,
                                                  chunk_size=chunk_size)
    except Exception as exc:  # the model reports bad input as MlflowException(INVALID_PARAMETER_VALUE)
        if getattr(exc, "error_code", None) != "INVALID_PARAMETER_VALUE":
            raise
        raise UserError(f"--model {model_uri}: {exc.message}") from None
    for column in extra:
        result[column] = frame[column].to_numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        result.to_csv(tmp, index=False)
    for line in report:
        click.echo(line, err=True)
    failed = result[result["status"] == prediction.STATUS_ERROR]
    click.echo(f"{len(result) - len(failed)} of {len(result)} patients predicted → {out}")
    if len(failed):
        for patient, message in zip(failed["patient_id"], failed["message"]):
            click.echo(f"  failed: {patient}: {message}", err=True)
        raise SystemExit(1)


def _training_cohort_check(cohort_dir: Path, settings, *, out_of_fold: bool, fold: int | None) -> list[str]:
    """Refuse out-of-fold predictions on another cohort; warn about ensembles on training patients."""
    from mmbrca.data.cohort import load_cohort

    fingerprint = load_cohort(cohort_dir).fingerprint
    same = settings.cohort_fingerprint is not None and fingerprint == settings.cohort_fingerprint
    if out_of_fold and not same:
        raise UserError(f"--out-of-fold: {cohort_dir} is not the model's training cohort (fingerprint "
                        f"{fingerprint[:12]}, the model's {str(settings.cohort_fingerprint)[:12]})")
    if same and not out_of_fold and fold is None:
        return ["warning: these patients trained the model's fold models (all but one each): ensemble predictions "
                "are optimistic; --out-of-fold gives held-out ones"]
    return []


def _load_model(uri: str):
    import mlflow

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MlflowException, OSError ... for an unknown name, version, run or path
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {uri}: cannot load ({message})") from None


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("mmbrca-demo"),
              show_default=True, help="Directory for the demo's raw data (raw/) and cohort (cohort/).")
@click.option("--patients", default=60, show_default=True, help="Number of demo patients.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--weights", default="none", show_default=True,
              help="Tile encoder weights: none runs offline; imagenet needs the torchvision cache.")
@click.option("--tiles-per-slide", default=16, show_default=True, help="Tiles encoded per demo slide.")
def demo(out: Path, patients: int, seed: int, weights: str, tiles_per_slide: int) -> None:
    """Run the pipeline on the built-in demo cohort: raw data (OUT/raw), cohort (OUT/cohort), features."""
    _build_demo(out, patients=patients, seed=seed, weights=weights, tiles_per_slide=tiles_per_slide)


def _build_demo(out: Path, *, cohort_name: str = "cohort", patients: int = 60, seed: int = 0, weights: str = "none",
                tiles_per_slide: int = 16, use_project_run: bool = True) -> Path:
    """Demo raw data in OUT/raw, the cohort in OUT/<cohort_name>, and its tile features."""
    from mmbrca.data.cohort import CohortOptions, build_cohort
    from mmbrca.data.demo import DemoConfig, write_demo
    from mmbrca.data.labels import LabelMap
    from mmbrca.data.report import summary_lines
    from mmbrca.wsi.extract import ExtractOptions, extract_cohort

    raw = write_demo(out / "raw", DemoConfig(patients=patients, seed=seed))
    click.echo(f"demo data in {raw}")
    result = build_cohort(out / cohort_name, expression_path=raw / "expression.tsv", labels_path=raw / "labels.csv",
                          slides_dir=raw / "slides", options=CohortOptions(label_map=LabelMap.default(), seed=seed))
    click.echo("\n".join(summary_lines(result)))
    extracted = extract_cohort(out / cohort_name, ExtractOptions(weights=weights, tiles_per_slide=tiles_per_slide,
                                                                 seed=seed), use_project_run=use_project_run)
    click.echo(_extract_summary(extracted))
    return out / cohort_name


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="mmbrca")


if __name__ == "__main__":
    main(sys.argv[1:])
