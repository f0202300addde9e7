"""Group statistics of a study (pipelines.group) and its report (pipelines.study_report), on synthetic tidy scores
with a known answer: planted positive, negative and null group effects, subjects varying in effect size."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipelines.group import (GROUP_COLUMNS, Comparison, bh_q, group_table, recovery, signflip_p)
from pipelines.study_report import write_study_report

MODELS = ("vlm", "lam")
CONDITIONS = ("action", "reasoning")
PARTITION = "action|reasoning"
ROIS = ("V1", "MT", "IPS", "PFC", "M1", "TPJ")
BASE_R = {"V1": 0.10, "MT": 0.08, "IPS": 0.05, "PFC": 0.04, "M1": 0.05, "TPJ": 0.0}  # TPJ: no signal at all
PARTS = {  # model → part → {roi: planted mean}; unlisted ROIs 0
    "vlm": {"unique_a": {"IPS": 0.02, "PFC": 0.02, "M1": 0.02}, "unique_b": {"IPS": 0.03, "PFC": 0.03},
            "shared": {"V1": 0.02, "MT": 0.02}},
    "lam": {"unique_a": {"M1": 0.04, "PFC": 0.04}, "unique_b": {"PFC": -0.02}, "shared": {"V1": 0.02}},
}
COMPARISONS = [
    Comparison("reasoning-action@vlm", {"model": "vlm", "condition": "reasoning"}, {"model": "vlm", "condition": "action"}),
    Comparison("reasoning-action@lam", {"model": "lam", "condition": "reasoning"}, {"model": "lam", "condition": "action"}),
    Comparison("vlm-lam@reasoning", {"model": "vlm", "condition": "reasoning"}, {"model": "lam", "condition": "reasoning"}),
    Comparison("unique_a-unique_b@lam", {"model": "lam", "measure": "unique_a"}, {"model": "lam", "measure": "unique_b"}),
]


def true_mean(model: str, condition: str, layer: int, roi: str, measure: str) -> float:
    """The planted population mean of one cell."""
    if measure != "r":
        return PARTS[model][measure].get(roi, 0.0)
    r = BASE_R[roi] * (0.6 if layer == 12 and roi in ("V1", "MT") else 1.0)  # visual ROIs peak early
    if model == "vlm" and condition == "reasoning" and roi in ("IPS", "PFC"):
        r += 0.04  # the reasoning prompt helps the VLM in fronto-parietal ROIs ...
    if model == "lam" and condition == "reasoning" and roi == "M1":
        r -= 0.03  # ... and costs the LAM in motor cortex
    return r


def cells(dims=(64,)):
    for model, layer, dim, roi in itertools.product(MODELS, (4, 12), dims, ROIS):
        for cond in CONDITIONS:
            yield model, cond, layer, dim, roi, "r"
        for part in PARTS[model]:
            yield model, PARTITION, layer, dim, roi, part


def synth_scores(seed: int, *, n_subjects: int = 12, planted: bool = True, dims=(64,)) -> pd.DataFrame:
    """Tidy scores: value = planted mean × the subject's gain (N(1, 0.25)) + independent noise per cell."""
    rng = np.random.default_rng(seed)
    gain = rng.normal(1.0, 0.25, n_subjects)
    rows = []
    for model, cond, layer, dim, roi, measure in cells(dims):
        mu = true_mean(model, cond, layer, roi, measure) if planted else 0.0
        noise = 0.012 if measure == "r" else 0.006
        for s, v in enumerate(mu * gain + rng.normal(0, noise, n_subjects)):
            rows.append({"subject": f"{s + 1:02d}", "model": model, "condition": cond, "layer": layer, "dim": dim,
                         "roi": roi, "measure": measure, "value": v})
    return pd.DataFrame(rows)


def truth_table(dims=(64,)) -> pd.DataFrame:
    """planted_sign of every one-sample and paired effect, computed from the planted means (not from the table)."""
    rows = []
    for model, cond, layer, dim, roi, measure in cells(dims):
        rows.append({"test": "one_sample", "contrast": "", "model": model, "condition": cond, "layer": layer,
                     "dim": dim, "roi": roi, "measure": measure,
                     "planted_sign": int(np.sign(true_mean(model, cond, layer, roi, measure)))})
    for layer, dim, roi in itertools.product((4, 12), dims, ROIS):
        for c in COMPARISONS[:3]:
            a, b = c.a, c.b
            diff = true_mean(a["model"], a["condition"], layer, roi, "r") - true_mean(b["model"], b["condition"],
                                                                                      layer, roi, "r")
            rows.append({"test": "paired", "contrast": c.name,
                         "model": a["model"] if a["model"] == b["model"] else "",
                         "condition": a["condition"] if a["condition"] == b["condition"] else "", "layer": layer,
                         "dim": dim, "roi": roi, "measure": "r", "planted_sign": int(np.sign(round(diff, 12)))})
        diff = PARTS["lam"]["unique_a"].get(roi, 0.0) - PARTS["lam"]["unique_b"].get(roi, 0.0)
        rows.append({"test": "paired", "contrast": COMPARISONS[3].name, "model": "lam", "condition": PARTITION,
                     "layer": layer, "dim": dim, "roi": roi, "measure": "", "planted_sign": int(np.sign(diff))})
    return pd.DataFrame(rows)


def test_planted_effects_recovered_with_their_sign_and_few_false_discoveries():
    scores = synth_scores(0)
    group = group_table(scores, COMPARISONS)
    assert list(group.columns) == list(GROUP_COLUMNS)
    # rows arriving in any order (tasks finishing in any order) give the same table
    pd.testing.assert_frame_equal(group_table(scores.sample(frac=1, random_state=1), COMPARISONS), group)
    truth = truth_table()
    assert len(group) == len(truth)  # one row per tested effect, no more, no less
    assert set(truth["planted_sign"]) == {-1, 0, 1}
    rec = recovery(group, truth)
    assert rec.n_missing == 0
    assert rec.n_planted >= 60 and rec.n_null >= 40
    assert rec.all_planted_recovered, rec
    assert rec.n_planted_wrong_sign == 0
    # BH bounds the expected FDP by alpha · m0 / m (≈ 0.02 here); one realisation gets twice alpha at most
    assert rec.observed_fdr <= 0.10, rec
    # the paired rows put "" where the comparison varies a key, and the shared value elsewhere
    vl = group[group["contrast"] == "vlm-lam@reasoning"]
    assert set(vl["model"]) == {""} and set(vl["condition"]) == {"reasoning"}
    m1 = group[(group["contrast"] == "reasoning-action@lam") & (group["roi"] == "M1") & (group["layer"] == 4)].iloc[0]
    assert m1["significant"] and m1["estimate"] < 0 and m1["effect_size"] < 0 and m1["stat"] < 0


def test_null_study_rejects_at_the_expected_rate():
    """With the planted effects removed, nothing should be significant beyond what BH allows: under the complete
    null BH keeps P(any rejection) ≤ alpha, so over 20 independent null studies ~1 has any (≥ 5: P < 0.003).
    Uncorrected p ≤ .05 must come at ~5 % (the permutation p is calibrated): an uncorrected, one-sided or
    anti-conservative p fails one of the two."""
    any_sig, p_all = 0, []
    for seed in range(20):
        group = group_table(synth_scores(100 + seed, planted=False), COMPARISONS, n_perm=2000, seed=seed)
        any_sig += bool(group["significant"].any())
        p_all.append(group["p"].to_numpy())
    p_all = np.concatenate(p_all)
    assert any_sig <= 4, any_sig
    assert 0.03 <= np.mean(p_all <= 0.05) <= 0.065, np.mean(p_all <= 0.05)


def _brute_force_p(x: np.ndarray) -> float:
    obs = abs(x.sum())
    flips = [abs((np.array(s) * x).sum()) for s in itertools.product((1, -1), repeat=len(x))]
    return float(np.mean([f >= obs - 1e-12 for f in flips]))


def test_exact_signflip_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(3)
    x = rng.normal(0.3, 1.0, size=(7, 40))
    x[2, :5] = np.nan  # cells with one subject missing: n = 6
    x[:, 5] = [1, -1, 2, -2, 3, -3, 0.5]  # symmetric ties
    x[:, 6] = 0.0  # nothing to flip: p = 1
    p = signflip_p(x, n_perm=10000)
    want = [_brute_force_p(col[~np.isnan(col)]) for col in x.T]
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-12)
    assert p[6] == 1.0 and p.min() >= 1 / 2**7
    # random flips (2^n > n_perm): close to the exact p, never 0, reproducible with the seed
    x = rng.normal(0.4, 1.0, size=(14, 6))
    mc = signflip_p(x, n_perm=4000, seed=1)
    exact = signflip_p(x, n_perm=2**14)
    assert np.all(np.abs(mc - exact) <= 4 * np.sqrt(exact * (1 - exact) / 4000) + 1 / 4000)
    assert np.all(mc >= 1 / 4001)
    np.testing.assert_array_equal(mc, signflip_p(x, n_perm=4000, seed=1))
    assert np.isnan(signflip_p(np.ones((1, 1)))[0]) and np.isnan(signflip_p(np.full((5, 1), np.nan))[0])  # n < 2


def test_bh_q_equals_a_hand_computation():
    # sorted p .005 .01 .03 .04 .5 → p·m/rank .025 .025 .05 .05 .5 → running min from the top: the same
    np.testing.assert_allclose(bh_q(np.array([0.01, 0.04, 0.03, 0.005, 0.5, np.nan])),
                               [0.025, 0.05, 0.05, 0.025, 0.5, np.nan])
    # p·m/rank .06 .04 → monotone: q of the smaller p cannot exceed the larger one's
    np.testing.assert_allclose(bh_q(np.array([0.03, 0.04])), [0.04, 0.04])
    # the table's q is BH over all its rows together (ROIs × comparisons × measures)
    group = group_table(synth_scores(1), COMPARISONS, n_perm=1000)
    p = group["p"].to_numpy()
    order = np.argsort(p)
    raw = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.empty_like(p)
    q[order] = np.minimum(np.minimum.accumulate(raw[::-1])[::-1], 1)
    np.testing.assert_allclose(group["q"], q)
    np.testing.assert_array_equal(group["significant"], q <= 0.05)


def test_wilcoxon_option_agrees_with_scipy():
    scores = synth_scores(2, n_subjects=9)
    scores = scores[~((scores["subject"] == "03") & (scores["model"] == "vlm") & (scores["condition"] == "action"))]
    group = group_table(scores, COMPARISONS[:1], test="wilcoxon")
    wide = scores.pivot_table(index="subject", columns=["model", "condition", "layer", "dim", "roi", "measure"],
                              values="value")
    for _, row in group.sample(25, random_state=0).iterrows():
        if row["test"] == "one_sample":
            x = wide[(row["model"], row["condition"], row["layer"], row["dim"], row["roi"], row["measure"])]
        else:
            x = (wide[("vlm", "reasoning", row["layer"], row["dim"], row["roi"], "r")]
                 - wide[("vlm", "action", row["layer"], row["dim"], row["roi"], "r")])
        x = x.dropna().to_numpy()
        res = stats.wilcoxon(x)
        assert row["n"] == len(x)
        assert row["stat"] == pytest.approx(res.statistic) and row["p"] == pytest.approx(res.pvalue)


def test_bad_input_is_named_and_missing_cells_are_paired_by_subject():
    scores = synth_scores(4)
    with pytest.raises(ValueError, match="'value'"):
        group_table(scores.drop(columns="value"), [])
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        group_table(scores, [Comparison("x", {"model": "gpt"}, {"model": "vlm"})])
    with pytest.raises(ValueError, match="unknown key 'prompt'"):
        group_table(scores, [Comparison("x", {"prompt": "a"}, {"prompt": "b"})])
    with pytest.raises(ValueError, match="same keys"):
        group_table(scores, [Comparison("x", {"model": "lam", "condition": "action"}, {"model": "vlm"})])
    with pytest.raises(ValueError, match="more than one row"):
        group_table(pd.concat([scores, scores.iloc[:1]]), [])
    with pytest.raises(ValueError, match="test must be"):
        group_table(scores, [], test="ttest")
    # subject 05 lacks vlm·reasoning M1 at layer 4: paired with the 11 subjects that have both cells
    gone = ((scores["subject"] == "05") & (scores["model"] == "vlm") & (scores["condition"] == "reasoning")
            & (scores["roi"] == "M1") & (scores["layer"] == 4))
    group = group_table(scores[~gone], COMPARISONS[:1])
    row = group[(group["contrast"] == COMPARISONS[0].name) & (group["roi"] == "M1") & (group["layer"] == 4)].iloc[0]
    assert row["n"] == 11
    sel = scores[(scores["model"] == "vlm") & (scores["roi"] == "M1") & (scores["layer"] == 4)
                 & (scores["measure"] == "r") & (scores["subject"] != "05")]
    diff = (sel[sel["condition"] == "reasoning"].set_index("subject")["value"]
            - sel[sel["condition"] == "action"].set_index("subject")["value"])
    assert row["estimate"] == pytest.approx(diff.mean())
    assert row["sem"] == pytest.approx(diff.std(ddof=1) / np.sqrt(11))
    assert row["effect_size"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert group[(group["test"] == "paired") & ~((group["roi"] == "M1") & (group["layer"] == 4))]["n"].eq(12).all()


def test_write_study_report_writes_every_file_and_links_every_figure(tmp_path):
    dims = (8, 64)
    scores = synth_scores(5, n_subjects=8, dims=dims)
    group = group_table(scores, COMPARISONS, n_perm=1000)
    rep = write_study_report(tmp_path / "study", scores, group, title="synthetic study", truth=truth_table(dims),
                             rois=list(ROIS))
    assert set(rep.figures) == {"roi_bars", "contrasts", "partition", "layer_profiles", "dim_curve"}
    for path in [rep.html, rep.scores_tsv, rep.group_tsv, rep.summary_json, rep.recovery_tsv, *rep.figures.values()]:
        assert path.is_file() and path.stat().st_size > 0, path
    for path in rep.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = rep.html.read_text()
    linked = set(re.findall(r"src='([^']+)'", page))
    assert linked == {p.relative_to(rep.out_dir).as_posix() for p in rep.figures.values()}
    assert "Significant effects" in page and "Known answer" in page
    back = pd.read_csv(rep.group_tsv, sep="\t", keep_default_na=False, na_values=["n/a"])
    assert list(back.columns) == list(GROUP_COLUMNS) and len(back) == len(group)
    assert len(pd.read_csv(rep.scores_tsv, sep="\t")) == len(scores)
    summary = json.loads(rep.summary_json.read_text())
    assert summary["n_subjects"] == 8 and summary["test"]["test"] == "signflip"
    assert summary["n_significant"] == rep.n_significant == int(group["significant"].sum())
    assert rep.recovery is not None and summary["recovery"]["n_planted"] == rep.recovery.n_planted
    assert recovery(back, truth_table(dims)) == rep.recovery  # the TSV read back matches the truth as well


@pytest.mark.slow  # nilearn's import and glass brains: ~10 s on the 2-core machine
def test_group_maps_paint_the_atlas(tmp_path):
    import nibabel as nib

    labels = np.zeros((20, 24, 20), np.int16)  # 4 mm grid over MNI space, one slab per ROI
    for k in range(len(ROIS)):
        labels[3:17, 3 + 3 * k:6 + 3 * k, 5:15] = k + 1
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-40, -60, -30)
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "atlas.nii.gz")
    (tmp_path / "atlas_labels.tsv").write_text("index\tname\n" + "".join(f"{k + 1}\t{r}\n" for k, r in enumerate(ROIS)))
    scores = synth_scores(6, n_subjects=8)
    scores = scores[(scores["model"] == "vlm") & (scores["measure"] == "r") & (scores["layer"] == 4)]
    group = group_table(scores, [], n_perm=1000)
    rep = write_study_report(tmp_path / "study", scores, group, title="maps", atlas=tmp_path / "atlas.nii.gz",
                             atlas_labels=tmp_path / "atlas_labels.tsv")
    assert set(rep.figures) == {"roi_bars", "brain_maps"}
    assert "src='figures/brain_maps.png'" in rep.html.read_text()
    assert sorted(p.name for p in rep.maps) == ["vlm__action_r.nii.gz", "vlm__action_r_sig.nii.gz",
                                                "vlm__reasoning_r.nii.gz", "vlm__reasoning_r_sig.nii.gz"]
    mean = np.asarray(nib.load(rep.out_dir / "maps" / "vlm__reasoning_r.nii.gz").dataobj)
    sig = np.asarray(nib.load(rep.out_dir / "maps" / "vlm__reasoning_r_sig.nii.gz").dataobj)
    for k, roi in enumerate(ROIS):
        row = group[(group["condition"] == "reasoning") & (group["roi"] == roi)].iloc[0]
        assert mean[labels == k + 1] == pytest.approx(row["estimate"], abs=1e-6)
        assert sig[labels == k + 1] == pytest.approx(row["estimate"] if row["significant"] else 0.0, abs=1e-6)
    assert not group[group["roi"] == "V1"]["significant"].eq(False).any()  # painted: V1 significant, TPJ not
    assert not group[group["roi"] == "TPJ"]["significant"].any()
