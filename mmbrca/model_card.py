"""The model card (Markdown) logged with every registered version and shown as its description."""

from __future__ import annotations

import json
from pathlib import Path

from mmbrca.predict import PredictorSettings

INTENDED_USE = """\
Research on breast-cancer molecular subtypes from routine H&E slides and bulk tumour expression:
comparing modalities, studying which tissue regions the model attends to, pre-screening cohorts
for further profiling. **Not a medical device**: it must not guide diagnosis or treatment."""


def model_card(*, model_name: str, settings: PredictorSettings, cohort_path: str, modality: str, study: str, trial,
               cv: dict[str, tuple[float, float]], direction: str) -> str:
    """Markdown: the model, its training cohort, label map, inputs, CV metrics, intended use, limits."""
    manifest_path = Path(cohort_path) / "cohort.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    counts = manifest.get("counts", {})
    split = manifest.get("split", {})
    lines = [f"# {model_name}: {' vs '.join(settings.classes)}", "",
             f"Registered from Optuna study `{study}`, trial {trial.number} "
             f"(objective {trial.value:.4f}, {direction}d on the inner validation split).", "",
             "## Model", "",
             f"- Modality: `{modality}`; the mean class probability "
             f"of {len(settings.folds)} fold models (test folds {settings.folds}), or one of them with `fold=k`.",
             "- Trial hyperparameters: " + (", ".join(f"`{k}={v}`" for k, v in sorted(trial.params.items())) or "none"),
             "", "## Training cohort", "",
             f"- `{cohort_path}` (fingerprint `{manifest.get('fingerprint', 'unknown')}`)",
             f"- {counts.get('patients', '?')} patients: "
             + ", ".join(f"{n} {c}" for c, n in counts.get("per_class", {}).items())
             + f"; {len(counts.get('per_site', {}))} tissue source sites",
             f"- {split.get('n_folds', '?')}-fold cross-validation, `{split.get('method', '?')}` split "
             f"(seed {split.get('seed', '?')})", "",
             "## Label map", "",
             f"- Classes: {', '.join(settings.classes)} (positive class for PR-AUC and F1: {settings.classes[-1]})"]
    label_map = manifest.get("label_map", {})
    if label_map.get("map"):
        lines.append("- " + ", ".join(f"`{k}` → {v}" for k, v in label_map["map"].items()))
    if label_map.get("drop"):
        lines.append("- Dropped: " + ", ".join(f"`{d}`" for d in label_map["drop"]))
    lines += ["", "## Inputs", ""]
    if settings.uses_genes:
        lines.append(f"- Expression of {len(settings.genes)} genes (each fold model selected and standardised "
                     "its own on its training patients); give raw values on the training data's scale.")
    if settings.uses_tiles:
        p = settings.extraction["params"]
        lines.append(f"- H&E slide: up to {p['tiles_per_slide']} tiles of {p['tile_size']} px at {p['mpp']} µm/px "
                     f"with ≥ {p['min_tissue']:.0%} tissue, sampled with seed {p['seed']}; "
                     f"ResNet-50 encoder `{p['encoder']}` (carried by the model).")
    lines += ["", "## Cross-validated performance", "",
              "Test folds, mean ± standard deviation over folds:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {metric} | {mean:.3f} ± {std:.3f} |" for metric, (mean, std) in sorted(cv.items())]
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limits", "",
              "- Every training-cohort patient trained all fold models but one: ensemble predictions for them are "
              "optimistic. For held-out predictions use `fold=k` on the patients of test fold k "
              "(`mmbrca predict --cohort … --out-of-fold`).",
              f"- Trained on {counts.get('patients', '?')} patients from {len(counts.get('per_site', {}))} sites; "
              "other hospitals, scanners and staining protocols shift both modalities. Site-preserved "
              "cross-validation estimates that loss; check it before trusting new sites.",
              "- Slides need their resolution (mpp or objective-power metadata). Tiles are sampled with a seed "
              "derived from the slide's file name: a renamed slide gets different tiles.",
              "- Expression must be the same kind of measurement as in training (e.g. RSEM or counts, not "
              "log-transformed again); genes missing from the input are an error unless imputed with the "
              "training mean (`allow_missing_genes`), which weakens the gene signal.",
              f"- It only knows {' and '.join(settings.classes)}; patients with labels the map drops or with no label "
              "were not used in training."]
    return "\n".join(lines) + "\n"

