"""The built-in demo cohort: a small TCGA-BRCA-shaped raw dataset made of real files.

OUT/
  slides/<TCGA slide barcode>.<uuid>.svs   Aperio-layout pyramidal JPEG TIFFs (OpenSlide vendor 'aperio')
  expression.tsv                           genes × samples, RSEM-like values, `SYMBOL|EntrezID` gene ids
  labels.csv                               bcr_patient_barcode, subtype (BRCA.LumA, ..., BRCA.Normal, or empty)
  demo.json                                the parameters that made it

Both modalities carry the class: marker genes (ESR1, FOXA1, GATA3, PGR … vs KRT5, KRT17, FOXC1,
ERBB2 …) and tissue morphology (nuclear density and size, pleomorphism, glands, lymphocytes).
Each tissue source site adds an expression batch effect and its own stain. The data also holds
the mess of real cohorts: normal-tissue samples, a replicate tumour sample, patients missing one
modality, unlabelled and Normal-like patients, a second slide for some patients, pen marks.
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mmbrca.errors import UserError
from mmbrca.io import publish_dir, staging_dir
from mmbrca.system import available_cores
from mmbrca.wsi.synthetic import Stain, TissueStyle, render_he, write_aperio_svs

# Real TCGA-BRCA tissue source site codes.
SITE_CODES = ("A2", "A8", "AN", "AR", "B6", "BH", "D8", "E2", "E9", "EW", "GM", "OL", "A7", "AC", "AO", "C8")
SUBTYPES = ("LumA", "LumB", "Basal", "Her2", "Normal")
SUBTYPE_PRIOR = np.array([0.36, 0.20, 0.24, 0.12, 0.08])
LUMINAL_GENES = {"ESR1": 2099, "FOXA1": 3169, "GATA3": 2625, "PGR": 5241, "XBP1": 7494, "TFF1": 7031,
                 "AGR2": 10551, "SLC39A6": 25800}
BASAL_GENES = {"KRT5": 3852, "KRT17": 3872, "KRT14": 3861, "FOXC1": 2296, "SFRP1": 6422, "EGFR": 1956}
HER2_GENES = {"ERBB2": 2064, "GRB7": 2886}
PROLIFERATION_GENES = {"MKI67": 4288, "CCNB1": 891}
STYLES = {
    "LumA": TissueStyle(nuclear_density=6.5, nuclear_radius=3.0, pleomorphism=0.10, darkness=0.85,
                        gland_fraction=0.45, stroma=0.55),
    "LumB": TissueStyle(nuclear_density=8.0, nuclear_radius=3.3, pleomorphism=0.15, darkness=0.95,
                        gland_fraction=0.30, stroma=0.50),
    "Basal": TissueStyle(nuclear_density=10.0, nuclear_radius=4.3, pleomorphism=0.30, darkness=1.30,
                         lymphocyte_density=2.5, stroma=0.42),
    "Her2": TissueStyle(nuclear_density=9.0, nuclear_radius=4.0, pleomorphism=0.25, darkness=1.20,
                        gland_fraction=0.08, lymphocyte_density=1.0, stroma=0.45),
    "Normal": TissueStyle(nuclear_density=4.0, nuclear_radius=2.8, pleomorphism=0.08, darkness=0.8,
                          gland_fraction=0.6, stroma=0.65),
}


@dataclass(frozen=True)
class DemoConfig:
    patients: int = 60
    sites: int = 6
    genes: int = 2000
    seed: int = 0
    slide_width: int = 2560
    slide_height: int = 2048
    mpp: float = 0.499  # a typical Aperio 20x scan
    app_mag: int = 20

    def __post_init__(self) -> None:
        if not 4 <= self.sites <= len(SITE_CODES):
            raise UserError(f"--sites must be between 4 and {len(SITE_CODES)}, got {self.sites}")
        if self.patients < 5 * self.sites:
            raise UserError(f"--patients must be at least 5 per site ({5 * self.sites} for {self.sites} sites), "
                            f"got {self.patients}")
        marker_count = len(LUMINAL_GENES | BASAL_GENES | HER2_GENES | PROLIFERATION_GENES)
        if self.genes < marker_count + 10:
            raise UserError(f"--genes must be at least {marker_count + 10}, got {self.genes}")
        if self.slide_width % 256 or self.slide_height % 256 or min(self.slide_width, self.slide_height) < 1024:
            raise UserError(f"slide size must be multiples of 256 and at least 1024 px, got "
                            f"{self.slide_width}x{self.slide_height}")


@dataclass(frozen=True)
class DemoPatient:
    patient_id: str
    site_index: int
    subtype: str
    label: str | None  # as written to labels.csv; None = row missing, "" = empty label
    samples: tuple[str, ...]  # expression sample barcodes (tumour and normal)
    slides: tuple[str, ...]  # slide file names


def _patient_ids(rng: np.random.Generator, sites: list[str], n: int) -> list[tuple[str, int]]:
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    seen: set[str] = set()
    out = []
    while len(out) < n:
        site_index = len(out) % len(sites)
        pid = f"TCGA-{sites[site_index]}-A{''.join(rng.choice(alphabet, 3))}"
        if pid not in seen:
            seen.add(pid)
            out.append((pid, site_index))
    return out


def _slide_name(rng: np.random.Generator, patient: str, number: int) -> str:
    return f"{patient}-01Z-00-DX{number}.{uuid.UUID(bytes=rng.bytes(16), version=4)}".upper() + ".svs"


def plan_patients(config: DemoConfig, rng: np.random.Generator) -> list[DemoPatient]:
    """Who has which subtype, samples and slides. The mess of real cohorts is placed on purpose."""
    sites = list(SITE_CODES[: config.sites])
    site_priors = rng.dirichlet(SUBTYPE_PRIOR * 40, size=len(sites))  # sites differ in case mix
    patients = []
    for i, (pid, site_index) in enumerate(_patient_ids(rng, sites, config.patients)):
        subtype = SUBTYPES[rng.choice(len(SUBTYPES), p=site_priors[site_index])]
        analyte = f"{rng.integers(11, 14)}R-A{rng.integers(100, 999)}-07"
        samples = [f"{pid}-01A-{analyte}"]
        slides = [_slide_name(rng, pid, 1)]
        label: str | None = f"BRCA.{subtype}"
        role = i % 20
        if role == 3:  # normal tissue sample beside the tumour
            samples.append(f"{pid}-11A-{analyte}")
        elif role == 5:  # tumour profiled twice
            samples.append(f"{pid}-01B-{analyte}")
        elif role == 7:  # slide but no expression
            samples = []
        elif role == 9:  # expression but no slide
            slides = []
        elif role == 11:  # second diagnostic slide
            slides.append(_slide_name(rng, pid, 2))
        elif role == 13:  # no PAM50 call
            label = ""
        elif role == 17:  # not in the clinical table at all
            label = None
        patients.append(DemoPatient(pid, site_index, subtype, label, tuple(samples), tuple(slides)))
    return patients


def _gene_table(config: DemoConfig) -> list[str]:
    markers = LUMINAL_GENES | BASAL_GENES | HER2_GENES | PROLIFERATION_GENES
    names = [f"{symbol}|{entrez}" for symbol, entrez in markers.items()]
    for i in range(config.genes - len(names)):
        entrez = 100_130_000 + 7 * i
        names.append(f"?|{entrez}" if i % 97 == 0 else f"LOC{entrez}|{entrez}")
    return names


def _expression(config: DemoConfig, patients: list[DemoPatient], rng: np.random.Generator) -> pd.DataFrame:
    """Genes × samples, RSEM-like: 2**x - 1 with x = log2 level, class signal, site batch, noise."""
    genes = _gene_table(config)
    n_genes = len(genes)
    baseline = rng.gamma(2.0, 2.5, n_genes)  # log2 mean level per gene
    spread = rng.uniform(0.4, 1.2, n_genes)
    site_shift = rng.normal(0, 0.35, (config.sites, n_genes)) + rng.normal(0, 0.3, (config.sites, 1))
    effect = {s: np.zeros(n_genes) for s in SUBTYPES}
    index = {g.split("|")[0]: i for i, g in enumerate(genes)}
    for symbol in LUMINAL_GENES:
        effect["LumA"][index[symbol]] = effect["LumB"][index[symbol]] = 3.0
        effect["Normal"][index[symbol]] = 1.5
    for symbol in BASAL_GENES:
        effect["Basal"][index[symbol]] = 3.0
        effect["Normal"][index[symbol]] = 1.5
    for symbol in HER2_GENES:
        effect["Her2"][index[symbol]] = 3.5
    for symbol in PROLIFERATION_GENES:
        for subtype in ("LumB", "Basal", "Her2"):
            effect[subtype][index[symbol]] = 1.5
    is_marker = np.zeros(n_genes, dtype=bool)
    is_marker[[index[s] for s in LUMINAL_GENES | BASAL_GENES | HER2_GENES | PROLIFERATION_GENES]] = True
    spread[is_marker] = 0.5
    columns = {}
    for patient in patients:
        for sample in patient.samples:
            normal = "-11A-" in sample
            level = baseline + effect["Normal" if normal else patient.subtype] + site_shift[patient.site_index]
            x = level + spread * rng.standard_normal(n_genes)
            values = np.clip(np.exp2(x) - 1, 0, None)
            values[(rng.random(n_genes) < 0.03) & ~is_marker] = 0.0  # dropouts of lowly covered genes
            columns[sample] = np.round(values, 4)
    frame = pd.DataFrame(columns, index=pd.Index(genes, name="gene_id"))
    return frame


def _labels(patients: list[DemoPatient]) -> pd.DataFrame:
    rows = [{"bcr_patient_barcode": p.patient_id, "subtype": p.label} for p in patients if p.label is not None]
    rows.append(dict(rows[0]))  # a duplicated clinical row with the same label is harmless
    return pd.DataFrame(rows)


def _render_slide(args: tuple) -> None:
    path, subtype, stain, seed, config = args
    rng = np.random.default_rng(seed)
    rgb, _ = render_he(rng, (config.slide_height, config.slide_width), STYLES[subtype], stain, mpp=config.mpp,
                       coverage=float(rng.uniform(0.3, 0.5)), pen_mark=bool(rng.random() < 0.25))
    write_aperio_svs(path, rgb, mpp=config.mpp, app_mag=config.app_mag, rng=rng)


def _default_workers() -> int:
    return max(1, min(4, available_cores()))


def write_demo(out: str | os.PathLike, config: DemoConfig = DemoConfig(), *, workers: int | None = None,
               progress: bool = True) -> Path:
    """Write the demo raw dataset to `out` (atomically). Deterministic for `config.seed`.

    If `out` already holds a demo made with the same parameters it is left as it is.
    """
    out = Path(out)
    if (out / "demo.json").is_file() and json.loads((out / "demo.json").read_text()) == asdict(config):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty directory or a demo with these parameters")
    root = np.random.SeedSequence(config.seed)
    plan_seed, expr_seed, stain_seed, slide_seed = root.spawn(4)
    patients = plan_patients(config, np.random.default_rng(plan_seed))
    stain_rng = np.random.default_rng(stain_seed)
    stains = [Stain.random(stain_rng) for _ in range(config.sites)]
    jobs = []
    slide_seeds = slide_seed.spawn(sum(len(p.slides) for p in patients))
    with staging_dir(out) as staged:
        (staged / "slides").mkdir()
        for patient in patients:
            for name in patient.slides:
                jobs.append((staged / "slides" / name, patient.subtype, stains[patient.site_index],
                             slide_seeds[len(jobs)], config))
        _expression(config, patients, np.random.default_rng(expr_seed)).to_csv(staged / "expression.tsv", sep="\t")
        _labels(patients).to_csv(staged / "labels.csv", index=False)
        workers = workers or _default_workers()
        bar = tqdm(total=len(jobs), desc="demo slides", unit="slide", disable=not progress)
        if workers == 1:
            for job in jobs:
                _render_slide(job)
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_render_slide, jobs):
                    bar.update()
        bar.close()
        (staged / "demo.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        publish_dir(staged, out)
    return out
