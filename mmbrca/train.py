"""Train and evaluate one fold: `mmbrca train COHORT --fold K`.

Fold K is the test fold and is used only for the final test metrics. A stratified inner
validation split of the other folds drives early stopping and model selection. Gene
preprocessing is fitted on the training patients only.
"""

from __future__ import annotations

import math
import random
import subprocess
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmbrca.config import Config
from mmbrca.data.bags import PatientBags, PatientRecord, attach_tile_counts, collate, feature_files_by_patient
from mmbrca.data.cohort import Cohort, load_cohort
from mmbrca.data.preprocess import GenePreprocessor, TileNormalizer
from mmbrca.errors import UserError
from mmbrca.metrics import classification_metrics
from mmbrca.models import Classifier, build_model
from mmbrca.registry import predict_records
from mmbrca.system import resolve_device

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class FoldData:
    records: dict[str, list[PatientRecord]]  # split → patients
    preprocessor: GenePreprocessor | None
    tile_normalizer: TileNormalizer | None
    excluded: int  # patients lacking a modality the model needs
    classes: list[str]
    expression: pd.DataFrame | None = None  # raw values of the model's genes, patients × genes

    def split_of(self) -> dict[str, str]:
        """patient → train, val or test."""
        return {r.patient_id: name for name, records in self.records.items() for r in records}


@dataclass
class FoldResult:
    run_id: str | None
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    predictions: pd.DataFrame
    attention: dict[str, object]
    timings: dict[str, float] = field(default_factory=dict)
    model: Classifier | None = None
    data: FoldData | None = None


class Timer:
    """Wall-time per phase (data, train, eval, reports, log_metrics, log_artifacts, log_model) for benchmarks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- setup


def check_inputs(cohort: Cohort, config: Config) -> tuple[bool, bool]:
    """Bad input caught before any training. Returns (uses_genes, uses_tiles)."""
    fold, modality = config.train.fold, config.model.modality
    if not 0 <= fold < cohort.n_folds:
        raise UserError(f"--fold {fold} is out of range: {cohort.path} has folds 0..{cohort.n_folds - 1}")
    uses_genes = modality in ("gene", "concat", "cross_attention")
    uses_tiles = modality in ("image", "concat", "cross_attention")
    if uses_tiles and not (cohort.path / "features" / "manifest.json").is_file():
        raise UserError(f"{cohort.path}: modality {modality!r} needs tile features and the cohort has none; "
                        f"run `mmbrca extract {cohort.path}` first")
    if uses_genes and not cohort.table["has_expression"].any():
        raise UserError(f"{cohort.path}: modality {modality!r} needs expression and no patient has any "
                        "(the cohort was built without --expression)")
    return uses_genes, uses_tiles


def _split_patients(eligible: pd.DataFrame, folds: pd.Series, config: Config) -> dict[str, list[str]]:
    fold = config.train.fold
    in_test = eligible["patient_id"].map(folds) == fold
    test, rest = eligible[in_test], eligible[~in_test]
    try:
        train, val = train_test_split(rest, test_size=config.train.val_fraction, stratify=rest["class_index"],
                                      random_state=config.train.seed)
    except ValueError as exc:
        raise UserError(f"fold {fold}: cannot make a stratified validation split of {len(rest)} training patients "
                        f"({exc})") from None
    splits = {"train": train, "val": val, "test": test}
    if test.empty:
        raise UserError(f"fold {fold}: no patient of the test fold has the inputs of modality {config.model.modality!r}")
    for name in ("train", "val"):  # a one-class test fold is allowed: its AUCs are NaN, the rest is reported
        part = splits[name]
        if part["class_index"].nunique() < 2:
            raise UserError(f"fold {fold}: the {name} split has {len(part)} patients of a single class; "
                            "the modality leaves too few patients")
    return {name: sorted(part["patient_id"]) for name, part in splits.items()}


def setup_data(cohort: Cohort, config: Config, uses_genes: bool, uses_tiles: bool) -> FoldData:
    table = cohort.table.set_index("patient_id", drop=False)
    slides = {p: list(paths) for p, paths in zip(table["patient_id"], table["slide_paths"])}
    files = feature_files_by_patient(cohort.path, slides) if uses_tiles else {}
    eligible = table
    if uses_genes:
        eligible = eligible[eligible["has_expression"]]
    if uses_tiles:
        eligible = eligible[eligible["patient_id"].isin(files)]
    if eligible.empty:
        need = " and ".join(n for n, used in (("expression", uses_genes), ("tile features", uses_tiles)) if used)
        raise UserError(f"{cohort.path}: no patient has {need} for modality {config.model.modality!r}")
    splits = _split_patients(eligible, cohort.folds, config)

    preprocessor, genes, raw = None, None, None
    if uses_genes:
        expression = cohort.expression()
        preprocessor = GenePreprocessor.fit(expression.loc[splits["train"]], top_genes=config.preprocess.top_genes,
                                            log_transform=config.preprocess.log_transform,
                                            standardize=config.preprocess.standardize)
        genes = pd.DataFrame(preprocessor.transform(expression), index=expression.index)
        raw = expression[preprocessor.genes].copy()
    records = {}
    for name, patients in splits.items():
        records[name] = [PatientRecord(patient_id=p, label=int(table.at[p, "class_index"]), site=str(table.at[p, "site"]),
                                       genes=genes.loc[p].to_numpy() if genes is not None else None,
                                       feature_files=files.get(p, [])) for p in patients]
        if uses_tiles:
            attach_tile_counts(records[name])
    tile_normalizer = (TileNormalizer.fit([f for r in records["train"] for f in r.feature_files])
                       if uses_tiles else None)
    return FoldData(records=records, preprocessor=preprocessor, tile_normalizer=tile_normalizer,
                    excluded=len(table) - len(eligible), classes=list(cohort.classes), expression=raw)


def _lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 5 % of the base rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# ---------------------------------------------------------------------------------------------- loop


def _class_weights(records: list[PatientRecord], n_classes: int) -> torch.Tensor:
    counts = np.bincount([r.label for r in records], minlength=n_classes).astype(float)
    return torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def evaluate(model: Classifier, records: list[PatientRecord], split: str, loss_fn, device: torch.device,
             batch_size: int, tile_normalizer: TileNormalizer | None) -> tuple[dict[str, float], np.ndarray, list]:
    probabilities, attention = predict_records(model, records, use_genes=model.uses_genes, use_tiles=model.uses_tiles,
                                               device=device, batch_size=batch_size, tile_normalizer=tile_normalizer)
    labels = np.array([r.label for r in records])
    loss = float(loss_fn(torch.log(torch.from_numpy(probabilities).clamp_min(1e-7)), torch.from_numpy(labels)))
    return classification_metrics(labels, probabilities, split=split, loss=loss), probabilities, attention


def train_fold(cohort_dir: str | Path, config: Config, *, progress: bool = True, log_model: bool = True,
               run_name: str | None = None, parent_run_id: str | None = None) -> FoldResult:
    """Train one fold, log everything to MLflow, and return the metrics and predictions."""
    import mlflow

    from mmbrca import tracking

    cohort = load_cohort(cohort_dir)
    uses_genes, uses_tiles = check_inputs(cohort, config)
    cfg = config.train
    run_name = run_name or f"{config.model.modality}/fold-{cfg.fold}"
    timer = Timer()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device, option="train.device")
    with timer("data"):
        data = setup_data(cohort, config, uses_genes, uses_tiles)
    with tracking.start_run(config.experiment, run_name, tags=_tags(cohort, config), parent_run_id=parent_run_id) as run:
        with timer("log_metrics"):
            tracking.log_config(config, extra={"n_train": len(data.records["train"]), "n_val": len(data.records["val"]),
                                               "n_test": len(data.records["test"]), "n_excluded_missing_modality":
                                               data.excluded, "n_genes": data.preprocessor.n_genes if data.preprocessor else 0})
            tracking.log_cohort_input(cohort, data)
        metric_buffer = tracking.MetricBuffer(run.info.run_id)
        model, best_epoch, epochs_run = _fit(data, config, device, timer, metric_buffer, progress)
        with timer("eval"):
            metrics, outputs = {}, {}
            loss_fn = torch.nn.NLLLoss(weight=_class_weights(data.records["train"], len(data.classes)))
            for split in SPLIT_NAMES:
                values, probabilities, attention = evaluate(model, data.records[split], split, loss_fn, device,
                                                            cfg.batch_size, data.tile_normalizer)
                metrics |= values
                outputs[split] = (probabilities, attention)
        predictions = _prediction_table(data.records["test"], outputs["test"][0], data.classes)
        metrics |= _per_site_metrics(predictions, data.classes)
        with timer("log_metrics"):
            mlflow.log_metrics({**metrics, "best_epoch": best_epoch, "epochs_run": epochs_run})
        with tempfile.TemporaryDirectory() as tmp:
            with timer("reports"):
                tracking.write_fold_reports(Path(tmp), config, cohort, data, predictions)
            with timer("log_artifacts"):
                mlflow.log_artifacts(tmp)
        if log_model:
            with timer("log_model"), tempfile.TemporaryDirectory() as tmp:
                tracking.log_model(Path(tmp), model, config, data, cohort)
        run_id = run.info.run_id
    attention = {r.patient_id: a for r, a in zip(data.records["test"], outputs["test"][1])}
    return FoldResult(run_id=run_id, metrics=metrics, best_epoch=best_epoch, epochs_run=epochs_run,
                      predictions=predictions, attention=attention, timings=dict(timer.seconds), model=model, data=data)


def _fit(data: FoldData, config: Config, device: torch.device, timer: Timer, metric_buffer, progress: bool
         ) -> tuple[Classifier, int, int]:
    """The training loop: AdamW, warm-up + cosine schedule, clipping, early stopping on validation."""
    cfg = config.train
    model = build_model(config.model, n_genes=data.preprocessor.n_genes if data.preprocessor else 0,
                        n_classes=len(data.classes)).to(device)
    bags = PatientBags(data.records["train"], use_genes=model.uses_genes, use_tiles=model.uses_tiles,
                       bag_size=cfg.bag_size, seed=cfg.seed, tile_normalizer=data.tile_normalizer)
    loader = DataLoader(bags, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(bags) > cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch))
    weights = _class_weights(data.records["train"], len(data.classes)) if cfg.class_weighted else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    eval_loss = torch.nn.NLLLoss(weight=weights)
    sign = 1.0 if cfg.monitor == "val_loss" else -1.0  # minimise loss, maximise PR-AUC
    best = (math.inf, 0, None)  # (score, epoch, state)
    epoch = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"fold {cfg.fold}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        bags.set_epoch(epoch)
        total, seen = 0.0, 0
        batches = iter(loader)
        while True:
            with timer("data"):
                batch = next(batches, None)
            if batch is None:
                break
            with timer("train"):
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(batch.genes, batch.tiles, batch.mask).logits  # (B, C)
                loss = loss_fn(logits.float(), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(batch.labels)
                seen += len(batch.labels)
        with timer("eval"):
            val, _, _ = evaluate(model, data.records["val"], "val", eval_loss, device, cfg.batch_size,
                                 data.tile_normalizer)
        score = sign * val[cfg.monitor] if not math.isnan(val[cfg.monitor]) else math.inf
        if score < best[0]:
            best = (score, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        with timer("log_metrics"):
            metric_buffer.log({"train_loss": total / max(seen, 1), **val, "lr": scheduler.get_last_lr()[0]}, step=epoch)
        bar.set_postfix(train_loss=f"{total / max(seen, 1):.3f}", val_loss=f"{val['val_loss']:.3f}")
        if epoch - best[1] >= cfg.patience:
            break
    with timer("log_metrics"):
        metric_buffer.flush()
    if best[2] is not None:
        model.load_state_dict(best[2])
    return model, best[1], epoch


def _prediction_table(records: list[PatientRecord], probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    from mmbrca.registry import prediction_frame

    table = prediction_frame([r.patient_id for r in records], probabilities, classes)
    table.insert(1, "site", [r.site for r in records])
    table.insert(2, "true_class", [classes[r.label] for r in records])
    return table


def _per_site_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Test metrics per tissue source site (accuracy always; the rest when the site has both classes)."""
    out = {}
    for site, part in predictions.groupby("site"):
        if site in ("", "unknown"):
            continue
        y = part["true_class"].map(classes.index).to_numpy()
        probabilities = part[[f"prob_{c}" for c in classes]].to_numpy()
        values = classification_metrics(y, probabilities, split="test")
        out |= {f"site_{site}_{name}": v for name, v in values.items() if not math.isnan(v)}
        out[f"site_{site}_n_test"] = float(len(part))
    return out


def _tags(cohort: Cohort, config: Config) -> dict[str, str]:
    return {"mmbrca.step": "train", "fold": str(config.train.fold), "modality": config.model.modality,
            "cohort_fingerprint": cohort.fingerprint, "cohort_path": str(cohort.path.resolve()),
            "git_commit": _git_commit()}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
