"""Reading the inputs of a fit: BOLD runs (NIfTI / BIDS), masks, atlases, feature matrices."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def load_bold(paths: list[str | Path], mask_path: str | Path | None = None, tr: float | None = None) -> BoldRuns:
    """Load 4D runs, check they share a grid, apply a mask (default: voxels varying in every run).

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
    return BoldRuns(runs, mask, imgs[0].affine, float(tr), paths)


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
    spaces: dict[str, list[Path]] = {}
    for b in bold:
        stem = b.name.split("_bold")[0]
        rel = b.parent.relative_to(root)
        for f in sorted((root / "derivatives" / "features" / rel).glob(f"{stem}_desc-*_features.npy")):
            space = f.name.split("_desc-")[1].split("_features")[0]
            spaces.setdefault(space, []).append(f)
    for space, files in spaces.items():
        if len(files) != len(bold):
            raise FitInputError(f"{root / 'derivatives' / 'features'}: feature space {space!r} has {len(files)} "
                                f"files for {len(bold)} BOLD runs")
    return bold, spaces
