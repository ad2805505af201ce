import filecmp

import numpy as np
import pandas as pd
import pytest

from mmbrca.data.demo import DemoConfig, write_demo
from mmbrca.errors import UserError

TINY = dict(patients=20, sites=4, genes=60, slide_width=1024, slide_height=1024)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    a = write_demo(tmp_path / "a", DemoConfig(seed=5, **TINY), progress=False, workers=2)
    b = write_demo(tmp_path / "b", DemoConfig(seed=5, **TINY), progress=False, workers=1)
    c = write_demo(tmp_path / "c", DemoConfig(seed=6, **TINY), progress=False)
    assert _files(a) == _files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in _files(a)], shallow=False)
    assert not mismatch and not errors
    assert (a / "expression.tsv").read_bytes() != (c / "expression.tsv").read_bytes()
    assert _files(a) != _files(c)


def test_raw_files_look_like_tcga(demo_raw):
    labels = pd.read_csv(demo_raw / "labels.csv", keep_default_na=False)
    assert set(labels["subtype"]) - {""} == {"BRCA.LumA", "BRCA.LumB", "BRCA.Basal", "BRCA.Her2", "BRCA.Normal"}
    expression = pd.read_csv(demo_raw / "expression.tsv", sep="\t", index_col=0)
    assert expression.index.name == "gene_id"
    assert {"ESR1|2099", "KRT5|3852", "ERBB2|2064", "FOXA1|3169"} <= set(expression.index)
    assert (expression.to_numpy() >= 0).all()
    assert any("-11A-" in s for s in expression.columns)
    assert len({s.split("-")[1] for s in expression.columns}) >= 4  # tissue source sites
    slides = list((demo_raw / "slides").glob("TCGA-??-????-01Z-00-DX?.*.svs"))
    assert len(slides) == len(list((demo_raw / "slides").iterdir()))


def test_markers_carry_the_class(demo_cohort):
    expression = np.log2(pd.read_parquet(demo_cohort.path / "expression.parquet") + 1)  # (patients, genes)
    subtype = demo_cohort.table.set_index("patient_id")["raw_label"].reindex(expression.index)
    means = expression.groupby(subtype).mean()
    luminal = means.loc[["BRCA.LumA", "BRCA.LumB"]].mean()
    assert luminal["ESR1|2099"] > means.loc["BRCA.Basal", "ESR1|2099"] + 1
    assert means.loc["BRCA.Basal", "KRT5|3852"] > luminal["KRT5|3852"] + 1
    assert means.loc["BRCA.Her2", "ERBB2|2064"] > luminal["ERBB2|2064"] + 1
    noise = [g for g in expression.columns if g.startswith("LOC")][:50]
    assert (means.loc["BRCA.Basal", noise] - luminal[noise]).abs().median() < 0.5


def test_rerun_is_a_no_op_and_other_content_is_refused(tmp_path):
    out = write_demo(tmp_path / "d", DemoConfig(seed=1, **TINY), progress=False)
    mtime = (out / "expression.tsv").stat().st_mtime_ns
    write_demo(out, DemoConfig(seed=1, **TINY), progress=False)
    assert (out / "expression.tsv").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="already exists"):
        write_demo(out, DemoConfig(seed=2, **TINY), progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [({"sites": 3}, "--sites must be between 4"),
                                                 ({"patients": 10}, "--patients must be at least 5 per site"),
                                                 ({"genes": 5}, "--genes must be at least")])
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        DemoConfig(**kwargs)
