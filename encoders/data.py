"""Reading the inputs of a fit: BOLD runs (NIfTI / BIDS), masks, atlases, feature matrices."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
                tr = json.loads(sidecar.read_text()).get("RepetitionTime")
                if tr:
                    return float(tr)
    zooms = img.header.get_zooms()
    return float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else None


def load_bold(paths: list[str | Path], mask_path: str | Path | None = None, tr: float | None = None) -> BoldRuns:
    """Load 4D runs, check they share a grid, apply a mask (default: voxels varying in every run)."""
    import nibabel as nib

    paths = [Path(p) for p in paths]
    imgs = [nib.load(str(p)) for p in paths]
    for p, img in zip(paths, imgs):
        if len(img.shape) != 4:
            raise ValueError(f"{p} is not a 4D BOLD run (shape {img.shape})")
        if img.shape[:3] != imgs[0].shape[:3] or not np.allclose(img.affine, imgs[0].affine, atol=1e-3):
            raise ValueError(f"{p} is on another grid than {paths[0]} ({img.shape[:3]} vs {imgs[0].shape[:3]})")
    datas = [np.asarray(img.dataobj, dtype=np.float32) for img in imgs]
    if mask_path is not None:
        mimg = nib.load(str(mask_path))
        if mimg.shape[:3] != imgs[0].shape[:3]:
            raise ValueError(f"mask {mask_path} has grid {mimg.shape[:3]}, BOLD has {imgs[0].shape[:3]}")
        mask = np.asarray(mimg.dataobj) > 0
    else:
        mask = np.ones(imgs[0].shape[:3], dtype=bool)
        for d in datas:
            mask &= d.std(axis=3) > 0
    mask &= np.all([np.isfinite(d).all(axis=3) for d in datas], axis=0)
    if not mask.any():
        raise ValueError("the mask selects no voxel")
    trs = {repetition_time(p, img) for p, img in zip(paths, imgs)} - {None}
    if tr is None:
        if len(trs) != 1:
            raise ValueError(f"cannot tell the TR (found {sorted(trs) or 'none'}); pass --tr")
        tr = trs.pop()
    runs = [d[mask].T.copy() for d in datas]
    return BoldRuns(runs, mask, imgs[0].affine, float(tr), paths)


def load_atlas(atlas_path: str | Path, labels_path: str | Path | None, mask: np.ndarray, affine: np.ndarray
               ) -> tuple[np.ndarray, dict[int, str]]:
    """ROI label per masked voxel and label names; the atlas is resampled (nearest) to the BOLD grid if needed."""
    import nibabel as nib

    img = nib.load(str(atlas_path))
    if img.shape[:3] != mask.shape or not np.allclose(img.affine, affine, atol=1e-3):
        import warnings

        from nilearn.image import resample_img

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = resample_img(img, target_affine=affine, target_shape=mask.shape, interpolation="nearest",
                               force_resample=True, copy_header=True)
    labels = np.asarray(img.dataobj).astype(np.int32)[mask]
    names: dict[int, str] = {}
    if labels_path is not None:
        with open(labels_path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            raise ValueError(f"{labels_path}: empty labels table")
        keys = {k.lower(): k for k in rows[0]}
        idx_key = next((keys[k] for k in ("index", "label", "value", "id") if k in keys), None)
        name_key = next((keys[k] for k in ("name", "roi", "label_name", "region") if k in keys), None)
        if idx_key is None or name_key is None:
            raise ValueError(f"{labels_path}: need columns 'index' and 'name', found {list(rows[0])}")
        names = {int(r[idx_key]): r[name_key] for r in rows}
    return labels, names


def load_features(path: str | Path) -> tuple[np.ndarray, dict]:
    """A (T, dim) feature matrix (.npy, no pickle) and its JSON sidecar's provenance, if any."""
    path = Path(path)
    X = np.load(path, allow_pickle=False)
    if X.ndim != 2:
        raise ValueError(f"{path}: features must be (n_trs, dim), got shape {X.shape}")
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return X.astype(np.float32), meta


def bids_runs(root: str | Path, subject: str | None = None, task: str | None = None
              ) -> tuple[list[Path], dict[str, list[Path]]]:
    """BOLD runs of a BIDS dataset and their feature files in ``derivatives/features`` (by space)."""
    root = Path(root)
    pattern = f"*task-{task or '*'}_*bold.nii*"
    # sub-X/func/ or sub-X/ses-Y/func/
    bold = sorted(p for p in root.glob(f"sub-{subject or '*'}/**/func/{pattern}") if "derivatives" not in p.parts)
    if not bold:
        raise ValueError(f"no BOLD runs under {root} (pattern {pattern})")
    spaces: dict[str, list[Path]] = {}
    for b in bold:
        stem = b.name.split("_bold")[0]
        rel = b.parent.relative_to(root)
        for f in sorted((root / "derivatives" / "features" / rel).glob(f"{stem}_desc-*_features.npy")):
            space = f.name.split("_desc-")[1].split("_features")[0]
            spaces.setdefault(space, []).append(f)
    for space, files in spaces.items():
        if len(files) != len(bold):
            raise ValueError(f"feature space {space!r}: {len(files)} files for {len(bold)} BOLD runs")
    return bold, spaces
