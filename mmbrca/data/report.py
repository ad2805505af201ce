"""Human-readable summaries of a built cohort."""

from __future__ import annotations

import pandas as pd

from mmbrca.data.cohort import BuildResult


def summary_lines(result: BuildResult) -> list[str]:
    """A short report: counts per class and site, modalities, folds and what was dropped."""
    table, manifest = result.table, result.manifest
    status = "already up to date" if result.up_to_date else "written"
    lines = [f"cohort {result.path} ({status}, fingerprint {manifest['fingerprint']})",
             f"patients: {len(table)}  with expression: {int(table['has_expression'].sum())}  "
             f"with slides: {int(table['has_slide'].sum())} ({int(table['n_slides'].sum())} slides)"]
    if manifest["expression"] is not None:
        lines.append(f"genes: {manifest['expression']['n_genes']}  "
                     f"(expression orientation: {manifest['expression']['orientation_detected']})")
    per_site = pd.crosstab(table["site"], table["class_name"]).reindex(columns=manifest["classes"], fill_value=0)
    per_site.loc["total"] = per_site.sum()
    lines += ["", "patients per site and class:", per_site.to_string()]
    folds = pd.crosstab(result.folds, table.set_index("patient_id")["class_name"])
    folds = folds.reindex(columns=manifest["classes"], fill_value=0)
    split = manifest["split"]
    lines += ["", f"folds ({split['method']}, seed {split['seed']}):", folds.to_string()]
    if len(result.dropped):
        reasons = result.dropped.groupby(["kind", "reason"]).size().rename("n").reset_index()
        lines += ["", f"left out ({len(result.dropped)}, see dropped.csv):"]
        lines += [f"  {r.n:4d} {r.kind}: {r.reason}" for r in reasons.itertuples()]
    return lines
