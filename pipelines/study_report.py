"""The study report: tidy tables, a JSON summary, the figures a paper needs and one HTML page linking them.

:func:`write_study_report` writes into OUT_DIR::

    scores.tsv      per-subject scores, one row per subject × model × condition × layer × dim × roi × measure
    group.tsv       the group table of ``pipelines.group.group_table`` (columns ``pipelines.group.GROUP_COLUMNS``)
    summary.json    design, test, counts, headline numbers (and the known-answer recovery)
    recovery.tsv    with a truth table: every truth row beside its group row (``pipelines.group.match_truth``)
    figures/*.png   matplotlib figures (below), referenced from the HTML by relative path
    report.html     the page

Figures (each drawn only where the data have what it shows):

- ``roi_bars``: mean ± sem across subjects of the headline measure (r) per ROI, one bar per model · condition,
  at the headline dim (the largest) and each model's headline layer (the layer whose mean r over conditions and
  ROIs is highest — the paper reports the best layer); stars mark one-sample q (``*`` ≤ alpha, ``**`` ≤ .01,
  ``***`` ≤ .001);
- ``contrasts``: one panel per paired comparison, layers × ROIs, colour = mean difference A − B of r, stars
  where significant (every layer shown, so no layer is picked after looking at the result);
- ``partition``: unique A, unique B and shared variance per ROI (mean ± sem, stars), one panel per model ·
  condition pair; negative values drawn as they are;
- ``layer_profiles``: r against layer per ROI, one line per model · condition (sem band; filled markers where
  significant);
- ``dim_curve``: r against PCA dimension (8 / 64 / 1024 …) per ROI at each model's headline layer;
- ``brain_maps`` (with an atlas in a common space): the headline estimates of every model · condition painted
  on the atlas ROIs, significant ROIs only, as nilearn glass brains; the maps themselves go to
  ``maps/<model>__<condition>_<measure>.nii.gz`` (every ROI's mean) and ``…_sig.nii.gz`` (significant ROIs only).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.group import (GROUP_COLUMNS, KEY_COLUMNS, MEASURES, Recovery, match_truth, recovery,
                             validate_scores)
from pipelines.report import CSS, json_ready

PARTS = ("unique_a", "unique_b", "shared")
"""Variance-partition measures, in the order the partition figure draws them."""
MAX_BRAIN_ROWS = 8
"""Streams drawn at most in the brain-maps figure (each glass brain takes about a second; all maps are written)."""
MAX_TABLE_ROWS = 500
"""Significant effects listed in the HTML at most (all of them are in group.tsv)."""
_PART_COLORS = ("#d95f02", "#1b9e77", "#b3b3b3")


@dataclass(frozen=True)
class StudyReport:
    """What :func:`write_study_report` wrote, and the headline numbers."""

    out_dir: Path
    """Folder everything was written to."""
    html: Path
    """``report.html``."""
    scores_tsv: Path
    """``scores.tsv``: per-subject tidy scores."""
    group_tsv: Path
    """``group.tsv``: one row per tested effect."""
    summary_json: Path
    """``summary.json``."""
    figures: dict[str, Path]
    """Figure name (``roi_bars``, ``contrasts``, ``partition``, ``layer_profiles``, ``dim_curve``) → PNG, for
    the figures the data allowed."""
    n_subjects: int
    """Subjects in ``scores``."""
    n_tests: int
    """Rows of the group table with a p-value (the BH family)."""
    n_significant: int
    """Rows significant at the table's FDR level."""
    maps: list[Path] = field(default_factory=list)
    """Group NIfTI maps written (with an atlas): ``maps/<model>__<condition>_<measure>[_sig].nii.gz``."""
    recovery_tsv: Path | None = None
    """``recovery.tsv`` when a truth table was given."""
    recovery: Recovery | None = None
    """Planted effects recovered, when a truth table was given."""
    headline: dict = field(default_factory=dict)
    """``summary.json``'s ``headline``: dim, layer per model, and per model · condition · ROI mean r, sem, q."""


# --- choosing what the figures show -----------------------------------------------------------------------


def _one_sample(group: pd.DataFrame) -> pd.DataFrame:
    g = group[group["test"] == "one_sample"].copy()
    for k in ("layer", "dim"):
        g[k] = pd.to_numeric(g[k]).astype(np.int64)
    return g


def _main_measure(one: pd.DataFrame) -> str | None:
    """The score the figures show: r, else r2, else None."""
    return next((m for m in ("r", "r2") if (one["measure"] == m).any()), None)


def _headline(one: pd.DataFrame, measure: str) -> tuple[int, dict[str, int]]:
    """(dim, {model: layer}): the largest dim, and per model the layer with the highest mean ``measure``
    over its conditions and ROIs at that dim."""
    m = one[one["measure"] == measure]
    dim = int(m["dim"].max())
    at = m[m["dim"] == dim]
    layers = {model: int(rows.groupby("layer")["estimate"].mean().idxmax()) for model, rows in at.groupby("model")}
    return dim, layers


def _streams(rows: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(rows["model"], rows["condition"])))


def _label(model: str, condition: str) -> str:
    return f"{model} · {condition}" if condition else model


def _stars(q: float, significant: bool) -> str:
    if not significant or not math.isfinite(q):
        return ""
    return "***" if q <= 0.001 else "**" if q <= 0.01 else "*"


def _order(values, preferred: list[str] | None) -> list[str]:
    values = list(dict.fromkeys(values))
    if not preferred:
        return values
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


def _part_names(condition: str, names: dict[str, tuple[str, str]] | None) -> tuple[str, str]:
    """Names of spaces A and B of a partition condition: given, else the condition split at | + ~ or ','."""
    if names and condition in names:
        return names[condition]
    for sep in ("|", "+", "~", ","):
        if condition.count(sep) == 1:
            a, b = condition.split(sep)
            return a.strip(), b.strip()
    return "A", "B"


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    """(rows, cols) for n panels, at most ncols wide, rows filled evenly (6 → 2 × 3, not 2 × 4)."""
    n = max(n, 1)
    nrows = math.ceil(n / ncols)
    return nrows, math.ceil(n / nrows)


# --- figures (matplotlib's object API: no pyplot state, safe in any thread) --------------------------------


def fig_roi_bars(one: pd.DataFrame, measure: str, dim: int, layers: dict[str, int], rois: list[str]):
    """Mean ± sem per ROI and model · condition at the headline dim / layers, stars for one-sample q."""
    from matplotlib.figure import Figure

    rows = one[(one["measure"] == measure) & (one["dim"] == dim)
               & (one["layer"] == one["model"].map(layers))]
    streams = _streams(rows)
    table = rows.set_index(["model", "condition", "roi"])
    fig = Figure(figsize=(max(6.5, 0.45 * len(rois) * max(len(streams), 1) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(streams), 1)
    x = np.arange(len(rois))
    top = 0.0
    for k, (model, cond) in enumerate(streams):
        est, sem, marks = [], [], []
        for roi in rois:
            r = table.loc[(model, cond, roi)] if (model, cond, roi) in table.index else None
            est.append(np.nan if r is None else r["estimate"])
            sem.append(np.nan if r is None else r["sem"])
            marks.append("" if r is None else _stars(r["q"], bool(r["significant"])))
        xs = x - 0.4 + width * (k + 0.5)
        ax.bar(xs, est, width, yerr=sem, capsize=2, label=f"{_label(model, cond)} (layer {layers[model]})",
               color=f"C{k % 10}", error_kw={"lw": 0.8})
        for xi, e, s, mark in zip(xs, est, sem, marks):
            if mark and np.isfinite(e):
                y = e + (np.nan_to_num(s) if e >= 0 else -np.nan_to_num(s))
                ax.text(xi, y, mark, ha="center", va="bottom" if e >= 0 else "top", fontsize=7)
                top = max(top, abs(y))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, rois, rotation=30, ha="right")
    ax.set_ylabel(f"{measure} (mean ± sem across subjects)")
    ax.set_title(f"Encoding performance per ROI (PCA dim {dim}; * q ≤ α, ** ≤ .01, *** ≤ .001)")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def fig_contrasts(paired: pd.DataFrame, measure: str, dim: int, rois: list[str]):
    """One heatmap per contrast: layers × ROIs, colour = mean A − B of ``measure``, stars where significant."""
    from matplotlib.figure import Figure

    rows = paired[(paired["measure"] == measure) & (pd.to_numeric(paired["dim"], errors="coerce") == dim)]
    contrasts = list(dict.fromkeys(rows["contrast"]))
    nr, nc = _grid(len(contrasts), 3)
    vmax = float(np.nanmax(np.abs(rows["estimate"].to_numpy()))) if len(rows) else 1.0
    vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    n_layers = max(len(set(rows[rows["contrast"] == c]["layer"])) for c in contrasts)
    fig = Figure(figsize=(max(5.0, 0.5 * len(rois) + 1.5) * nc, (0.28 * n_layers + 1.8) * nr), layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False)
    im = None
    for ax, c in zip(axes.ravel(), contrasts):
        sub = rows[rows["contrast"] == c]
        layers = sorted(set(sub["layer"]), key=lambda v: (v == "", v if v != "" else 0))
        grid = np.full((len(layers), len(rois)), np.nan)
        for _, r in sub.iterrows():
            if r["roi"] in rois:
                i, j = layers.index(r["layer"]), rois.index(r["roi"])
                grid[i, j] = r["estimate"]
                mark = _stars(r["q"], bool(r["significant"]))
                if mark:
                    ax.text(j, i, mark, ha="center", va="center", fontsize=8,
                            color="white" if abs(r["estimate"]) > 0.6 * vmax else "black")
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(np.arange(len(rois)), rois, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(np.arange(len(layers)), [str(v) if v != "" else "–" for v in layers], fontsize=7)
        ax.set_ylabel("layer")
        model = sub["model"].iloc[0]
        cond = sub["condition"].iloc[0]
        held = ", ".join(v for v in (model, cond) if v)
        ax.set_title(f"{c}" + (f" ({held})" if held else ""), fontsize=9)
    for ax in axes.ravel()[len(contrasts):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"mean Δ{measure} (A − B)")
    fig.suptitle(f"Paired comparisons across subjects (PCA dim {dim}; * q ≤ α, ** ≤ .01, *** ≤ .001)", fontsize=10)
    return fig


def fig_partition(one: pd.DataFrame, dim: int, layers: dict[str, int], rois: list[str],
                  names: dict[str, tuple[str, str]] | None):
    """Unique A, unique B and shared variance per ROI (mean ± sem, stars), one panel per model · condition."""
    from matplotlib.figure import Figure

    parts = one[one["measure"].isin(PARTS)]
    dim = dim if (parts["dim"] == dim).any() else int(parts["dim"].max())
    parts = parts[parts["dim"] == dim]
    streams = _streams(parts)
    nr, nc = _grid(len(streams), 2)
    fig = Figure(figsize=(max(6.0, 0.55 * len(rois) + 2) * nc, 3.8 * nr), layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False)
    for ax, (model, cond) in zip(axes.ravel(), streams):
        sub = parts[(parts["model"] == model) & (parts["condition"] == cond)]
        layer = layers.get(model) if layers.get(model) in set(sub["layer"]) else int(sub["layer"].min())
        sub = sub[sub["layer"] == layer].set_index(["roi", "measure"])
        name_a, name_b = _part_names(cond, names)
        x = np.arange(len(rois))
        width = 0.8 / len(PARTS)
        for k, part in enumerate(PARTS):
            got = [sub.loc[(roi, part)] if (roi, part) in sub.index else None for roi in rois]
            est = [np.nan if r is None else r["estimate"] for r in got]
            sem = [np.nan if r is None else r["sem"] for r in got]
            xs = x - 0.4 + width * (k + 0.5)
            label = {"unique_a": f"unique {name_a}", "unique_b": f"unique {name_b}", "shared": "shared"}[part]
            ax.bar(xs, est, width, yerr=sem, capsize=2, label=label, color=_PART_COLORS[k], error_kw={"lw": 0.8})
            for xi, r in zip(xs, got):
                mark = "" if r is None else _stars(r["q"], bool(r["significant"]))
                if mark and np.isfinite(r["estimate"]):
                    e, s = r["estimate"], np.nan_to_num(r["sem"])
                    ax.text(xi, e + (s if e >= 0 else -s), mark, ha="center", va="bottom" if e >= 0 else "top",
                            fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, rois, rotation=30, ha="right")
        ax.set_ylabel("held-out R² (mean ± sem)")
        ax.set_title(f"Variance partitioning — {_label(model, cond)} (layer {layer}, dim {dim})", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(streams):]:
        ax.set_visible(False)
    return fig


def _profile_panels(one: pd.DataFrame, measure: str, rois: list[str], xkey: str, fixed: dict[str, dict[str, int]],
                    title: str, xlabel: str, log2: bool = False):
    """Small multiples per ROI: ``measure`` against ``xkey`` (layer or dim), one line per model · condition,
    the other of layer/dim fixed per model by ``fixed[model]``; sem band, filled markers where significant."""
    from matplotlib.figure import Figure

    rows = one[one["measure"] == measure]
    other = "dim" if xkey == "layer" else "layer"
    rows = rows[rows[other] == rows["model"].map(fixed[other])]
    streams = _streams(rows)
    ticks = sorted(set(rows[xkey]))
    # PCA dims are powers of 2 apart: equal steps (a log axis, drawn categorically, which is cheaper)
    pos = {v: i for i, v in enumerate(ticks)} if log2 else {v: v for v in ticks}
    nr, nc = _grid(len(rois), 4)
    height = 2.5 * nr + 1.1
    fig = Figure(figsize=(3.3 * nc + 0.8, height))
    # fixed margins: constrained layout doubles the drawing time of a grid whose labels are known in advance
    fig.subplots_adjust(left=0.8 / (3.3 * nc + 0.8), right=0.98, bottom=0.85 / height, top=1 - 0.5 / height,
                        wspace=0.12, hspace=0.3)
    axes = fig.subplots(nr, nc, squeeze=False, sharex=True, sharey=True)
    for ax, roi in zip(axes.ravel(), rois):
        for k, (model, cond) in enumerate(streams):
            s = rows[(rows["model"] == model) & (rows["condition"] == cond) & (rows["roi"] == roi)].sort_values(xkey)
            if s.empty:
                continue
            xs = s[xkey].map(pos).to_numpy(dtype=float)
            est, sem = s["estimate"].to_numpy(), s["sem"].to_numpy()
            color = f"C{k % 10}"
            ax.plot(xs, est, color=color, lw=1.2, label=_label(model, cond))
            ax.fill_between(xs, est - sem, est + sem, color=color, alpha=0.15, lw=0)
            sig = s["significant"].to_numpy(dtype=bool)
            ax.scatter(xs[sig], est[sig], color=color, s=14, zorder=3)
            ax.scatter(xs[~sig], est[~sig], facecolor="white", edgecolor=color, s=14, zorder=3)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(roi, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(rois):]:
        ax.set_visible(False)
    axes[0, 0].set_xticks([pos[v] for v in ticks], [str(v) for v in ticks])
    if log2:
        axes[0, 0].set_xlim(-0.3, len(ticks) - 0.7)
    for i, ax in enumerate(axes.ravel()[:len(rois)]):
        if i + nc >= len(rois):  # lowest visible panel of its column: it carries the x axis
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{measure} (mean ± sem)")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    return fig


def read_atlas_labels(path: Path) -> dict[int, str]:
    """``index<TAB>name`` TSV (as ``encoders.synth`` and fMRIPrep-style atlases write it) → {index: name}."""
    rows = pd.read_csv(path, sep="\t", dtype=str)
    cols = {c.lower(): c for c in rows.columns}
    idx = next((cols[k] for k in ("index", "label", "value", "id") if k in cols), None)
    name = next((cols[k] for k in ("name", "roi", "label_name", "region") if k in cols), None)
    if idx is None or name is None:
        raise ValueError(f"{path}: need columns 'index' and 'name', found {list(rows.columns)}")
    return {int(i): str(n) for i, n in zip(rows[idx], rows[name])}


def group_maps(best: pd.DataFrame, measure: str, atlas: Path, labels: dict[int, str], out_dir: Path
               ) -> list[tuple[str, Path, Path]]:
    """Paint each model · condition's headline one-sample estimates on the atlas ROIs.

    best : the one-sample rows of one measure at the headline dim / layers (one row per model, condition, roi).
    Returns (stream label, map of every ROI's mean, map of the significant ROIs only) per stream with a painted
    ROI; the NIfTIs are written to ``out_dir``. ROIs the atlas does not name are left out.
    """
    import nibabel as nib

    img = nib.load(atlas)
    atlas_data = np.asarray(img.dataobj).astype(np.int64)
    index = {name: k for k, name in labels.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, cond), rows in best.groupby(["model", "condition"], sort=False):
        mean = np.zeros(atlas_data.shape, np.float32)
        sig = np.zeros(atlas_data.shape, np.float32)
        painted = 0
        for r in rows.itertuples(index=False):
            if r.roi in index and np.isfinite(r.estimate):
                voxels = atlas_data == index[r.roi]
                mean[voxels] = r.estimate
                sig[voxels] = r.estimate if r.significant else 0.0
                painted += 1
        if not painted:
            continue
        stem = out_dir / f"{model}__{cond}_{measure}".replace("/", "-").replace("|", "-")
        paths = (stem.with_name(stem.name + ".nii.gz"), stem.with_name(stem.name + "_sig.nii.gz"))
        nib.save(nib.Nifti1Image(mean, img.affine), paths[0])
        nib.save(nib.Nifti1Image(sig, img.affine), paths[1])
        written.append((_label(model, cond), *paths))
    return written


def fig_brain_maps(maps: list[tuple[str, Path, Path]], measure: str):
    """Glass brains (nilearn) of the significant-ROI maps, one row per stream, a colour scale shared by all."""
    import warnings

    import nibabel as nib
    from matplotlib.figure import Figure
    from nilearn import plotting

    vmax = max(float(np.abs(np.asarray(nib.load(sig).dataobj)).max()) for _, _, sig in maps) or 1.0
    fig = Figure(figsize=(9.0, 2.6 * len(maps)))
    for k, (label, _, sig) in enumerate(maps):
        ax = fig.add_axes((0.0, 1 - (k + 1) / len(maps), 1.0, 1 / len(maps)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nilearn's notes on empty maps and on non-MNI grids
            plotting.plot_glass_brain(sig, axes=ax, colorbar=True, plot_abs=False, vmin=-vmax, vmax=vmax,
                                      cmap="RdBu_r", symmetric_cbar=True, threshold=1e-9,
                                      title=f"{label}: mean {measure}, significant ROIs")
    return fig


# --- HTML ------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "–"
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"
    return html.escape(str(v))


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _test_sentence(info: dict | None, alpha: float | None) -> str:
    if not info:
        return "Test: not recorded with the group table."
    if info.get("test") == "wilcoxon":
        what = "Wilcoxon signed-rank test (scipy, two-sided) of each subject's value or paired difference"
    else:
        what = (f"sign-flip permutation test of the mean across subjects (two-sided; all 2^n flips where "
                f"2^n ≤ {info.get('n_perm')}, else {info.get('n_perm')} random flips, seed {info.get('seed')}); "
                "stat = one-sample t. Chosen because N is small and the scores are bounded and skewed: flipping "
                "signs gives the exact null of a symmetric effect without assuming normality")
    return (f"Test: {what}. One-sample rows test each cell against 0, paired rows the difference A − B for the "
            f"subjects present in both. q: Benjamini–Hochberg over every row of group.tsv together; significant "
            f"= q ≤ {alpha if alpha is not None else info.get('alpha')}. effect_size: Cohen's d (d_z for paired).")


def write_study_report(out_dir: Path, scores: pd.DataFrame, group: pd.DataFrame, *, title: str,
                       truth: pd.DataFrame | None = None, rois: list[str] | None = None,
                       partition_names: dict[str, tuple[str, str]] | None = None, atlas: Path | None = None,
                       atlas_labels: dict[int, str] | Path | None = None) -> StudyReport:
    """Write the study's tables, summary, figures and HTML page into ``out_dir`` (layout: module docstring).

    Parameters
    ----------
    scores : DataFrame
        Per-subject tidy scores (``pipelines.group.SCORE_COLUMNS``), as given to ``group_table``.
    group : DataFrame
        ``group_table``'s result (columns ``GROUP_COLUMNS``; ``.attrs["group_test"]`` describes the test).
    title : str
        Page title.
    truth : DataFrame, optional
        Planted effects (``KEY_COLUMNS`` + ``planted_sign``): adds recovery.tsv and a "Known answer" section.
    rois : list of str, optional
        ROI order of the figures (e.g. the atlas order); default: as they come in ``group``.
    partition_names : dict, optional
        Condition of partition rows → (name of space A, name of space B) for the figure's legend; default: the
        condition split at ``|``, ``+``, ``~`` or ``,`` (e.g. ``action|reasoning``), else A / B.
    atlas, atlas_labels : optional
        ROI atlas NIfTI in the subjects' common space and its names ({index: name} or an ``index<TAB>name`` TSV;
        None = ROI names are the atlas indices): adds the group maps and the ``brain_maps`` figure.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    missing = [c for c in GROUP_COLUMNS if c not in group.columns]
    if missing:
        raise ValueError(f"group table lacks column(s) {', '.join(map(repr, missing))}")
    tidy = validate_scores(scores)
    info = group.attrs.get("group_test")
    alpha = info.get("alpha") if info else None

    paths = {"scores": out_dir / "scores.tsv", "group": out_dir / "group.tsv", "summary": out_dir / "summary.json",
             "html": out_dir / "report.html"}
    tidy.to_csv(paths["scores"], sep="\t", index=False, na_rep="n/a")
    group[list(GROUP_COLUMNS)].to_csv(paths["group"], sep="\t", index=False, na_rep="n/a")

    one = _one_sample(group)
    paired = group[group["test"] == "paired"]
    roi_order = _order(group["roi"], rois)
    measure = _main_measure(one)
    figures: dict[str, Path] = {}
    captions: dict[str, str] = {}
    headline: dict = {}

    def save(name: str, fig, caption: str) -> None:
        path = fig_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        figures[name], captions[name] = path, caption

    if measure is not None:
        dim, layers = _headline(one, measure)
        dims = sorted(set(one.loc[one["measure"] == measure, "dim"]))
        best = one[(one["measure"] == measure) & (one["dim"] == dim) & (one["layer"] == one["model"].map(layers))]
        headline = {"measure": measure, "dim": dim, "layer": layers,
                    "rows": best[["model", "condition", "roi", "n", "estimate", "sem", "q", "significant"]]
                    .to_dict(orient="records")}
        save("roi_bars", fig_roi_bars(one, measure, dim, layers, roi_order),
             f"Mean {measure} across subjects (± sem) per ROI at PCA dim {dim} and each model's headline layer "
             f"({', '.join(f'{m}: {v}' for m, v in layers.items())}: the layer with the highest mean {measure} over "
             "its conditions and ROIs). Stars: one-sample test against 0, FDR q.")
        if not paired[paired["measure"] == measure].empty and \
                (pd.to_numeric(paired["dim"], errors="coerce") == dim).any():
            save("contrasts", fig_contrasts(paired, measure, dim, roi_order),
                 f"Paired comparisons (A − B per subject, mean across subjects) of {measure} at PCA dim {dim}, every "
                 "layer × ROI; red: A higher. Stars: FDR q of the paired test.")
        if one.loc[one["measure"] == measure, "layer"].nunique() > 1:
            save("layer_profiles", _profile_panels(
                one, measure, roi_order, "layer", {"dim": {m: dim for m in layers}},
                f"Layer profiles (PCA dim {dim})", "layer"),
                f"Mean {measure} (± sem band) against layer per ROI and model · condition at PCA dim {dim}; filled "
                "markers: significant one-sample test (FDR).")
        if len(dims) > 1:
            save("dim_curve", _profile_panels(
                one, measure, roi_order, "dim", {"layer": layers},
                "PCA dimension curve (headline layer per model)", "PCA dimensions", log2=True),
                f"Mean {measure} (± sem band) against the PCA dimension per ROI at each model's headline layer; "
                "filled markers: significant (FDR).")
    maps: list[tuple[str, Path, Path]] = []
    if atlas is not None and measure is not None:
        labels = (read_atlas_labels(Path(atlas_labels)) if isinstance(atlas_labels, (str, Path))
                  else atlas_labels or {int(r): r for r in roi_order if r.isdigit()})
        maps = group_maps(best, measure, Path(atlas), labels, out_dir / "maps")
        if maps:
            save("brain_maps", fig_brain_maps(maps[:MAX_BRAIN_ROWS], measure),
                 f"Mean {measure} across subjects per ROI at the headline layer and dim, significant ROIs only "
                 f"(FDR), painted on {Path(atlas).name}; NIfTIs in maps/ (every ROI's mean, and significant only)"
                 + (f"; first {MAX_BRAIN_ROWS} of {len(maps)} streams drawn" if len(maps) > MAX_BRAIN_ROWS else "")
                 + ".")
    if one["measure"].isin(PARTS).any():
        save("partition", fig_partition(one, headline.get("dim", int(one["dim"].max())), headline.get("layer", {}),
                                        roi_order, partition_names),
             "Variance partitioning per ROI (Dupré la Tour et al. 2022): unique A = R²(A∪B) − R²(B), unique B = "
             "R²(A∪B) − R²(A), shared = R²(A) + R²(B) − R²(A∪B), held-out R², mean ± sem across subjects; "
             "negative values are reported as they are (no detectable unique/shared variance). Stars: one-sample "
             "test against 0, FDR q.")

    rec, rec_path, known = None, None, ""
    if truth is not None:
        matched = match_truth(group, truth)
        rec = recovery(group, truth)
        rec_path = out_dir / "recovery.tsv"
        matched.to_csv(rec_path, sep="\t", index=False, na_rep="n/a")
        show = matched[(matched["planted_sign"] != 0) | matched["significant"]]
        known = ("<h2 id='known-answer'>Known answer: planted vs recovered</h2>"
                 f"<p>Planted effects recovered (significant with the planted sign): <b>{rec.n_planted_recovered} / "
                 f"{rec.n_planted}</b> (wrong sign: {rec.n_planted_wrong_sign}, missing from the table: "
                 f"{rec.n_missing}); planted-null effects significant: <b>{rec.n_null_significant} / {rec.n_null}"
                 f"</b>; observed false discovery proportion {_fmt(rec.observed_fdr)}.</p>"
                 + _table(show[[*KEY_COLUMNS, "planted_sign", "estimate", "q", "significant", "recovered"]])
                 + "<p class='caption'>Every planted row, and every planted-null row found significant "
                   "(all rows: recovery.tsv).</p>")

    testable = group["p"].notna()
    sig = group[group["significant"].astype(bool)].sort_values(["test", "contrast", "q"], kind="stable")
    summary = {
        "title": title, "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_subjects": int(tidy["subject"].nunique()), "subjects": sorted(tidy["subject"].unique()),
        "models": sorted(tidy["model"].unique()), "conditions": sorted(tidy["condition"].unique()),
        "layers": sorted(int(v) for v in tidy["layer"].unique()), "dims": sorted(int(v) for v in tidy["dim"].unique()),
        "rois": roi_order, "measures": [m for m in MEASURES if m in set(tidy["measure"])]
        + sorted(set(tidy["measure"]) - set(MEASURES)),
        "test": info, "n_tests": int(testable.sum()), "n_significant": int(len(sig)),
        "by_test": {t: {"n_tests": int((testable & (group["test"] == t)).sum()),
                        "n_significant": int((group["significant"].astype(bool) & (group["test"] == t)).sum())}
                    for t in ("one_sample", "paired")},
        "by_contrast": {c: {"n_tests": int(len(rows)), "n_significant": int(rows["significant"].astype(bool).sum())}
                        for c, rows in paired.groupby("contrast", sort=False)},
        "headline": headline,
        "recovery": asdict(rec) if rec else None,
        "files": {"scores": "scores.tsv", "group": "group.tsv", "report": "report.html",
                  "recovery": rec_path.name if rec_path else None,
                  "figures": {k: str(v.relative_to(out_dir)) for k, v in figures.items()},
                  "maps": [str(p.relative_to(out_dir)) for _, *ps in maps for p in ps]},
    }
    paths["summary"].write_text(json.dumps(json_ready(summary), indent=2, allow_nan=False))

    meta = (f"written {summary['written']}; {summary['n_subjects']} subjects; models {', '.join(summary['models'])}; "
            f"conditions {', '.join(summary['conditions'])}; layers {', '.join(map(str, summary['layers']))}; "
            f"PCA dims {', '.join(map(str, summary['dims']))}; {len(roi_order)} ROIs")
    sections = [f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>",
                f"<p>{html.escape(_test_sentence(info, alpha))} {summary['n_significant']} of {summary['n_tests']} "
                "tests significant.</p>", known]
    headings = {"roi_bars": "Encoding performance per ROI", "brain_maps": "Group maps",
                "contrasts": "Paired comparisons", "partition": "Variance partitioning",
                "layer_profiles": "Layer profiles", "dim_curve": "PCA dimension curve"}
    for name in sorted(figures, key=list(headings).index):  # the paper's order, whatever order they were drawn
        path = figures[name]
        rel = path.relative_to(out_dir).as_posix()
        sections.append(f"<h2 id='{name}'>{headings[name]}</h2><img alt='{html.escape(headings[name])}' "
                        f"src='{html.escape(rel)}'><p class='caption'>{html.escape(captions[name])}</p>")
    sections.append("<h2 id='significant'>Significant effects</h2>")
    if sig.empty:
        sections.append("<p class='none'>No effect is significant at the table's FDR level.</p>")
    else:
        sections.append(_table(sig.head(MAX_TABLE_ROWS)[list(GROUP_COLUMNS)]))
        if len(sig) > MAX_TABLE_ROWS:
            sections.append(f"<p class='caption'>First {MAX_TABLE_ROWS} of {len(sig)}; all in group.tsv.</p>")
    files = [("scores.tsv", "per-subject scores"), ("group.tsv", "every tested effect"),
             ("summary.json", "design, test, counts, headline")] + ([("recovery.tsv", "truth beside group rows")]
                                                                    if rec_path else [])
    sections.append("<h2 id='files'>Data</h2><ul>" + "".join(
        f"<li><a href='{f}'><code>{f}</code></a>: {d}</li>" for f, d in files) + "</ul>")
    paths["html"].write_text("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                             + "\n".join(s for s in sections if s) + "</body></html>")
    return StudyReport(out_dir=out_dir, html=paths["html"], scores_tsv=paths["scores"], group_tsv=paths["group"],
                       summary_json=paths["summary"], figures=figures, n_subjects=summary["n_subjects"],
                       n_tests=summary["n_tests"], n_significant=summary["n_significant"], recovery_tsv=rec_path,
                       recovery=rec, headline=headline, maps=[p for _, *ps in maps for p in ps])
