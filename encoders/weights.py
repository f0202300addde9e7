"""Portable encoding-model weights: one ``.safetensors`` file, arrays + JSON metadata, no pickle.

Everything needed to turn raw per-TR feature rows into predicted BOLD lives in the file:

* per feature space: its provenance (model, layer, prompt condition, pooling, raw dim), the
  z-scoring means/stds, and the optional PCA basis;
* the FIR delays (in TRs), the float32 primal coefficients and the per-voxel ridge alphas;
* the voxel mask, affine and grid shape of the BOLD used for the fit, the ROI label of every
  masked voxel plus the atlas' label names, and the cross-validated r / R² per voxel;
* how that BOLD was preprocessed before the fit (:class:`PreprocessRecord`: the mode, the
  :class:`encoders.preprocess.PreprocessConfig` as a flat dict, the confound sets and the columns
  regressed) and, optionally, the mean EPI of the fit's runs on the fit grid (``reference``), so
  that live BOLD can be preprocessed the same way and aligned to the weights' space.

Column order of ``coef`` rows: feature space by feature space; inside a space, delay by delay
(delay-major, like himalaya's ``Delayer``); inside a delay, the transformed feature dims.

The arrays go in the safetensors tensors; the metadata is one JSON string stored under the
``neuroarcade`` key of the safetensors header metadata (readable with any safetensors loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from encoders.preprocess import PreprocessConfig

FORMAT = "neuroarcade-encoding-weights"
FORMAT_VERSION = 1
PREPROCESS_MODES = ("none", "offline", "causal")
"""How the fit's BOLD was cleaned: ``none`` per-run z-score only (what weights without a record mean),
``offline`` whole-run confound regression (cosine drift + confounds) + z-score, ``causal`` the live core's
causal GLM (each volume on the volumes up to it) + running standardisation."""


class WeightsError(ValueError):
    """A weights file that cannot be read, or incoming features it was not fitted for."""


@dataclass
class FeatureSpace:
    """One block of input features (one model layer under one prompt condition)."""

    name: str
    """Short name of the space, e.g. ``"action"``; also the banded-ridge group name."""
    dim: int
    """Raw feature dimension the space expects (before PCA)."""
    model: str = ""
    """Model that produced the features (Activation.model); '' = not checked."""
    layer: int | None = None
    """Layer index taken from Activation.layers; None = not checked / single-layer vectors."""
    condition: str = ""
    """Prompt condition (Activation.condition); '' = not checked."""
    pooling: str = ""
    """Pooling of the hidden states (Activation.pooling); '' = not checked."""
    mean: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    """(dim,) feature means used to z-score at application time (mean of the per-run means)."""
    std: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    """(dim,) feature stds used at application time (RMS of the per-run stds; 1 where constant)."""
    pca_components: np.ndarray | None = field(default=None, repr=False)
    """(K, dim) PCA basis applied after z-scoring, or None."""
    pca_mean: np.ndarray | None = field(default=None, repr=False)
    """(dim,) mean removed before projecting on the PCA basis."""

    @property
    def out_dim(self) -> int:
        return self.dim if self.pca_components is None else int(self.pca_components.shape[0])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Raw rows (n, dim) → z-scored (and PCA-reduced) float32 rows (n, out_dim)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise WeightsError(
                f"feature space {self.name!r} expects rows of dim {self.dim}, got array of shape {X.shape}"
            )
        Z = (X - self.mean) / self.std
        if self.pca_components is not None:
            Z = (Z - self.pca_mean) @ self.pca_components.T
        return np.ascontiguousarray(Z, dtype=np.float32)

    def check_provenance(self, *, model: str, layer_list: list[int], condition: str, pooling: str) -> int | None:
        """Check an Activation's provenance; return the row of ``vectors`` to use (None = the only row).

        Raises WeightsError with a message naming what differs.
        """
        problems = []
        if self.model and model != self.model:
            problems.append(f"model {model!r} (weights: {self.model!r})")
        if self.condition and condition != self.condition:
            problems.append(f"condition {condition!r} (weights: {self.condition!r})")
        if self.pooling and pooling != self.pooling:
            problems.append(f"pooling {pooling!r} (weights: {self.pooling!r})")
        row = None
        if self.layer is not None:
            if self.layer not in layer_list:
                problems.append(f"layers {layer_list} lack layer {self.layer}")
            else:
                row = layer_list.index(self.layer)
        if problems:
            raise WeightsError(f"features do not match weights space {self.name!r}: " + "; ".join(problems))
        return row


@dataclass
class PreprocessRecord:
    """How the BOLD the weights were fitted on was preprocessed (metadata key ``preprocess``). A file
    written before this record existed loads as ``PreprocessRecord()``: mode ``none``."""

    mode: str = "none"
    """One of :data:`PREPROCESS_MODES`."""
    config: dict | None = None
    """``encoders.preprocess.PreprocessConfig.to_dict()`` of the cleaning (None with mode ``none``): the
    core's families (constant, drift at ``high_pass_hz``, motion, motion_derivatives) as applied."""
    confounds: list[str] = field(default_factory=list)
    """Named confound sets read from fMRIPrep confounds files (e.g. ``motion24``, ``acompcor``); [] = none."""
    load_confounds: dict = field(default_factory=dict)
    """Arguments given to ``nilearn.interfaces.fmriprep.load_confounds`` for ``confounds`` ({} = not used)."""
    columns: list[list[str]] = field(default_factory=list)
    """Per run, the confound columns regressed out besides the core's own drift basis."""
    source: str = ""
    """What the BOLD was: ``fmriprep`` (``*_desc-preproc_bold``, realigned by fMRIPrep) or ``bold`` (as given)."""
    excluded: list[list[int]] = field(default_factory=list)
    """Per run, the indices of the volumes kept out of the confound fit (fMRIPrep's non-steady-state ones)."""
    zeroed: list[list[int]] = field(default_factory=list)
    """Per run, the indices of the volumes set to 0 before the ridge (mode ``causal``: warm-up and excluded
    volumes, whose cleaned values do not exist yet live)."""

    def __post_init__(self):
        if self.mode not in PREPROCESS_MODES:
            raise WeightsError(f"preprocess mode must be one of {', '.join(PREPROCESS_MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "config": self.config, "confounds": list(self.confounds),
                "load_confounds": dict(self.load_confounds), "columns": [list(c) for c in self.columns],
                "source": self.source, "excluded": [list(map(int, e)) for e in self.excluded],
                "zeroed": [list(map(int, z)) for z in self.zeroed]}

    @classmethod
    def from_dict(cls, values: dict | None) -> "PreprocessRecord":
        """The inverse of :meth:`to_dict`; None or {} = mode ``none``; unknown keys are ignored (newer files)."""
        values = values or {}
        known = {k: values[k] for k in ("mode", "config", "confounds", "load_confounds", "columns", "source",
                                        "excluded", "zeroed") if k in values}
        return cls(**known)


@dataclass
class EncodingWeights:
    """A fitted voxelwise encoding model, ready to apply offline or per TR."""

    spaces: list[FeatureSpace]
    delays: list[int]
    """FIR delays in TRs (row t uses transformed features of TRs t-d)."""
    coef: np.ndarray = field(repr=False)
    """(n_delays × Σ out_dim, n_voxels) float32 primal coefficients."""
    alphas: np.ndarray = field(repr=False)
    """(n_voxels,) ridge penalty chosen per voxel."""
    mask: np.ndarray = field(repr=False)
    """Boolean 3D mask of the fit grid; masked voxels in C order are the coef columns."""
    affine: np.ndarray = field(repr=False)
    """4×4 voxel→world affine of the fit grid."""
    tr: float = 2.0
    """Repetition time, seconds."""
    roi_labels: np.ndarray | None = field(default=None, repr=False)
    """(n_voxels,) int ROI label per masked voxel (0 = none)."""
    roi_names: dict[int, str] = field(default_factory=dict)
    """ROI label → name, from the atlas labels table."""
    atlas: str = ""
    """Atlas file name (provenance)."""
    cv_r: np.ndarray | None = field(default=None, repr=False)
    """(n_voxels,) leave-one-run-out CV Pearson r, when scored."""
    cv_r2: np.ndarray | None = field(default=None, repr=False)
    """(n_voxels,) leave-one-run-out CV R², when scored."""
    provenance: dict = field(default_factory=dict)
    """Free-form fit provenance (inputs, options, versions, date)."""
    preprocessing: PreprocessRecord = field(default_factory=PreprocessRecord)
    """How the fit's BOLD was preprocessed (mode ``none`` for files written without the record)."""
    reference: np.ndarray | None = field(default=None, repr=False)
    """(X, Y, Z) float32 mean EPI of the fit's runs (before cleaning) on the fit grid (``affine``), or None."""

    # --- preprocessing ---------------------------------------------------------------------
    @property
    def preprocess_mode(self) -> str:
        """``none``, ``offline`` or ``causal`` (:data:`PREPROCESS_MODES`)."""
        return self.preprocessing.mode

    @property
    def preprocess(self) -> PreprocessConfig | None:
        """The :class:`encoders.preprocess.PreprocessConfig` the fit's BOLD was cleaned with (None = mode
        ``none``): what the live path applies to measured volumes before scoring them against predictions."""
        if self.preprocessing.config is None:
            return None
        from encoders.preprocess import PreprocessConfig, PreprocessError

        try:
            return PreprocessConfig.from_dict(self.preprocessing.config)
        except PreprocessError as e:
            raise WeightsError(f"the weights' preprocess config is not usable here: {e}") from None

    # --- shape helpers ---------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return int(self.coef.shape[1])

    @property
    def n_features_in(self) -> int:
        return sum(s.out_dim for s in self.spaces) * len(self.delays)

    def validate(self) -> None:
        if self.coef.ndim != 2 or self.coef.shape[0] != self.n_features_in:
            raise WeightsError(f"coef shape {self.coef.shape} does not fit {self.n_features_in} delayed features")
        if int(self.mask.sum()) != self.n_voxels:
            raise WeightsError(f"mask holds {int(self.mask.sum())} voxels, coef has {self.n_voxels} columns")
        if any(d < 0 for d in self.delays):
            raise WeightsError(f"delays must be ≥ 0, got {self.delays}")
        if self.reference is not None and np.shape(self.reference) != self.mask.shape:
            raise WeightsError(f"reference volume {np.shape(self.reference)} is not on the mask's grid "
                               f"{self.mask.shape}")

    # --- offline application ---------------------------------------------------------------
    def check_features(self, features: list[np.ndarray]) -> None:
        """Raise WeightsError unless ``features`` has one (n, dim) array per space, same n."""
        if len(features) != len(self.spaces):
            names = [s.name for s in self.spaces]
            raise WeightsError(f"weights expect {len(self.spaces)} feature arrays ({names}), got {len(features)}")
        lengths = set()
        for space, X in zip(self.spaces, features):
            X = np.asarray(X)
            if X.ndim != 2 or X.shape[1] != space.dim:
                raise WeightsError(
                    f"feature space {space.name!r} was fitted on dim {space.dim} "
                    f"(model {space.model or '?'}, layer {space.layer}, condition {space.condition or '?'}); "
                    f"got array of shape {X.shape}"
                )
            lengths.add(X.shape[0])
        if len(lengths) > 1:
            raise WeightsError(f"feature arrays have different numbers of rows: {sorted(lengths)}")

    def design(self, features: list[np.ndarray]) -> np.ndarray:
        """Transformed, delayed design matrix of one run (delays zero-filled at the run start)."""
        self.check_features(features)
        blocks = [delay_run(space.transform(X), self.delays) for space, X in zip(self.spaces, features)]
        return np.concatenate(blocks, axis=1)

    def predict(self, features: list[np.ndarray]) -> np.ndarray:
        """Predicted BOLD (n_trs, n_voxels) float32 in z-units for one run of raw feature rows."""
        return self.design(features) @ self.coef

    def to_volume(self, values: np.ndarray) -> np.ndarray:
        """(…, n_voxels) masked values → (X, Y, Z, …) grid with zeros outside the mask."""
        values = np.asarray(values)
        out = np.zeros(self.mask.shape + values.shape[:-1], dtype=np.float32)
        out[self.mask] = np.moveaxis(values, -1, 0)
        return out

    # --- file I/O --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        self.validate()
        path = Path(path)
        tensors: dict[str, np.ndarray] = {
            "coef": np.ascontiguousarray(self.coef, dtype=np.float32),
            "alphas": np.asarray(self.alphas, dtype=np.float32),
            "mask": self.mask.astype(np.uint8),
            "affine": np.asarray(self.affine, dtype=np.float64),
        }
        for name, arr in (("roi_labels", self.roi_labels), ("cv_r", self.cv_r), ("cv_r2", self.cv_r2),
                          ("reference", self.reference)):
            if arr is not None:
                tensors[name] = np.asarray(arr, dtype=np.int32 if name == "roi_labels" else np.float32)
        for i, s in enumerate(self.spaces):
            tensors[f"space{i}.mean"] = np.asarray(s.mean, dtype=np.float32)
            tensors[f"space{i}.std"] = np.asarray(s.std, dtype=np.float32)
            if s.pca_components is not None:
                tensors[f"space{i}.pca_components"] = np.asarray(s.pca_components, dtype=np.float32)
                tensors[f"space{i}.pca_mean"] = np.asarray(s.pca_mean, dtype=np.float32)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spaces": [{"name": s.name, "dim": s.dim, "model": s.model, "layer": s.layer, "condition": s.condition,
                        "pooling": s.pooling} for s in self.spaces],
            "delays": [int(d) for d in self.delays],
            "tr": float(self.tr),
            "roi_names": {str(k): v for k, v in self.roi_names.items()},
            "atlas": self.atlas,
            "provenance": self.provenance,
            "preprocess": self.preprocessing.to_dict(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # safetensors writes the raw buffer: a Fortran-ordered array (nibabel's default) would come back transposed
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"neuroarcade": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EncodingWeights":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"{path} is not a safetensors weights file: {e}") from None
        try:
            meta = json.loads(header["neuroarcade"])
        except (KeyError, json.JSONDecodeError):
            raise WeightsError(f"{path} lacks neuroarcade metadata (not written by `neuroarcade fit`?)") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"{path}: format {meta.get('format')} v{meta.get('format_version')}, "
                               f"expected {FORMAT} v{FORMAT_VERSION}")
        spaces = []
        for i, m in enumerate(meta["spaces"]):
            spaces.append(FeatureSpace(
                **m, mean=tensors[f"space{i}.mean"], std=tensors[f"space{i}.std"],
                pca_components=tensors.get(f"space{i}.pca_components"), pca_mean=tensors.get(f"space{i}.pca_mean"),
            ))
        w = cls(
            spaces=spaces, delays=meta["delays"], coef=tensors["coef"], alphas=tensors["alphas"],
            mask=tensors["mask"].astype(bool), affine=tensors["affine"], tr=meta["tr"],
            roi_labels=tensors.get("roi_labels"), roi_names={int(k): v for k, v in meta["roi_names"].items()},
            atlas=meta.get("atlas", ""), cv_r=tensors.get("cv_r"), cv_r2=tensors.get("cv_r2"),
            provenance=meta.get("provenance", {}), reference=tensors.get("reference"),
        )
        try:
            w.preprocessing = PreprocessRecord.from_dict(meta.get("preprocess"))
        except (TypeError, WeightsError) as e:
            raise WeightsError(f"{path}: unreadable preprocess record ({e})") from None
        w.validate()
        return w


def delay_run(X: np.ndarray, delays: list[int]) -> np.ndarray:
    """FIR design of ONE run: column block k holds X shifted down by delays[k] rows, zero-filled.

    Delaying run by run keeps the first rows of a run from seeing the previous run's features.
    """
    n, d = X.shape
    out = np.zeros((n, d * len(delays)), dtype=X.dtype)
    for k, lag in enumerate(delays):
        if lag < n:
            out[lag:, k * d:(k + 1) * d] = X[: n - lag]
    return out


def roi_table(weights: EncodingWeights) -> list[tuple[str, np.ndarray]]:
    """(name, voxel indices) for every ROI present in the mask, in label order; 'all' first."""
    out = [("all", np.arange(weights.n_voxels))]
    if weights.roi_labels is not None:
        for label in sorted(int(v) for v in np.unique(weights.roi_labels) if v != 0):
            name = weights.roi_names.get(label, f"roi{label}")
            out.append((name, np.flatnonzero(weights.roi_labels == label)))
    return out
