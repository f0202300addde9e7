"""Reading the inputs of a fit: BOLD runs (NIfTI / BIDS / fMRIPrep derivatives), masks, atlases, feature
matrices, fMRIPrep confounds, and the cleaning of the BOLD before the ridge (:func:`clean_bold`)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from encoders.preprocess import PreprocessConfig
    from encoders.weights import PreprocessRecord


class FitInputError(ValueError):
    """An input of a fit that cannot be used as given: missing, unreadable, of the wrong shape, or not
    matching the other inputs. The message names the file (or what to pass instead) in one line, so a
    command prints it as it is."""


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def _load_nifti(path: Path, what: str):
    """The NIfTI image at ``path`` (header only: the data is read by :func:`_nifti_data`)."""
    import nibabel as nib

    if not path.is_file():
        raise FitInputError(f"{path}: no such {what} file")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError… for damaged headers
        raise FitInputError(f"{path}: not a readable NIfTI {what} ({_one_line(e)})") from None


def _nifti_data(path: Path, img, dtype=None) -> np.ndarray:
    """All voxels of ``img``; a truncated or damaged file names itself."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # truncated .nii: OSError; truncated .nii.gz: EOFError / zlib.error
        raise FitInputError(f"{path}: truncated or damaged NIfTI ({_one_line(e)})") from None


@dataclass
class BoldRuns:
    """Masked BOLD runs on one grid."""

    runs: list[np.ndarray]
    """Per run (T_i, V) float32, masked voxels in C order."""
    mask: np.ndarray
    affine: np.ndarray
    tr: float
    paths: list[Path]
    mean_epi: np.ndarray | None = field(default=None, repr=False)
    """(X, Y, Z) float32 mean over the runs' volumes (the whole grid, non-finite values as 0): the reference
    volume of the fit's space."""


def repetition_time(path: Path, img) -> float | None:
    """TR from the BIDS sidecar (RepetitionTime) or, failing that, the NIfTI pixdim[4]."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            sidecar = path.with_name(name[: -len(ext)] + ".json")
            if sidecar.is_file():
                try:
                    tr = json.loads(sidecar.read_text()).get("RepetitionTime")
                except (ValueError, AttributeError) as e:
                    raise FitInputError(f"{sidecar}: not a JSON sidecar ({_one_line(e)})") from None
                if tr:
                    return float(tr)
    zooms = img.header.get_zooms()
    return float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else None


def load_bold(paths: list[str | Path], mask_path: str | Path | None = None, tr: float | None = None, *,
              run_masks: list[str | Path] | None = None) -> BoldRuns:
    """Load 4D runs, check they share a grid, apply a mask (default: the voxels inside every one of
    ``run_masks`` — e.g. fMRIPrep's per-run brain masks — or, without them, the voxels varying in every run).

    Raises :class:`FitInputError` naming the file that is missing, unreadable or does not fit.
    """
    paths = [Path(p) for p in paths]
    imgs = [_load_nifti(p, "BOLD run") for p in paths]
    for p, img in zip(paths, imgs):
        if len(img.shape) != 4:
            raise FitInputError(f"{p}: not a 4D BOLD run (shape {img.shape})")
        if img.shape[:3] != imgs[0].shape[:3] or not np.allclose(img.affine, imgs[0].affine, atol=1e-3):
            raise FitInputError(f"{p}: on another grid than {paths[0]} ({img.shape[:3]} vs {imgs[0].shape[:3]})")
    datas = [_nifti_data(p, img, np.float32) for p, img in zip(paths, imgs)]
    if mask_path is not None:
        mask_path = Path(mask_path)
        mimg = _load_nifti(mask_path, "mask")
        if mimg.shape[:3] != imgs[0].shape[:3]:
            raise FitInputError(f"{mask_path}: mask grid {mimg.shape[:3]}, BOLD has {imgs[0].shape[:3]}")
        mask = _nifti_data(mask_path, mimg) > 0
    elif run_masks:
        mask = np.ones(imgs[0].shape[:3], dtype=bool)
        for mp in map(Path, run_masks):
            mimg = _load_nifti(mp, "brain mask")
            if mimg.shape[:3] != imgs[0].shape[:3] or not np.allclose(mimg.affine, imgs[0].affine, atol=1e-3):
                raise FitInputError(f"{mp}: brain mask on another grid than {paths[0]} "
                                    f"({mimg.shape[:3]} vs {imgs[0].shape[:3]})")
            m = _nifti_data(mp, mimg)
            mask &= (m[..., 0] if m.ndim == 4 else m) > 0
        mask_path = run_masks[0]
    else:
        mask = np.ones(imgs[0].shape[:3], dtype=bool)
        for d in datas:
            mask &= d.std(axis=3) > 0
    mask &= np.all([np.isfinite(d).all(axis=3) for d in datas], axis=0)
    if not mask.any():
        raise FitInputError(f"{mask_path or paths[0]}: the mask selects no voxel"
                            + ("" if mask_path else " (none varies in every run)"))
    trs = {repetition_time(p, img) for p, img in zip(paths, imgs)} - {None}
    if tr is None:
        if len(trs) != 1:
            raise FitInputError(f"cannot tell the TR of {paths[0]} (found {sorted(trs) or 'none'}); pass --tr")
        tr = trs.pop()
    runs = [d[mask].T.copy() for d in datas]
    mean_epi = np.nan_to_num(np.mean([d.mean(axis=3, dtype=np.float64) for d in datas], axis=0),
                             nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return BoldRuns(runs, mask, imgs[0].affine, float(tr), paths, mean_epi)


def load_atlas(atlas_path: str | Path, labels_path: str | Path | None, mask: np.ndarray, affine: np.ndarray
               ) -> tuple[np.ndarray, dict[int, str]]:
    """ROI label per masked voxel and label names; the atlas is resampled (nearest) to the BOLD grid if needed."""
    atlas_path = Path(atlas_path)
    img = _load_nifti(atlas_path, "atlas")
    if img.shape[:3] != mask.shape or not np.allclose(img.affine, affine, atol=1e-3):
        import warnings

        from nilearn.image import resample_img

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = resample_img(img, target_affine=affine, target_shape=mask.shape, interpolation="nearest",
                               force_resample=True, copy_header=True)
    labels = _nifti_data(atlas_path, img).astype(np.int32)[mask]
    names: dict[int, str] = {}
    if labels_path is not None:
        try:
            with open(labels_path, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
        except OSError as e:
            raise FitInputError(f"{labels_path}: unreadable labels table ({_one_line(e)})") from None
        if not rows:
            raise FitInputError(f"{labels_path}: empty labels table")
        keys = {k.lower(): k for k in rows[0]}
        idx_key = next((keys[k] for k in ("index", "label", "value", "id") if k in keys), None)
        name_key = next((keys[k] for k in ("name", "roi", "label_name", "region") if k in keys), None)
        if idx_key is None or name_key is None:
            raise FitInputError(f"{labels_path}: need columns 'index' and 'name', found {list(rows[0])}")
        try:
            names = {int(r[idx_key]): r[name_key] for r in rows}
        except (TypeError, ValueError) as e:
            raise FitInputError(f"{labels_path}: column {idx_key!r} must hold integers ({_one_line(e)})") from None
    return labels, names


def load_features(path: str | Path) -> tuple[np.ndarray, dict]:
    """A (T, dim) feature matrix (.npy, no pickle) and its JSON sidecar's provenance, if any."""
    path = Path(path)
    if not path.is_file():
        raise FitInputError(f"{path}: no such feature file")
    try:
        X = np.load(path, allow_pickle=False)
    except Exception as e:  # not .npy, truncated, pickled objects
        raise FitInputError(f"{path}: not a readable .npy feature matrix ({_one_line(e)})") from None
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise FitInputError(f"{path}: features must be one (n_trs, dim) array, got "
                            f"{f'shape {X.shape}' if isinstance(X, np.ndarray) else 'an .npz archive'}")
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except ValueError as e:
        raise FitInputError(f"{sidecar}: not a JSON sidecar ({_one_line(e)})") from None
    return X.astype(np.float32), meta


def load_feature_runs(files: list[Path], bold: BoldRuns) -> tuple[list[np.ndarray], dict]:
    """One feature space: a matrix per BOLD run, each with one row per volume of its run, and the
    first file's sidecar provenance. Raises :class:`FitInputError` naming the file that does not fit."""
    if len(files) != len(bold.runs):
        raise FitInputError(f"{len(files)} feature files for {len(bold.runs)} BOLD runs (one per run, same order)")
    loaded = [load_features(f) for f in files]
    for (X, _), f, y, bold_path in zip(loaded, files, bold.runs, bold.paths):
        if len(X) != len(y):
            raise FitInputError(f"{f}: {len(X)} feature rows, but {bold_path} has {len(y)} volumes "
                                "(one row per TR)")
    return [X for X, _ in loaded], loaded[0][1]


def bids_runs(root: str | Path, subject: str | None = None, task: str | None = None
              ) -> tuple[list[Path], dict[str, list[Path]]]:
    """BOLD runs of a BIDS dataset and their feature files in ``derivatives/features`` (by space)."""
    root = Path(root)
    pattern = f"*task-{task or '*'}_*bold.nii*"
    # sub-X/func/ or sub-X/ses-Y/func/
    bold = sorted(p for p in root.glob(f"sub-{subject or '*'}/**/func/{pattern}") if "derivatives" not in p.parts)
    if not bold:
        raise FitInputError(f"{root}: no BOLD runs (pattern sub-*/**/func/{pattern})")
    return bold, _pair_features(root, [(b.name.split("_bold")[0], b.parent.relative_to(root)) for b in bold])


def _pair_features(root: Path, runs: list[tuple[str, Path]]) -> dict[str, list[Path]]:
    """Feature files by space for runs given as (BIDS stem ``sub-01_task-x_run-1``, folder relative to the
    dataset ``sub-01/func``): ``derivatives/features/<folder>/<stem>_desc-<space>_features.npy``."""
    spaces: dict[str, list[Path]] = {}
    for stem, rel in runs:
        for f in sorted((root / "derivatives" / "features" / rel).glob(f"{stem}_desc-*_features.npy")):
            space = f.name.split("_desc-")[1].split("_features")[0]
            spaces.setdefault(space, []).append(f)
    for space, files in spaces.items():
        if len(files) != len(runs):
            raise FitInputError(f"{root / 'derivatives' / 'features'}: feature space {space!r} has {len(files)} "
                                f"files for {len(runs)} BOLD runs")
    return spaces


# --------------------------------------------------------------------------- fMRIPrep derivatives

_SPACE_ENTITIES = ("space", "res", "den", "cohort", "desc")
"""Entities of a derivative file name that the raw run (and its features and confounds) do not have."""


def bids_entities(path: str | Path) -> tuple[dict[str, str], str]:
    """(``{"sub": "01", "task": "x", …}``, suffix ``bold``) of a BIDS file name."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".tsv", ".json", ".npy"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    *pairs, suffix = name.split("_")
    return dict(p.split("-", 1) for p in pairs if "-" in p), suffix


def run_stem(path: str | Path) -> str:
    """The raw run's stem of a derivative file: ``sub-01_task-x_run-1`` of
    ``sub-01_task-x_run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz``."""
    ents, _ = bids_entities(path)
    return "_".join(f"{k}-{v}" for k, v in ents.items() if k not in _SPACE_ENTITIES)


def confounds_file(bold: str | Path) -> Path:
    """fMRIPrep's confounds table of a ``*_desc-preproc_bold`` run: ``<stem>_desc-confounds_timeseries.tsv``."""
    bold = Path(bold)
    return bold.parent / f"{run_stem(bold)}_desc-confounds_timeseries.tsv"


def is_fmriprep_bold(path: str | Path) -> bool:
    """A file named as fMRIPrep's preprocessed BOLD (``*_desc-preproc_bold.nii[.gz]``)."""
    ents, suffix = bids_entities(path)
    return suffix == "bold" and ents.get("desc") == "preproc"


@dataclass
class FmriprepRuns:
    """Preprocessed runs of one fMRIPrep derivatives folder, their brain masks and feature files."""

    bold: list[Path]
    """``*_desc-preproc_bold.nii.gz`` per run, sorted by name."""
    masks: list[Path]
    """``*_desc-brain_mask.nii.gz`` of each run (same entities)."""
    spaces: dict[str, list[Path]]
    """Feature files by space, one per run, from ``<bids>/derivatives/features``."""
    space: str
    """The output space of the runs (``space-`` entity; '' = none in the names)."""


def fmriprep_runs(bids: str | Path, derivatives: str | Path, subject: str | None = None, task: str | None = None,
                  session: str | None = None, space: str | None = None) -> FmriprepRuns:
    """fMRIPrep's ``*_desc-preproc_bold.nii[.gz]`` runs under ``derivatives`` selected by BIDS entities (sub,
    ses, task, space; runs are what the file names say), each with its ``*_desc-brain_mask`` and the feature
    files of its raw run in ``<bids>/derivatives/features`` (paired as :func:`bids_runs` pairs them). With
    several output spaces and no ``space``, the choice is refused with the spaces found."""
    bids, deriv = Path(bids), Path(derivatives)
    if not deriv.is_dir():
        raise FitInputError(f"--derivatives {deriv}: no such fMRIPrep derivatives folder")
    want = {"sub": subject, "ses": session, "task": task, "space": space}
    found: list[tuple[Path, dict[str, str]]] = []
    for p in sorted(deriv.glob(f"sub-{subject or '*'}/**/func/*_desc-preproc_bold.nii*")):
        ents, suffix = bids_entities(p)
        if suffix == "bold" and all(v is None or ents.get(k) == v for k, v in want.items()):
            found.append((p, ents))
    if not found:
        filters = ", ".join(f"{k}-{v}" for k, v in want.items() if v) or "none"
        raise FitInputError(f"--derivatives {deriv}: no fMRIPrep runs (sub-*/**/func/*_desc-preproc_bold.nii*, "
                            f"entities {filters})")
    spaces_found = sorted({e.get("space", "") for _, e in found})
    if len(spaces_found) > 1:
        raise FitInputError(f"--derivatives {deriv}: runs in several output spaces {spaces_found}; "
                            "choose one with --output-space")
    bold = [p for p, _ in found]
    stems = [run_stem(p) for p in bold]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise FitInputError(f"--derivatives {deriv}: several preprocessed files for run(s) {dup} (e.g. res-/den- "
                            "variants); keep one per run")
    masks = []
    for p in bold:
        m = p.with_name(p.name.replace("_desc-preproc_bold.nii", "_desc-brain_mask.nii"))
        if not m.is_file():
            raise FitInputError(f"{m}: no such brain mask (fMRIPrep writes one beside {p.name}); or pass --mask")
        masks.append(m)
    spaces = _pair_features(bids, [(s, p.parent.relative_to(deriv)) for s, p in zip(stems, bold)])
    if not spaces:
        raise FitInputError(f"{bids / 'derivatives' / 'features'}: no feature files for the runs "
                            f"({stems[0]}_desc-<space>_features.npy, …)")
    return FmriprepRuns(bold, masks, spaces, spaces_found[0])


# ------------------------------------------------------------------------------ confound sets

N_COMPCOR = 5
"""aCompCor components of the ``acompcor`` set: the top 5 of the combined WM+CSF mask (Behzadi et al. 2007)."""

CONFOUND_SETS: dict[str, dict] = {
    "motion6": {"strategy": ("motion",), "motion": "basic"},
    "motion12": {"strategy": ("motion",), "motion": "derivatives"},
    "motion24": {"strategy": ("motion",), "motion": "full"},
    "wm_csf": {"strategy": ("wm_csf",), "wm_csf": "basic"},
    "global_signal": {"strategy": ("global_signal",), "global_signal": "basic"},
    "acompcor": {"strategy": ("high_pass", "compcor"), "compcor": "anat_combined", "n_compcor": N_COMPCOR},
    "cosine": {"strategy": ("high_pass",)},
}
"""Named confound sets → ``nilearn.interfaces.fmriprep.load_confounds`` arguments. motion6: trans_x … rot_z;
motion12: + their ``_derivative1``; motion24: + the ``_power2`` of both (Friston 24); wm_csf, global_signal:
the mean signals; acompcor: ``a_comp_cor_*`` (top :data:`N_COMPCOR` of the combined mask, from the JSON
sidecar); cosine: fMRIPrep's ``cosineXX`` columns (otherwise the drift basis is ours, at ``high_pass_hz``)."""

_MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
_SUFFIXES = {"basic": ("",), "derivatives": ("", "_derivative1"), "power2": ("", "_power2"),
             "full": ("", "_derivative1", "_power2", "_derivative1_power2")}
_CORE_MOTION = ("motion6", "motion12")
"""Sets the live core computes itself from its realignment: the only ones a causal fit can use."""
_MOTION_FAMILIES = {"motion6": ("motion",), "motion12": ("motion", "motion_derivatives"),
                    "motion24": ("motion", "motion_derivatives")}
"""``PreprocessConfig`` families of the motion sets (motion24's squares have no family: the record's
``confounds`` and ``columns`` say they were regressed)."""


def parse_confound_sets(values: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``["motion24,acompcor"]`` / ``"motion24+acompcor"`` → ``("motion24", "acompcor")``; ``none`` → ();
    None or ``auto`` → None (motion6 for fMRIPrep runs, none otherwise). Unknown names raise
    :class:`FitInputError` naming ``--confounds``."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    names = [n.strip() for v in values for n in v.replace("+", ",").split(",") if n.strip()]
    if names == ["auto"]:
        return None
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in CONFOUND_SETS]
    if bad:
        raise FitInputError(f"--confounds {','.join(bad)}: unknown confound set; choose among "
                            f"{', '.join(CONFOUND_SETS)} (combine with commas), none or auto")
    if sum(n.startswith("motion") for n in names) > 1:
        raise FitInputError(f"--confounds {','.join(names)}: give one of motion6, motion12, motion24")
    return tuple(dict.fromkeys(names))


def load_confounds_args(sets: tuple[str, ...]) -> dict:
    """The ``load_confounds`` keyword arguments of the named sets together (JSON-able, recorded in weights)."""
    args: dict = {"strategy": []}
    for name in sets:
        spec = CONFOUND_SETS[name]
        args["strategy"] += [s for s in spec["strategy"] if s not in args["strategy"]]
        args.update({k: v for k, v in spec.items() if k != "strategy"})
    args["demean"] = True
    return args


def _required_columns(tsv: Path, header: list[str], args: dict) -> list[str]:
    """Columns the sets need that ``tsv`` lacks (nilearn's suffix rules); an acompcor set without its JSON
    sidecar, or without combined-mask components in it, raises."""
    need: list[str] = []
    strategy = args["strategy"]
    if "motion" in strategy:
        need += [m + s for s in _SUFFIXES[args["motion"]] for m in _MOTION]
    for comp in ("wm_csf", "global_signal"):
        if comp in strategy:
            base = ("csf", "white_matter") if comp == "wm_csf" else ("global_signal",)
            need += [b + s for s in _SUFFIXES[args[comp]] for b in base]
    if "compcor" in strategy:
        side = tsv.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise FitInputError(f"{side}: the confounds' JSON sidecar is needed for acompcor (which a_comp_cor_* "
                                f"columns belong to the combined mask) ({_one_line(e)})") from None
        comps = [k for k, v in meta.items() if k.startswith("a_comp_cor_") and isinstance(v, dict)
                 and v.get("Mask") == "combined"]
        if not comps:
            raise FitInputError(f"{side}: no a_comp_cor_* component with Mask 'combined' (needed by acompcor)")
        need += sorted(comps)[: args.get("n_compcor", N_COMPCOR)]
    missing = [c for c in need if c not in header]
    if "high_pass" in strategy and "compcor" not in strategy and not any(c.startswith("cosine") for c in header):
        missing.append("cosineXX")
    return missing


@dataclass
class RunConfounds:
    """The confounds of one run, as regressed."""

    names: list[str]
    """Column names (nilearn's selection; without fMRIPrep's cosines unless the cosine set was asked for)."""
    values: np.ndarray
    """(T, C) float64, demeaned, the first row's n/a filled by nilearn."""
    excluded: np.ndarray
    """Indices of the volumes outside nilearn's sample mask (fMRIPrep's non-steady-state volumes)."""


def load_run_confounds(bold: str | Path, n_volumes: int, sets: tuple[str, ...], demean: bool = True) -> RunConfounds:
    """The named confound ``sets`` of a fMRIPrep run through ``nilearn.interfaces.fmriprep.load_confounds``.
    A missing table, missing columns, a row count other than the run's or non-finite values raise
    :class:`FitInputError` naming the file (and the columns)."""
    import warnings

    from nilearn.interfaces.fmriprep import load_confounds

    bold = Path(bold)
    tsv = confounds_file(bold)
    sets_txt = ",".join(sets)
    if not tsv.is_file():
        raise FitInputError(f"{tsv}: no such fMRIPrep confounds file (--confounds {sets_txt} reads it beside "
                            f"{bold.name}; --confounds none fits without)")
    try:
        with open(tsv, newline="") as f:
            header = f.readline().rstrip("\r\n").split("\t")
    except (OSError, UnicodeDecodeError) as e:
        raise FitInputError(f"{tsv}: unreadable confounds table ({_one_line(e)})") from None
    args = load_confounds_args(sets) | {"demean": demean}
    missing = _required_columns(tsv, header, args)
    if missing:
        raise FitInputError(f"{tsv}: missing column(s) {', '.join(missing)} (needed by --confounds {sets_txt})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df, sample_mask = load_confounds(str(bold), **args)
    except Exception as e:  # nilearn raises ValueError (missing columns, file not found, old format), pandas its own
        raise FitInputError(f"{tsv}: nilearn's load_confounds cannot use it ({_one_line(e)})") from None
    if "cosine" not in sets:  # acompcor pulls fMRIPrep's cosines in; the drift basis is ours (high_pass_hz)
        df = df[[c for c in df.columns if not c.startswith("cosine")]]
    values = df.to_numpy(np.float64)
    if len(values) != n_volumes:
        raise FitInputError(f"{tsv}: {len(values)} rows, but {bold} has {n_volumes} volumes (one row per volume)")
    bad = [c for c, ok in zip(df.columns, np.isfinite(values).all(0)) if not ok]
    if bad:
        raise FitInputError(f"{tsv}: non-finite values (n/a past the first row) in column(s) {', '.join(bad)}")
    kept = np.arange(n_volumes) if sample_mask is None else np.asarray(sample_mask, int)
    return RunConfounds(list(df.columns), values, np.setdiff1d(np.arange(n_volumes), kept))


# ------------------------------------------------------------------------------ cleaning before the fit


@dataclass(frozen=True)
class FitPreprocess:
    """How BOLD is cleaned before the ridge (recorded in the weights as a ``PreprocessRecord``)."""

    mode: str = "none"
    """Default ``none`` until the features are filtered like the BOLD (today only the BOLD is cleaned, which
    costs held-out r on data whose features carry slow signal: a synthetic study's mean CV r fell 0.10 →
    0.08). ``none``: per-run z-score only (the fit's own, as before); ``offline``: whole-run regression of the
    constant, the cosine drift (``high_pass_hz``) and the confounds, then z-score (``nilearn.signal.clean``;
    equal to the core's ``clean_series(causal=False)`` on the same regressors); ``causal``: the live core's
    causal GLM and running standardisation (``clean_series(causal=True)``), the warm-up volumes set to 0.
    Raw (not fMRIPrep) runs are first realigned and resliced on their 4-D volumes, as live
    (:func:`encoders.preprocess.preprocess_for_fit`; causal = exactly the live core's values)."""
    confounds: tuple[str, ...] | None = None
    """Named sets of fMRIPrep confounds (:data:`CONFOUND_SETS`); () = none; None = auto: motion6 for fMRIPrep
    ``*_desc-preproc_bold`` runs, none otherwise. Raw runs take only ``motion6`` / ``motion12``: the
    realignment's own parameters (opt-in: fitted causally they removed planted signal, see
    ``encoders.preprocess.PreprocessConfig.confounds``)."""
    high_pass_hz: float = 1 / 128
    """Cut-off of the cosine drift basis, Hz (SPM's and fMRIPrep's 128 s); 0 = no drift regressors."""

    def __post_init__(self):
        from encoders.weights import PREPROCESS_MODES

        if self.mode not in PREPROCESS_MODES:
            raise FitInputError(f"--preprocess {self.mode}: choose one of {', '.join(PREPROCESS_MODES)}")
        if not (np.isfinite(self.high_pass_hz) and self.high_pass_hz >= 0):
            raise FitInputError(f"--high-pass {self.high_pass_hz}: must be ≥ 0 Hz")
        if self.confounds is not None:
            parse_confound_sets(list(self.confounds) or "none")  # names them if unknown or two motion sets


@dataclass
class CleanedBold:
    """The fit's BOLD after :func:`preprocess_bold`."""

    runs: list[np.ndarray]
    """Per run (T_i, V) float32 in ``bold.mask`` (mode ``none``: the loaded runs themselves)."""
    record: PreprocessRecord
    """``encoders.weights.PreprocessRecord`` of the cleaning, for the weights."""
    reference: np.ndarray | None
    """(X, Y, Z) float32 the weights' reference volume: with raw runs realigned, the volume they were
    registered to (:func:`encoders.preprocess.preprocess_for_fit`); else the runs' mean EPI."""


def clean_bold(bold: BoldRuns, cfg: FitPreprocess) -> tuple[list[np.ndarray], PreprocessRecord]:
    """The runs of ``bold`` cleaned as ``cfg`` says, and the ``encoders.weights.PreprocessRecord`` of it:
    ``(runs, record)`` (:func:`preprocess_bold` without the reference)."""
    cleaned = preprocess_bold(bold, cfg)
    return cleaned.runs, cleaned.record


def preprocess_bold(bold: BoldRuns, cfg: FitPreprocess, reference: np.ndarray | None = None) -> CleanedBold:
    """The runs of ``bold`` cleaned as ``cfg`` says. fMRIPrep runs (already realigned) are cleaned on their
    masked series with their confounds table. Raw runs (mode ``offline`` or ``causal``) take the live path's
    one definition, :func:`encoders.preprocess.preprocess_for_fit`: realignment + reslice of the 4-D
    volumes, every run registered to the first run's reference (kept as the weights' reference, so a live
    session is registered to it the same way), then the causal GLM (exactly what the live core computes) or
    the whole-run one; excluded volumes set to 0. Their motion regressors are opt-in (``--confounds motion6``
    or ``motion12``: the core's own estimates), as the core's default. ``reference`` (X, Y, Z): raw runs are
    registered to it instead of the first run's volume (e.g. a held-out run for weights that keep it)."""
    from encoders.preprocess import PreprocessConfig, clean_series
    from encoders.weights import PreprocessRecord

    fmriprep = all(is_fmriprep_bold(p) for p in bold.paths)
    source = "fmriprep" if fmriprep else "bold"
    if cfg.mode == "none":
        return CleanedBold(bold.runs, PreprocessRecord(mode="none", source=source), bold.mean_epi)
    sets = cfg.confounds if cfg.confounds is not None else (("motion6",) if fmriprep else ())
    if sets and not fmriprep and set(sets) - set(_CORE_MOTION):
        raise FitInputError(f"--confounds {','.join(sets)}: needs fMRIPrep runs (*_desc-preproc_bold.nii.gz with "
                            f"their _desc-confounds_timeseries.tsv), not {bold.paths[0].name}; raw runs take motion6 "
                            "or motion12 (the realignment's own parameters) or none")
    if cfg.mode == "causal" and set(sets) - set(_CORE_MOTION):
        raise FitInputError(f"--preprocess causal --confounds {','.join(sets)}: a causal fit regresses what the live "
                            "core computes itself, motion6 or motion12 (or none); use --preprocess offline")
    families = ["constant"] + (["drift"] if cfg.high_pass_hz > 0 else [])
    families += [f for name in sets for f in _MOTION_FAMILIES.get(name, ())]
    config = PreprocessConfig(motion_correction=True, high_pass_hz=cfg.high_pass_hz, confounds=tuple(families),
                              standardize=True)
    causal = cfg.mode == "causal"
    if not fmriprep:
        return _preprocess_raw(bold, config, causal, sets, reference)
    read = ("motion6",) if causal and sets else sets  # causal: the parameters; the core differentiates them
    record = PreprocessRecord(mode=cfg.mode, config=config.to_dict(), confounds=list(sets), source=source,
                              load_confounds=load_confounds_args(read) | {"demean": not causal} if read else {})
    runs = []
    for path, y in zip(bold.paths, bold.runs):
        n = len(y)
        conf = None
        if sets:
            conf = load_run_confounds(path, n, read, demean=not causal)
            record.columns.append(conf.names)
            record.excluded.append(conf.excluded.tolist())
        if cfg.mode == "offline":
            runs.append(_clean_offline(path, y, conf, cfg.high_pass_hz, bold.tr))
            continue
        include = np.ones(n, bool)
        motion = None
        if conf is not None:
            include[conf.excluded] = False
            motion = conf.values[:, [conf.names.index(m) for m in _MOTION]]
        try:
            cleaned = clean_series(y, np.arange(n) * bold.tr, motion, include, config, causal=True)
        except FitInputError as e:
            raise FitInputError(f"{path}: {e}") from None
        early = np.arange(n) < config.warmup_trs
        zero = early | ~cleaned.determined | (cleaned.n_std < 2) | ~include
        out = cleaned.data.astype(np.float32)
        out[zero] = 0
        runs.append(out)
        record.zeroed.append(np.flatnonzero(zero).tolist())
    return CleanedBold(runs, record, bold.mean_epi)


def _preprocess_raw(bold: BoldRuns, config: PreprocessConfig, causal: bool, sets: tuple[str, ...],
                    reference: np.ndarray | None) -> CleanedBold:
    """Raw runs through :func:`encoders.preprocess.preprocess_for_fit` on ``bold.mask``, recorded."""
    from encoders.preprocess import preprocess_for_fit
    from encoders.weights import PreprocessRecord

    fit = preprocess_for_fit(bold.paths, config, bold.mask, causal=causal, tr=bold.tr, align=True,
                             reference=reference)
    record = PreprocessRecord(mode="causal" if causal else "offline", config=config.to_dict(), confounds=list(sets),
                              source="bold", zeroed=fit.zeroed)
    return CleanedBold(fit.runs, record, fit.reference)


def _clean_offline(path: Path, y: np.ndarray, conf: RunConfounds | None, high_pass_hz: float, tr: float
                   ) -> np.ndarray:
    """Whole-run regression of the constant, the cosine drift (the core's ``cosine_drift``: nilearn's DCT at
    ``high_pass_hz``) and the confounds (plus one indicator column per excluded volume, which keeps it out of
    the fit and zeroes its residual), then z-score: ``nilearn.signal.clean``, (T, V) float32. The drift goes in
    as confounds, not ``filter="cosine"``: that filter drops its cosines whenever a confound correlates > 0.9
    with one (a slow motion parameter often does)."""
    import warnings

    from nilearn.signal import clean

    from encoders.preprocess import cosine_drift

    n = len(y)
    blocks = [cosine_drift(np.arange(n) * tr, high_pass_hz)]
    if conf is not None:
        onehot = np.zeros((n, len(conf.excluded)))
        onehot[conf.excluded, np.arange(len(conf.excluded))] = 1
        blocks += [conf.values, onehot]
    regressors = np.hstack(blocks) if blocks else np.zeros((n, 0))
    if regressors.shape[1] + 2 > n:  # + the constant, and one degree of freedom left for the z-score
        raise FitInputError(f"{path}: {n} volumes cannot take {regressors.shape[1]} confound regressors + a constant "
                            "(fewer --confounds, or a lower --high-pass)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = clean(np.asarray(y, np.float64), detrend=False, standardize="zscore_sample",
                    confounds=regressors if regressors.shape[1] else None, standardize_confounds=True,
                    filter=False, t_r=tr)
    return out.astype(np.float32)
