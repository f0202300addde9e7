"""Fit a voxelwise encoding model from files: the one path of ``neuroarcade fit`` and ``fit-subjects``.

:func:`run_fit` reads BOLD runs and feature files (given one by one, found in a BIDS dataset, or fMRIPrep's
preprocessed runs of it), cleans the BOLD as :class:`encoders.data.FitPreprocess` says (recorded in the
weights), fits them with :func:`encoders.fit.fit_encoding`, writes the weights atomically and, when asked, the
reports beside them: ``<stem>_scores.tsv`` (one row per ROI, 'all' first, ROIs as
:func:`encoders.weights.roi_table` lists them) and per-voxel NIfTI maps ``<stem>_<score>.nii.gz``
(plus the variance partition of two spaces). Inputs that cannot be used raise
:class:`encoders.data.FitInputError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from encoders.data import FitPreprocess
from encoders.fit import FitConfig


@dataclass
class SpaceFiles:
    """One feature space given as files."""

    name: str
    """Space name ('' = the first file's sidecar ``space``, else ``features``)."""
    files: list[Path]
    """One ``.npy`` per BOLD run (rows = TRs), in the runs' order."""
    label: str = ""
    """How the caller named these files, prefixed to an error about them (``--features``; '' = none)."""


@dataclass
class FitRunConfig:
    """One encoding fit from files."""

    out: Path
    """Weights file to write (``.safetensors``); the reports go beside it."""
    bold: list[Path] = field(default_factory=list)
    """4D BOLD runs (NIfTI), with ``spaces``; unused with ``bids``."""
    spaces: list[SpaceFiles] = field(default_factory=list)
    """Feature spaces as files, with ``bold``; unused with ``bids``."""
    bids: str | Path | None = None
    """BIDS dataset root: runs and ``derivatives/features/*_desc-<space>_features.npy`` found there."""
    derivatives: str | Path | None = None
    """With ``bids``: fMRIPrep's output folder; its ``*_desc-preproc_bold`` runs (and ``*_desc-brain_mask``,
    ``*_desc-confounds_timeseries.tsv``) are fitted instead of the raw runs (None = the raw runs)."""
    subject: str | None = None
    """BIDS subject label without ``sub-`` (None = every subject's runs)."""
    session: str | None = None
    """With ``derivatives``: BIDS session label without ``ses-`` (None = every session)."""
    task: str | None = None
    """BIDS task label (None = every task)."""
    output_space: str | None = None
    """With ``derivatives``: fMRIPrep output space (``space-`` entity, e.g. MNI152NLin2009cAsym); None = the
    only one there is."""
    preprocess: FitPreprocess = field(default_factory=FitPreprocess)
    """Cleaning of the BOLD before the ridge (mode, confound sets, high-pass); recorded in the weights."""
    select: tuple[str, ...] | None = None
    """With ``bids``: the feature spaces to fit (None = all the dataset has)."""
    mask: Path | None = None
    """Brain mask NIfTI (None = with ``derivatives`` the runs' brain masks intersected, else the voxels
    varying in every run)."""
    tr: float | None = None
    """Repetition time in s (None = sidecar JSON / NIfTI header)."""
    fit: FitConfig = field(default_factory=FitConfig)
    """Ridge settings (delays, alphas, PCA, backend, scoring, permutations)."""
    atlas: Path | None = None
    """ROI atlas NIfTI (integer labels); None = the 'all' row only."""
    atlas_labels: Path | None = None
    """TSV with columns index, name for the atlas."""
    partition: bool = False
    """Variance partitioning of the two feature spaces (needs exactly two, and ≥2 runs)."""
    model: str | None = None
    """Provenance of every space: model name (None = from the feature sidecars)."""
    layer: int | None = None
    """Provenance: layer index (None = from the sidecars)."""
    condition: str | None = None
    """Provenance: prompt condition (None = from the sidecars)."""
    pooling: str | None = None
    """Provenance: pooling (None = from the sidecars)."""
    reports: bool = True
    """Write the ROI scores TSV and the per-voxel maps beside the weights."""
    record_subject: bool = False
    """Record ``subject`` and ``bids`` first in the weights' provenance (the per-subject batch does)."""
    record_feature_files: bool = True
    """Record the feature files in the weights' provenance."""


@dataclass
class FitRunSummary:
    """What :func:`run_fit` fitted and wrote."""

    weights: Path
    runs: int
    voxels: int
    """Voxels in the mask."""
    tr: float
    mean_cv_r: float | None
    """Mean over voxels of the leave-one-run-out CV r (None when not scored)."""
    rows: list[dict] = field(default_factory=list)
    """The ROI table ('all' first), one dict per ROI, as written to ``<stem>_scores.tsv``."""
    written: list[Path] = field(default_factory=list)
    """Every file written: the weights first, then the reports."""
    warnings: list[str] = field(default_factory=list)
    """What the fit could not do as asked (e.g. one run: no held-out scores)."""


def run_fit(cfg: FitRunConfig, warn: Callable[[str], None] | None = None) -> FitRunSummary:
    """Load, fit, write the weights (atomically) and the reports; ``warn`` gets each fit warning at once."""
    from encoders.data import (FitInputError, bids_runs, fmriprep_runs, load_atlas, load_bold, load_feature_runs,
                               preprocess_bold)
    from encoders.fit import fit_encoding, partition_variance

    run_masks = None
    if cfg.derivatives is not None and cfg.bids is None:
        raise FitInputError("--derivatives needs --bids (the dataset whose derivatives/features hold the features)")
    if cfg.bids is not None:
        if cfg.derivatives is not None:
            prepped = fmriprep_runs(cfg.bids, cfg.derivatives, cfg.subject, cfg.task, cfg.session, cfg.output_space)
            bold_paths, found, run_masks = prepped.bold, prepped.spaces, prepped.masks
        else:
            bold_paths, found = bids_runs(cfg.bids, cfg.subject, cfg.task)
        if cfg.select:
            missing = set(cfg.select) - set(found)
            if missing:
                raise FitInputError(f"--spaces {sorted(missing)} not found; dataset has {sorted(found)}")
            found = {k: found[k] for k in cfg.select}
        spaces = [SpaceFiles(name, files) for name, files in found.items()]
    else:
        bold_paths, spaces = cfg.bold, cfg.spaces
    if cfg.partition and len(spaces) != 2:  # before the fit, not after it
        raise FitInputError(f"--partition needs exactly two feature spaces, have {len(spaces)}")
    bold = load_bold(bold_paths, cfg.mask, cfg.tr, run_masks=None if cfg.mask else run_masks)
    cleaned = preprocess_bold(bold, cfg.preprocess)  # raw runs: realigned into the first run's reference, as live
    runs_clean, preprocessing = cleaned.runs, cleaned.record
    if cfg.partition and len(bold.runs) < 2:
        raise FitInputError("--partition needs ≥2 runs (its scores are leave-one-run-out)")
    features: dict[str, list[np.ndarray]] = {}
    provenance: dict[str, dict] = {}
    for space in spaces:
        try:
            runs, meta = load_feature_runs(space.files, bold)  # checks rows against the raw runs' volumes
        except FitInputError as e:
            if not space.label:  # the message names the files
                raise
            raise FitInputError(f"{space.label}: {e}") from None
        name = space.name or meta.get("space") or "features"
        features[name] = runs
        provenance[name] = {
            "model": cfg.model if cfg.model is not None else meta.get("model", ""),
            "layer": cfg.layer if cfg.layer is not None else meta.get("layer"),
            "condition": cfg.condition if cfg.condition is not None else meta.get("condition", ""),
            "pooling": cfg.pooling if cfg.pooling is not None else meta.get("pooling", ""),
        }
    roi_labels, roi_names = (None, {})
    if cfg.atlas:
        roi_labels, roi_names = load_atlas(cfg.atlas, cfg.atlas_labels, bold.mask, bold.affine)
    extra: dict = {"subject": cfg.subject, "bids": str(cfg.bids)} if cfg.record_subject else {}
    if cfg.derivatives is not None:
        extra["derivatives"] = str(cfg.derivatives)
    extra["bold"] = [str(p) for p in bold.paths]
    if cfg.record_feature_files:
        extra["features"] = {s.name: [str(f) for f in s.files] for s in spaces}
    res = fit_encoding(runs_clean, features, cfg.fit, mask=bold.mask, affine=bold.affine, tr=bold.tr,
                       provenance=provenance, roi_labels=roi_labels, roi_names=roi_names,
                       atlas=cfg.atlas.name if cfg.atlas else "", extra_provenance=extra,
                       preprocessing=preprocessing, reference=cleaned.reference)
    for warning in res.warnings:
        if warn:
            warn(warning)
    out = _save_atomically(res.weights, Path(cfg.out))
    summary = FitRunSummary(out, len(bold.runs), int(bold.mask.sum()), bold.tr,
                            float(np.mean(res.cv_r)) if res.cv_r is not None else None,
                            written=[out], warnings=list(res.warnings))
    if not cfg.reports:
        return summary
    summary.rows = roi_summary(res)
    partition = None
    if cfg.partition:
        from encoders.weights import roi_table

        (na, ra), (nb, rb) = features.items()
        parts = partition_variance(runs_clean, (na, ra), (nb, rb), cfg.fit)
        partition = {f"unique_{na}": parts["unique_a"], f"unique_{nb}": parts["unique_b"], "shared": parts["shared"]}
        for row, (_, idx) in zip(summary.rows, roi_table(res.weights)):
            row.update({k: float(v[idx].mean()) for k, v in partition.items()})
    summary.written += write_fit_reports(out, res, summary.rows, partition)
    return summary


def _save_atomically(weights, path: Path) -> Path:
    """Write the weights to a temp file beside ``path``, then rename it over ``path``: never a partial file."""
    from encoders.data import FitInputError

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        os.replace(weights.save(tmp), path)
    except OSError as e:  # a read-only folder, a full disk: the reports beside it would fail alike
        tmp.unlink(missing_ok=True)
        raise FitInputError(f"--out {path}: cannot write ({e.strerror or e})") from None
    return path


def roi_summary(res) -> list[dict]:
    """Per ROI ('all' first, as :func:`encoders.weights.roi_table`): voxels, mean CV r and R², share
    significant, noise ceiling."""
    from encoders.weights import roi_table

    rows = []
    for name, idx in roi_table(res.weights):
        row: dict = {"roi": name, "n_voxels": len(idx)}
        if res.cv_r is not None:  # a score row (encoders.score): r over the voxels whose r is defined, and R²
            from encoders.score import CV_VOXEL_MEAN, mean_r

            row["kind"] = CV_VOXEL_MEAN
            row["r"], row["n_undefined"] = mean_r(np.where(res.cv_r_undefined[idx], np.nan, res.cv_r[idx]))
            row["r2"] = float(res.cv_r2[idx].mean())
        if res.significant is not None:
            row["frac_significant"] = float(res.significant[idx].mean())
        if res.noise_ceiling is not None:
            row["noise_ceiling"] = float(res.noise_ceiling[idx].mean())
        rows.append(row)
    return rows


def write_fit_reports(weights_path: Path, res, rows: list[dict], partition) -> list[Path]:
    """Beside the weights: ROI table (TSV) and per-voxel maps (NIfTI) of the CV scores."""
    import nibabel as nib

    stem = weights_path.with_suffix("")
    written = []
    tsv = Path(f"{stem}_scores.tsv")
    cols = list(rows[0])
    for r in rows:
        cols += [c for c in r if c not in cols]
    tsv.write_text("\t".join(cols) + "\n" + "".join(
        "\t".join(f"{r.get(c, float('nan')):.6g}" if not isinstance(r.get(c), str) else r[c] for c in cols) + "\n"
        for r in rows))
    written.append(tsv)
    w = res.weights
    maps = {"cv_r": res.cv_r, "cv_r2": res.cv_r2, "q": res.q_values, "noise_ceiling": res.noise_ceiling}
    if partition is not None:
        maps |= partition
    for name, values in maps.items():
        if values is not None:
            path = Path(f"{stem}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(w.to_volume(values), w.affine), path)
            written.append(path)
    return written
