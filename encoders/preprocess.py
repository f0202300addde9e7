"""Real-BOLD preprocessing (issue #13), the same computation offline and live.

Per volume, in order: dummy scans dropped → rigid realignment to the reference (:mod:`encoders.motion`)
→ reslice onto the reference grid → optional Gaussian smoothing → the voxels in the mask → framewise
displacement (Power 2012) and DVARS → censoring (FD, DVARS spike, failed registration) → confound
regression (constant, cosine drift; motion parameters and their derivatives opt-in) → standardisation.
:func:`preprocess_for_fit` is the one fit-time path for raw runs (what ``fit --preprocess`` and the
synthetic sessions fit on).

Live, nothing after TR t exists at TR t, so the GLM is *causal*: at TR t it is fitted on volumes 0..t
(the cosine drift basis evaluated on the times so far) and the residual of volume t is kept
(:class:`OnlineGLM`); standardisation uses the running mean and SD of the residuals so far. A volume is
scored once the GLM has more included volumes than regressors and the warm-up is over. Offline,
:func:`preprocess_run` does the same causal computation on a whole run (``causal=True``), or the usual
whole-run regression (``causal=False``, nilearn's design matrix) for fits.

:class:`Preprocessor` is the streaming core (no sockets, no files): ``push(volume, t_s)`` per volume.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from encoders.data import FitInputError
from encoders.motion import PARAM_NAMES, RealignReference, framewise_displacement, prepare_reference, realign, reslice
from encoders.register import SessionAlignment, TargetSpace, register_to_target, reslice_to

FAMILIES = ("constant", "drift", "motion", "motion_derivatives")
"""Confound families the GLM can remove."""
REFERENCES = ("first", "given")
DRIFT_MODELS = ("cosine",)
_MIN_DVARS_HISTORY = 3  # DVARS values needed before a spike can be told from the run's usual DVARS


class PreprocessError(FitInputError):
    """A preprocessing setting or input that cannot be used (a ``FitInputError``, so commands print it as
    one ``error:`` line and exit 2; a ``ValueError`` for everyone else)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a run is preprocessed; flat and JSON-able (:meth:`to_dict`, :meth:`from_dict`) so a weights
    file can record it. Invalid values raise :class:`PreprocessError` naming the setting."""

    motion_correction: bool = True
    """Realign every volume to the reference (rigid, 6 parameters) and reslice it onto the reference grid."""
    reference: str = "first"
    """"first": the first volume after the dummy scans; "given": a volume passed with the run (same grid)."""
    dummy_scans: int = 0
    """Volumes at the start of the run dropped before anything else (magnetisation not yet steady)."""
    high_pass_hz: float = 1 / 128
    """Cut-off of the drift basis, Hz: cosines up to this frequency (periods ≥ 1/cut-off: SPM's and
    fMRIPrep's 128 s); 0 only without the "drift" family."""
    drift_model: str = "cosine"
    """Family of the drift basis: "cosine" (DCT-II, nilearn's ``create_cosine_drift``)."""
    confounds: tuple[str, ...] = ("constant", "drift")
    """Regressor families the GLM removes: constant, drift, motion (6 parameters), motion_derivatives
    (their backward differences, 0 at the first volume). Default without the motion families: fitted
    causally they remove planted signal. Measured on tests/test_motion_known_answer.py's session (live ROI r
    of five ROIs planted at decreasing strength, 100-TR runs): constant + drift 0.67/0.49/0.46/0.27/0.18
    (Spearman 1.0; the still session 0.66/0.45/0.46/0.27/0.20); + motion 0.13/0.45/0.10/0.13/0.21 (Spearman
    −0.2; still head 0.17/0.03/0.24/0.22/0.13); + motion staged from volume 40 0.22/0.38/0.27/0.16/0.06; from
    volume 70 0.64/0.55/0.32/0.14/0.17 — i.e. only by being absent most of the run. Causes: six smooth
    regressors on few volumes act as a high-pass at the newest one, and realignment estimates follow
    coherent signal (the still head loses as much as the moved one). Realignment alone brings the moved
    session to the still one. Opt in ("motion") where the motion is large and the signal not coherent
    across the head; fMRIPrep fits (``fit --confounds motion6``, their default) regress fMRIPrep's own."""
    motion_min_volumes: int = 0
    """Staging (causal GLM): the motion families enter only once the run has this many processed volumes
    (OpenNFT adds regressors in stages); the whole-run GLM has them when the run is this long. 0 = from the
    start. Measured (see ``confounds``): staging from volume 40 did not keep the planted signal, from 70 only
    because the regressors were then absent for most of a 100-volume run; hence no staged default."""
    smoothing_fwhm_mm: float = 0.0
    """Gaussian smoothing of each realigned volume, FWHM in mm; 0 = off."""
    standardize: bool = True
    """Divide each voxel's residual by its SD (running SD live and causal; whole run otherwise) after
    subtracting its mean."""
    warmup_trs: int = 15
    """Volumes after the dummies that are never scored (causal only): they prime the GLM and the running
    standardisation. Scoring also waits until the GLM has more included volumes than regressors."""
    fd_threshold_mm: float = 0.5
    """Censor a volume whose framewise displacement exceeds this, mm (Power 2012); 0 = never. Measured on
    the 64×64×36 phantom, still head: realignment noise FD max 0.14 mm (tSNR 100), 0.06 mm (tSNR 250);
    with 1 % signal coherent over the whole head 0.43 mm: no false flag."""
    dvars_threshold: float = 1.5
    """Censor a volume whose DVARS exceeds this multiple of the median DVARS of the included volumes
    before it (fMRIPrep's std_dvars outlier level); 0 = never. Measured on the 64×64×36 phantom, 100
    volumes: thermal noise alone max 1.01 (no flag); 0.3 % head-wide coherent signal max 1.35; 1 % head-wide
    coherent signal flags 1/99 at tSNR 100, 12/99 at tSNR 250 (an unrealistically global signal)."""
    reslice_order: int = 1
    """Spline order of the reslice: 1 = trilinear (mcflirt's default; 7× cheaper than cubic on a
    64×64×36 volume), 3 = cubic."""
    realign_samples: int = 8000
    """Sample points of the registration cost (a regular sub-grid of the dilated head mask)."""
    realign_max_iter: int = 10
    """Gauss–Newton iterations before a registration is flagged as not converged."""
    realign_tol_mm: float = 0.01
    """Convergence: the last step (translation + rotation arc on 50 mm) below this, mm (from a warm
    start that is usually the second step)."""
    min_match_r: float = 0.7
    """A registration whose realigned volume correlates less than this with the reference has failed."""

    def __post_init__(self):
        conf = self.confounds
        if isinstance(conf, str):
            conf = tuple(c for c in (s.strip() for s in conf.split(",")) if c)
        elif isinstance(conf, (list, tuple)):
            conf = tuple(conf)
        else:
            raise PreprocessError(f"preprocess setting confounds must be a list of families, got {conf!r}")
        object.__setattr__(self, "confounds", conf)
        _validate(self)

    def to_dict(self) -> dict[str, bool | int | float | str]:
        """Flat: every value a JSON scalar (``confounds`` comma-joined)."""
        out = dataclasses.asdict(self)
        out["confounds"] = ",".join(self.confounds)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessConfig:
        """The inverse of :meth:`to_dict` (``confounds`` may also be a list); unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PreprocessError(f"unknown preprocess setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreprocessError(f"preprocess config is not JSON ({e})") from None
        if not isinstance(values, dict):
            raise PreprocessError("preprocess config JSON must be an object")
        return cls.from_dict(values)


def _validate(cfg: PreprocessConfig) -> None:
    def bad(name: str, want: str) -> PreprocessError:
        return PreprocessError(f"preprocess setting {name} must be {want}, got {getattr(cfg, name)!r}")

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type == "bool" and not isinstance(v, bool):
            raise bad(f.name, "true or false")
        if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(f.name, "an integer")
        if f.type == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise bad(f.name, "a finite number")
            object.__setattr__(cfg, f.name, float(v))
        if f.type == "str" and not isinstance(v, str):
            raise bad(f.name, "a string")
    if cfg.reference not in REFERENCES:
        raise bad("reference", f"one of {', '.join(REFERENCES)}")
    if cfg.drift_model not in DRIFT_MODELS:
        raise bad("drift_model", f"one of {', '.join(DRIFT_MODELS)}")
    if not all(isinstance(c, str) for c in cfg.confounds) or set(cfg.confounds) - set(FAMILIES):
        raise bad("confounds", f"families among {', '.join(FAMILIES)}")
    if len(set(cfg.confounds)) != len(cfg.confounds):
        raise bad("confounds", "families without repeats")
    if {"motion", "motion_derivatives"} & set(cfg.confounds) and not cfg.motion_correction:
        raise bad("confounds", "free of motion families when motion_correction is off (there are no parameters)")
    for name in ("dummy_scans", "warmup_trs", "motion_min_volumes", "smoothing_fwhm_mm", "fd_threshold_mm",
                 "high_pass_hz"):
        if getattr(cfg, name) < 0:
            raise bad(name, "≥ 0")
    if "drift" in cfg.confounds and cfg.high_pass_hz <= 0:
        raise bad("high_pass_hz", '> 0 with the "drift" family')
    if cfg.dvars_threshold != 0 and cfg.dvars_threshold <= 1:
        raise bad("dvars_threshold", "0 (off) or > 1 (a multiple of the usual DVARS)")
    if not 0 <= cfg.reslice_order <= 5:
        raise bad("reslice_order", "a spline order 0…5")
    if cfg.realign_samples < 100:
        raise bad("realign_samples", "≥ 100")
    if cfg.realign_max_iter < 1:
        raise bad("realign_max_iter", "≥ 1")
    if cfg.realign_tol_mm <= 0:
        raise bad("realign_tol_mm", "> 0")
    if not 0 <= cfg.min_match_r < 1:
        raise bad("min_match_r", "in [0, 1)")


# --------------------------------------------------------------------------------------------- GLM


def cosine_drift(times: np.ndarray, high_pass_hz: float) -> np.ndarray:
    """DCT-II drift regressors (n, K) on ``times`` (n,) s: nilearn's ``create_cosine_drift`` without its
    constant column (identical on regular times), K = min(n − 1, ⌊2 n dt · cut-off⌋). Irregular times
    (a missed volume) are placed at their own positions."""
    times = np.asarray(times, float)
    n = len(times)
    if n < 2 or high_pass_hz <= 0:
        return np.zeros((n, 0))
    dt = (times[-1] - times[0]) / (n - 1)
    order = min(n - 1, int(np.floor(2 * n * high_pass_hz * dt)))
    pos = (times - times[0]) / dt + 0.5  # i + 0.5 on regular times
    return np.sqrt(2.0 / n) * np.cos((np.pi / n) * pos[:, None] * np.arange(1, order + 1))


def confound_design(times: np.ndarray, motion: np.ndarray | None, families: Sequence[str],
                    high_pass_hz: float, motion_min_volumes: int = 0) -> np.ndarray:
    """Regressors (n, p) of ``families`` over ``times`` (n,) and ``motion`` (n, 6) (needed with motion
    families): the design a GLM fitted on exactly these volumes uses. The motion families enter only once
    n ≥ ``motion_min_volumes`` (staged, as OpenNFT adds regressors)."""
    n = len(times)
    cols = []
    for fam in families:
        if fam.startswith("motion") and n < motion_min_volumes:
            continue
        if fam == "constant":
            cols.append(np.ones((n, 1)))
        elif fam == "drift":
            cols.append(cosine_drift(times, high_pass_hz))
        elif fam == "motion":
            cols.append(np.asarray(motion, float))
        elif fam == "motion_derivatives":
            m = np.asarray(motion, float)
            cols.append(np.vstack([np.zeros((1, 6)), np.diff(m, axis=0)]) if n else np.zeros((0, 6)))
        else:
            raise PreprocessError(f"unknown confound family {fam!r}")
    return np.hstack(cols) if cols else np.zeros((n, 0))


def causal_hat(design: np.ndarray, include: np.ndarray) -> tuple[np.ndarray, int]:
    """Weights h (n,) with fitted(last row) = h @ Y for a least-squares fit of Y (n, V) on ``design``
    (n, p) over the rows in ``include`` (n,) bool, and the design's rank on those rows. h is 0 on excluded
    rows; the residual of the last volume is y_last − h @ Y. Rank-deficient designs (early volumes) use
    the pseudo-inverse."""
    n, p = design.shape
    if p == 0:
        return np.zeros(n), 0
    xw = design * include[:, None]
    norm = np.sqrt((xw * xw).sum(0))
    keep = norm > 0  # an all-zero column (no motion yet) adds nothing
    if not keep.any():
        return np.zeros(n), 0
    xs = xw[:, keep] / norm[keep]  # unit columns: mm, radians and cosines on one scale for the rank
    u, s, vt = np.linalg.svd(xs, full_matrices=False)
    rank = int((s > s[0] * max(xs.shape) * np.finfo(float).eps).sum())
    x_last = design[-1, keep] / norm[keep]
    h = ((x_last @ vt[:rank].T) / s[:rank]) @ u[:, :rank].T
    return h * include, rank


@dataclass
class GLMStep:
    """One volume through :class:`OnlineGLM`."""

    residual: np.ndarray
    """(V,) float64 volume minus the fit of the regressors on volumes 0..t."""
    determined: bool
    """More included volumes than the rank of the regressors: the residual has degrees of freedom."""
    n_regressors: int
    """Rank of the design at this volume."""


class OnlineGLM:
    """Causal confound regression, one volume at a time: at volume t the regressors (constant, cosine
    drift on the times so far, motion) are fitted on volumes 0..t (excluded ones carry no weight) and the
    residual of volume t comes back. Exactly what :func:`clean_series` computes with ``causal=True``.

    The volumes so far are kept (float64: float32 would leave ~1e-6 of the signal in rounding and break
    the 1e-5 agreement with the offline computation, most on censored volumes with large residuals) in
    chunks of rows, never copied; a step costs one pass over them, O(t·V): ~5 ms for 31k voxels × 200
    volumes. The cosine basis changes with t, so there is no O(V) update of the fit itself.
    """

    def __init__(self, n_voxels: int, families: Sequence[str], high_pass_hz: float, chunk_rows: int = 64,
                 motion_min_volumes: int = 0):
        self.n_voxels = n_voxels
        self.families = tuple(families)
        self.high_pass_hz = high_pass_hz
        self.motion_min_volumes = motion_min_volumes
        self._chunk_rows = chunk_rows
        self._chunks: list[np.ndarray] = []
        self._origin: np.ndarray | None = None
        self._times: list[float] = []
        self._motion: list[np.ndarray] = []
        self._include: list[bool] = []

    @property
    def n_volumes(self) -> int:
        return len(self._times)

    def update(self, y: np.ndarray, t_s: float, motion: np.ndarray | None = None, include: bool = True) -> GLMStep:
        """Add volume ``y`` (V,) acquired at ``t_s`` with ``motion`` (6,) (needed with motion families);
        ``include=False`` keeps it out of the fit (censored) but still returns its residual."""
        y = np.asarray(y, np.float64)
        if y.shape != (self.n_voxels,):
            raise ValueError(f"volume has {y.shape} values, the GLM {self.n_voxels} voxels")
        if self._origin is None:
            self._origin = y.copy()
        n = self.n_volumes
        row = n % self._chunk_rows
        if row == 0:
            self._chunks.append(np.empty((self._chunk_rows, self.n_voxels)))
        self._chunks[-1][row] = y - self._origin  # centred: the first volume's level costs no precision
        self._times.append(float(t_s))
        self._motion.append(np.zeros(6) if motion is None else np.asarray(motion, float))
        self._include.append(bool(include))
        design = confound_design(np.asarray(self._times), np.asarray(self._motion), self.families, self.high_pass_hz,
                                 self.motion_min_volumes)
        include_arr = np.asarray(self._include)
        h, rank = causal_hat(design, include_arr)
        fitted = h.sum() * self._origin
        for c, chunk in enumerate(self._chunks):
            lo = c * self._chunk_rows
            rows = min(self._chunk_rows, n + 1 - lo)
            fitted += h[lo:lo + rows] @ chunk[:rows]
        return GLMStep(residual=y - fitted, determined=int(include_arr.sum()) > rank, n_regressors=rank)


class RunningStandardizer:
    """Per-voxel running mean and SD (Welford, ddof 1) of the residuals added so far."""

    def __init__(self, n_voxels: int):
        self.count = 0
        self.mean = np.zeros(n_voxels)
        self._m2 = np.zeros(n_voxels)

    def add(self, x: np.ndarray) -> None:
        """Add one residual (V,)."""
        self.count += 1
        d = x - self.mean
        self.mean += d / self.count
        self._m2 += d * (x - self.mean)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(x − mean) / SD (V,) float64; 0 where the SD is 0 or fewer than 2 residuals were added."""
        if self.count < 2:
            return np.zeros_like(x)
        sd = np.sqrt(self._m2 / (self.count - 1))
        return np.divide(x - self.mean, sd, out=np.zeros_like(x), where=sd > 0)


@dataclass
class CleanedSeries:
    """Confound regression and standardisation of a whole series."""

    residuals: np.ndarray
    """(T, V) float64 residuals of the GLM."""
    data: np.ndarray
    """(T, V) float64 standardised residuals (the residuals when standardisation is off)."""
    determined: np.ndarray
    """(T,) bool the GLM had degrees of freedom at that volume (always True offline non-causal)."""
    n_std: np.ndarray
    """(T,) residuals in the standardisation statistics at that volume (causal: so far; else the run)."""


def clean_series(y: np.ndarray, times: np.ndarray, motion: np.ndarray | None, include: np.ndarray,
                 config: PreprocessConfig, causal: bool) -> CleanedSeries:
    """Confound regression + standardisation of ``y`` (T, V) at ``times`` (T,) s with ``motion`` (T, 6),
    fitting only the ``include`` (T,) rows.

    ``causal=True``: row t is the residual of a fit on rows 0..t (the design evaluated on those rows),
    standardised by the mean and SD of the included, determined residuals of rows 0..t — what
    :class:`Preprocessor` computes volume by volume, here as one (T, T) @ (T, V) product in float64.
    ``causal=False``: one fit on the whole run with nilearn's design matrix (cosine drift, constant, motion
    as added regressors); z-scored over the included rows.
    """
    y = np.asarray(y, np.float64)
    include = np.asarray(include, bool)
    n = len(y)
    if causal:
        hat = np.zeros((n, n))
        determined = np.zeros(n, bool)
        for t in range(n):
            design = confound_design(times[:t + 1], None if motion is None else motion[:t + 1],
                                     config.confounds, config.high_pass_hz, config.motion_min_volumes)
            hat[t, :t + 1], rank = causal_hat(design, include[:t + 1])
            determined[t] = include[:t + 1].sum() > rank
        resid = y - hat @ y
        use = (include & determined).astype(float)[:, None]
        count = np.cumsum(use[:, 0])
        s1, s2 = np.cumsum(use * resid, axis=0), np.cumsum(use * resid * resid, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s1 / count[:, None]
            var = (s2 - s1 * mean) / (count[:, None] - 1)
            sd = np.sqrt(np.maximum(var, 0))
            z = np.where((count[:, None] >= 2) & (sd > 0), (resid - mean) / sd, 0.0)
        return CleanedSeries(resid, z if config.standardize else resid, determined, count.astype(int))
    design = _whole_run_design(times, motion, config)
    if include.sum() <= np.linalg.matrix_rank(design[include]):
        raise PreprocessError(f"{int(include.sum())} usable volumes cannot fit {design.shape[1]} regressors")
    beta, *_ = np.linalg.lstsq(design[include], y[include], rcond=None)
    resid = y - design @ beta
    mean = resid[include].mean(0)
    sd = resid[include].std(0, ddof=1)
    z = np.divide(resid - mean, sd, out=np.zeros_like(resid), where=sd > 0)
    return CleanedSeries(resid, z if config.standardize else resid, np.ones(n, bool),
                         np.full(n, int(include.sum())))


def _whole_run_design(times: np.ndarray, motion: np.ndarray | None, config: PreprocessConfig) -> np.ndarray:
    """nilearn's first-level design (T, p) without events: cosine drift, constant, motion regressors."""
    import warnings

    from nilearn.glm.first_level import make_first_level_design_matrix

    fams = set(config.confounds)
    if len(times) < config.motion_min_volumes:  # staged: a run too short for the motion families has none
        fams -= {"motion", "motion_derivatives"}
    regs, names = [], []
    if "motion" in fams:
        regs.append(motion)
        names += list(PARAM_NAMES)
    if "motion_derivatives" in fams:
        regs.append(np.vstack([np.zeros((1, 6)), np.diff(motion, axis=0)]))
        names += [f"{p}_derivative1" for p in PARAM_NAMES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saturated design" warnings for very short runs
        dm = make_first_level_design_matrix(
            np.asarray(times, float), events=None, drift_model="cosine" if "drift" in fams else None,
            high_pass=config.high_pass_hz, add_regs=np.hstack(regs) if regs else None,
            add_reg_names=names or None)
    if "constant" not in fams:
        dm = dm.drop(columns="constant")
    return dm.to_numpy(float)


# ------------------------------------------------------------------------------ per-volume stages


@dataclass
class StageTimes:
    """Wall time of each stage of one volume, ms."""

    realign_ms: float = 0.0
    """Rigid registration to the reference."""
    reslice_ms: float = 0.0
    """Resampling onto the reference grid."""
    smooth_ms: float = 0.0
    """Gaussian smoothing (0 when off)."""
    mask_ms: float = 0.0
    """Voxels in the mask, FD, DVARS and censoring."""
    glm_ms: float = 0.0
    """Causal confound regression."""
    standardize_ms: float = 0.0
    """Running standardisation."""
    total_ms: float = 0.0
    """The whole push, checks included."""


@dataclass
class PreprocessCounts:
    """Volumes seen and why volumes were not scored (a volume can count under several reasons)."""

    volumes: int = 0
    """Volumes pushed."""
    dummies: int = 0
    """Dropped dummy scans."""
    bad_shape: int = 0
    """Not a 3-D volume of the run's shape."""
    non_finite: int = 0
    """NaN or infinite values."""
    bad_time: int = 0
    """Acquisition time not after the previous volume's."""
    bad_reference: int = 0
    """The first usable volume could not serve as the reference (e.g. blank)."""
    not_converged: int = 0
    """Registration failed (the last good parameters were used)."""
    unaligned: int = 0
    """Volumes of a session whose reference could not be registered to the weights' space (all of its volumes
    after that reference: nothing of it is scored against the weights)."""
    fd: int = 0
    """Censored for framewise displacement."""
    dvars: int = 0
    """Censored as a DVARS spike."""
    warmup: int = 0
    """Held back while the GLM and standardisation warm up."""
    scored: int = 0
    """Volumes to score (nothing against them)."""


@dataclass
class MotionStep:
    """One volume through :class:`MotionCorrector`."""

    index: int
    """Position in the run (dummies included)."""
    t_s: float
    """Acquisition time, s."""
    realigned: np.ndarray | None
    """(X, Y, Z) float32 on the reference grid (before smoothing); None when not processed."""
    data: np.ndarray | None
    """(V,) float64 voxels in the mask after smoothing; None when not processed."""
    params: np.ndarray
    """(6,) motion parameters (NaN when not processed)."""
    fd: float
    """Framewise displacement from the previous processed volume, mm (0 for the first)."""
    dvars: float
    """RMS over the mask of the change from the previous processed volume (0 for the first)."""
    std_dvars: float
    """DVARS / median DVARS of the included volumes before it (NaN until 3 are known)."""
    converged: bool
    """The registration converged (True for the reference and without motion correction)."""
    reasons: list[str]
    """Why the volume is censored ([] when it is not)."""
    processed: bool
    """False for dummies and unusable volumes (wrong shape, non-finite values, bad time)."""
    timings: StageTimes
    """Per-stage wall time, ms (the GLM's stages stay 0 here)."""


class MotionCorrector:
    """Realignment, reslicing, smoothing, masking, FD, DVARS and censoring, one volume at a time: the
    first half of :class:`Preprocessor`, and all of it that :func:`preprocess_run` needs before a
    whole-run GLM."""

    def __init__(self, config: PreprocessConfig, affine: np.ndarray, *, reference: np.ndarray | None = None,
                 mask: np.ndarray | None = None, target: TargetSpace | None = None):
        """``affine`` (4, 4) of the run; ``reference`` (X, Y, Z) with ``config.reference == "given"``;
        ``mask`` (X, Y, Z) bool of the voxels to output (default: nilearn's EPI mask of the reference; with
        ``target``: on the target's grid, default its mask). ``target``: the weights' space; the session
        reference is registered to it once (:func:`encoders.register.register_to_target`) and every volume is
        resliced onto its grid in one interpolation (motion ∘ session→weights)."""
        self.config = config
        self.target = target
        """The space the volumes are resliced into (None: the session's own grid)."""
        self.alignment: SessionAlignment | None = None
        """The session reference registered to ``target`` (None before the reference, or without a target)."""
        self.session_reference: np.ndarray | None = None
        """(X', Y', Z') float32 the session's motion reference (with a target; for the alignment overlay)."""
        self.affine = np.asarray(affine, float)
        if self.affine.shape != (4, 4) or not np.isfinite(self.affine).all() or abs(np.linalg.det(self.affine)) < 1e-9:
            raise PreprocessError(f"affine must be an invertible 4×4 matrix, got {np.asarray(affine).shape}")
        if (reference is None) != (config.reference == "first"):
            raise PreprocessError('give a reference volume exactly when config.reference is "given"')
        self.counts = PreprocessCounts()
        self.shape: tuple[int, int, int] | None = None
        self.mask: np.ndarray | None = None
        self._mask_idx: np.ndarray | None = None
        self._given_mask = None if mask is None else np.asarray(mask, bool)
        self._target: RealignReference | None = None
        self._params = np.zeros(6)  # the last converged volume's: the warm start and the fallback
        self._prev_params: np.ndarray | None = None
        self._prev_data: np.ndarray | None = None
        self._prev_time: float | None = None
        self._dvars_hist: list[float] = []
        self._n_seen = 0
        if mask is None and (target is None or target.mask is None):  # nilearn takes seconds to import: here,
            importlib.import_module("nilearn.masking")  # not in the first volume's time
        if reference is not None:
            ref = np.asarray(reference, np.float32)
            if ref.ndim != 3:
                raise PreprocessError(f"reference volume must be 3-D, got shape {ref.shape}")
            if not np.isfinite(ref).all():
                raise PreprocessError("reference volume has non-finite values")
            self._set_reference(ref)

    @property
    def n_voxels(self) -> int | None:
        return None if self._mask_idx is None else len(self._mask_idx)

    @property
    def out_affine(self) -> np.ndarray:
        """(4, 4) of the grid the volumes come out on: the target's, else the run's."""
        return self.affine if self.target is None else np.asarray(self.target.affine, float)

    def _set_reference(self, ref: np.ndarray) -> None:
        if self.target is not None:
            self._set_target_reference(ref)
            return
        self.shape = ref.shape
        if self._given_mask is not None:
            if self._given_mask.shape != ref.shape:
                raise PreprocessError(f"mask shape {self._given_mask.shape} differs from the run's {ref.shape}")
            self.mask = self._given_mask
        else:
            self.mask = epi_mask(ref, self.affine)
        self._mask_idx = np.flatnonzero(self.mask)
        if self.config.motion_correction:
            try:
                self._target = prepare_reference(ref, self.affine, self.mask, self.config.realign_samples)
            except ValueError as e:
                raise PreprocessError(f"reference volume: {e}") from None

    def _set_target_reference(self, ref: np.ndarray) -> None:
        """The session reference with a target: motion sample points on the session grid, the output mask on
        the target grid, and the one registration of the session to the target."""
        tgt = self.target
        mask = self._given_mask if self._given_mask is not None else tgt.mask
        if mask is not None and np.shape(mask) != tgt.shape:
            raise PreprocessError(f"mask shape {np.shape(mask)} differs from the target grid's {tgt.shape}")
        if self.config.motion_correction:
            try:
                target = prepare_reference(ref, self.affine, None, self.config.realign_samples)
            except ValueError as e:
                raise PreprocessError(f"reference volume: {e}") from None
        self.shape = ref.shape
        self.mask = np.asarray(mask, bool) if mask is not None else epi_mask(tgt.reference, tgt.affine)
        self._mask_idx = np.flatnonzero(self.mask)
        if self.config.motion_correction:
            self._target = target
        self.session_reference = ref
        self.alignment = register_to_target(ref, self.affine, tgt, min_match_r=max(self.config.min_match_r, 0.5))

    def _reslice(self, vol: np.ndarray, params: np.ndarray | None) -> np.ndarray:
        """``vol`` motion-corrected by ``params`` (None: none) onto the output grid, one interpolation."""
        order = self.config.reslice_order
        if self.target is None:
            return reslice(vol, params, self.affine, order=order)
        world = self.alignment.matrix if self.alignment is not None and self.alignment.converged else np.eye(4)
        return reslice_to(vol, self.affine, self.target.affine, self.target.shape, world, params, order=order)

    def step(self, volume: np.ndarray, t_s: float) -> MotionStep:
        """Realign ``volume`` (X, Y, Z) acquired at ``t_s`` s; never raises for a bad volume: it comes back
        with ``processed=False`` and a reason, and is counted."""
        cfg = self.config
        t0 = time.perf_counter()
        times = StageTimes()
        index = self._n_seen
        self._n_seen += 1
        self.counts.volumes += 1
        nan6 = np.full(6, np.nan)

        def skip(reason: str) -> MotionStep:
            times.total_ms = 1e3 * (time.perf_counter() - t0)
            return MotionStep(index, float(t_s), None, None, nan6, np.nan, np.nan, np.nan, False, [reason],
                              False, times)

        if index < cfg.dummy_scans:
            self.counts.dummies += 1
            return skip("dummy scan")
        vol = np.asarray(volume, np.float32)
        if vol.ndim != 3 or (self.shape is not None and vol.shape != self.shape):
            self.counts.bad_shape += 1
            return skip(f"shape {vol.shape} differs from the run's {self.shape}" if self.shape
                        else f"not a 3-D volume (shape {vol.shape})")
        if not np.isfinite(vol).all():
            self.counts.non_finite += 1
            return skip("non-finite values")
        if self._prev_time is not None and not t_s > self._prev_time:
            self.counts.bad_time += 1
            return skip(f"acquisition time {t_s:g} s not after the previous volume's {self._prev_time:g} s")
        reasons: list[str] = []
        converged = True
        first = self.mask is None
        if first:  # config.reference == "first": this volume is the reference
            try:
                self._set_reference(vol)
            except PreprocessError as e:  # e.g. a blank volume: the next one may do
                self.shape = self.mask = self._mask_idx = self._target = None
                self.counts.bad_reference += 1
                return skip(f"unusable as the reference ({e})")
        params = np.zeros(6)
        if cfg.motion_correction and not first:
            fit = realign(vol, self._target, self.affine, init=self._params, max_iter=cfg.realign_max_iter,
                          tol_mm=cfg.realign_tol_mm, min_match_r=cfg.min_match_r)
            t1 = time.perf_counter()
            times.realign_ms = 1e3 * (t1 - t0)
            if fit.converged:
                self._params = params = fit.params
            else:  # keep the last good estimate: a failed fit must not feed FD or the motion regressors
                converged, params = False, self._params.copy()
                self.counts.not_converged += 1
                reasons.append(f"registration failed: {fit.reason}")
            realigned = self._reslice(vol, params)
            times.reslice_ms = 1e3 * (time.perf_counter() - t1)
        elif self.target is not None:  # the reference itself, or no motion correction: into the target grid
            t1 = time.perf_counter()
            realigned = self._reslice(vol, params if cfg.motion_correction else None)
            times.reslice_ms = 1e3 * (time.perf_counter() - t1)
        else:
            realigned = vol
        if self.alignment is not None and not self.alignment.converged:
            self.counts.unaligned += 1
            reasons.append(f"session not aligned to the weights' space ({self.alignment.reason})")
        t2 = time.perf_counter()
        smoothed = smooth(realigned, self.out_affine, cfg.smoothing_fwhm_mm) if cfg.smoothing_fwhm_mm > 0 else realigned
        t3 = time.perf_counter()
        times.smooth_ms = 1e3 * (t3 - t2)
        raw = realigned.ravel()[self._mask_idx]
        data = raw if smoothed is realigned else smoothed.ravel()[self._mask_idx]
        fd = 0.0 if self._prev_params is None else float(
            framewise_displacement(np.stack([self._prev_params, params]))[1])
        dvars = 0.0 if self._prev_data is None else float(np.sqrt(np.mean((raw - self._prev_data) ** 2)))
        std_dvars = np.nan
        if len(self._dvars_hist) >= _MIN_DVARS_HISTORY:
            med = float(np.median(self._dvars_hist))
            std_dvars = dvars / med if med > 0 else np.nan
        if cfg.fd_threshold_mm > 0 and fd > cfg.fd_threshold_mm:
            self.counts.fd += 1
            reasons.append(f"FD {fd:.2f} mm > {cfg.fd_threshold_mm:g} mm")
        if cfg.dvars_threshold > 0 and std_dvars > cfg.dvars_threshold:
            self.counts.dvars += 1
            reasons.append(f"DVARS {std_dvars:.2f}× the usual > {cfg.dvars_threshold:g}")
        if self._prev_data is not None and not reasons:
            self._dvars_hist.append(dvars)
        self._prev_params, self._prev_data, self._prev_time = params, raw, float(t_s)
        times.mask_ms = 1e3 * (time.perf_counter() - t3)
        times.total_ms = 1e3 * (time.perf_counter() - t0)
        return MotionStep(index, float(t_s), realigned, data.astype(np.float64), params, fd, dvars, std_dvars,
                          converged, reasons, True, times)


def epi_mask(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Brain mask (X, Y, Z) bool of one EPI ``volume`` (X, Y, Z): nilearn's ``compute_epi_mask``
    (histogram cut, opening, largest component); the whole volume when that finds nothing."""
    import warnings

    import nibabel as nib
    from nilearn.masking import compute_epi_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mask = np.asarray(compute_epi_mask(nib.Nifti1Image(np.asarray(volume, np.float32), affine)).dataobj,
                              bool)
        except ValueError:  # a flat volume: no histogram gap to cut at
            mask = np.zeros(volume.shape, bool)
    return mask if mask.any() else np.ones(volume.shape, bool)


def smooth(volume: np.ndarray, affine: np.ndarray, fwhm_mm: float) -> np.ndarray:
    """Gaussian smoothing of ``volume`` (X, Y, Z) with ``fwhm_mm`` FWHM in world mm (per-axis voxel sizes
    from ``affine``), as nilearn's ``smooth_img``. (X, Y, Z) float32."""
    from scipy.ndimage import gaussian_filter

    vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    sigma = fwhm_mm / np.sqrt(8 * np.log(2)) / vox
    return gaussian_filter(np.asarray(volume, np.float32), sigma, output=np.float32)


# ------------------------------------------------------------------------------ the streaming core


@dataclass
class PreprocessedVolume:
    """One volume out of :meth:`Preprocessor.push`."""

    index: int
    """Position in the run (dummies included)."""
    t_s: float
    """Acquisition time as pushed, s."""
    data: np.ndarray
    """(V,) float32 the preprocessed voxels in the mask (C order): standardised causal residuals. NaN
    where the volume was not processed (dummy, wrong shape, non-finite; (0,) before the mask exists)."""
    params: np.ndarray
    """(6,) trans_x/y/z mm, rot_x/y/z radians (the last good estimate when the registration failed)."""
    fd: float
    """Framewise displacement from the previous processed volume, mm (0 for the first)."""
    dvars: float
    """DVARS from the previous processed volume (intensity units; 0 for the first)."""
    std_dvars: float
    """DVARS relative to the usual DVARS so far (NaN early)."""
    converged: bool
    """The registration converged (True without motion correction)."""
    excluded: bool
    """Not to be scored: dummy, unusable, censored (FD, DVARS, registration) or warm-up."""
    reason: str
    """Why it is excluded ("" when scored); several reasons are joined by "; "."""
    timings: StageTimes
    """Per-stage wall time, ms."""
    realigned: np.ndarray | None = None
    """(X, Y, Z) float32 realigned volume (None when not processed)."""


class Preprocessor:
    """The streaming preprocessing core: feed volumes in acquisition order, get each one preprocessed.

    >>> pre = Preprocessor(PreprocessConfig(), affine)
    >>> out = pre.push(volume, t_s)       # out.data (V,) in pre.mask, out.excluded, out.reason
    """

    def __init__(self, config: PreprocessConfig, affine: np.ndarray, *, reference: np.ndarray | None = None,
                 mask: np.ndarray | None = None, target: TargetSpace | None = None):
        """``affine`` (4, 4) of the run; ``reference`` (X, Y, Z) with ``config.reference == "given"``;
        ``mask`` (X, Y, Z) bool of the voxels to output (e.g. the encoding weights'; default: the EPI mask
        of the reference); ``target``: the weights' space, registered to once and resliced into
        (:class:`MotionCorrector`)."""
        self.config = config
        self.motion = MotionCorrector(config, affine, reference=reference, mask=mask, target=target)
        self._glm: OnlineGLM | None = None
        self._std: RunningStandardizer | None = None
        self._n_processed = 0

    @property
    def mask(self) -> np.ndarray | None:
        """(X, Y, Z) bool voxels of ``data`` (None until the reference is known)."""
        return self.motion.mask

    @property
    def counts(self) -> PreprocessCounts:
        return self.motion.counts

    def push(self, volume: np.ndarray, t_s: float) -> PreprocessedVolume:
        """Preprocess ``volume`` (X, Y, Z) acquired at ``t_s`` s. Never raises for a bad volume (wrong
        shape, NaNs, failed registration): it comes back excluded, with its reason, and is counted."""
        cfg = self.config
        m = self.motion.step(volume, t_s)
        n_vox = self.motion.n_voxels or 0
        if not m.processed:
            return PreprocessedVolume(m.index, m.t_s, np.full(n_vox, np.nan, np.float32), m.params, m.fd,
                                      m.dvars, m.std_dvars, m.converged, True, "; ".join(m.reasons), m.timings)
        if self._glm is None:
            self._glm = OnlineGLM(n_vox, cfg.confounds, cfg.high_pass_hz,
                                  motion_min_volumes=cfg.motion_min_volumes)
            self._std = RunningStandardizer(n_vox)
        times = m.timings
        t0 = time.perf_counter()
        include = not m.reasons
        step = self._glm.update(m.data, m.t_s, m.params, include)
        t1 = time.perf_counter()
        if include and step.determined:
            self._std.add(step.residual)
        out = self._std.transform(step.residual) if cfg.standardize else step.residual
        t2 = time.perf_counter()
        reasons = list(m.reasons)
        self._n_processed += 1
        if self._n_processed <= cfg.warmup_trs or not step.determined or self._std.count < 2:
            self.counts.warmup += 1
            reasons.append("warm-up")
        if not reasons:
            self.counts.scored += 1
        times.glm_ms, times.standardize_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        times.total_ms += 1e3 * (t2 - t0)
        return PreprocessedVolume(m.index, m.t_s, out.astype(np.float32), m.params, m.fd, m.dvars, m.std_dvars,
                                  m.converged, bool(reasons), "; ".join(reasons), times, m.realigned)


# ------------------------------------------------------------------------------ offline


@dataclass
class PreprocessResult:
    """A preprocessed run."""

    config: PreprocessConfig
    affine: np.ndarray
    """(4, 4) of every output: the run's, or the target's when it was resliced into one."""
    tr: float
    causal: bool
    """The GLM and standardisation were causal (as live) or whole-run."""
    mask: np.ndarray
    """(X, Y, Z) bool voxels of ``data``."""
    realigned: np.ndarray
    """(T, X, Y, Z) float32 realigned volumes (dummies and unusable volumes as they came)."""
    data: np.ndarray
    """(T, V) float32 preprocessed voxels in the mask (0 for dummies)."""
    motion: np.ndarray
    """(T, 6) trans_x/y/z mm, rot_x/y/z radians (NaN for dummies)."""
    fd: np.ndarray
    """(T,) framewise displacement, mm (NaN for dummies)."""
    dvars: np.ndarray
    """(T,) DVARS (NaN for dummies)."""
    std_dvars: np.ndarray
    """(T,) DVARS relative to the usual DVARS before it (NaN early and for dummies)."""
    converged: np.ndarray
    """(T,) bool registration converged."""
    excluded: np.ndarray
    """(T,) bool not to be scored / fitted."""
    reasons: list[str]
    """Per volume why it is excluded ("" when not)."""
    counts: PreprocessCounts

    def to_image(self, which: str = "preproc"):
        """"preproc" (zeros outside the mask) or "realigned" as a 4-D float32 ``Nifti1Image`` with the TR."""
        import nibabel as nib

        if which == "realigned":
            vols = np.moveaxis(self.realigned, 0, -1)
        else:
            vols = np.zeros((*self.mask.shape, len(self.data)), np.float32)
            vols[self.mask] = self.data.T
        img = nib.Nifti1Image(np.ascontiguousarray(vols, np.float32), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = self.tr
        return img

    def confounds(self) -> tuple[list[str], np.ndarray]:
        """fMRIPrep-style confounds: column names and (T, C) values (NaN = n/a): trans_x … rot_z and their
        ``_derivative1``, framewise_displacement, dvars, std_dvars, the whole-run ``cosineXX`` basis,
        ``non_steady_state_outlierXX`` (dummies and warm-up volumes) and ``motion_outlierXX`` (censored)."""
        n = len(self.motion)
        deriv = np.full((n, 6), np.nan)
        deriv[1:] = np.diff(self.motion, axis=0)
        fd, dvars = self.fd.copy(), self.dvars.copy()
        processed = np.flatnonzero(~np.isnan(fd))
        if len(processed):  # fMRIPrep: no FD or DVARS for the first volume
            fd[processed[0]] = dvars[processed[0]] = np.nan
        drift = cosine_drift(np.arange(n) * self.tr, self.config.high_pass_hz)
        steady = [i for i, r in enumerate(self.reasons) if "dummy" in r or r == "warm-up"]
        outliers = [i for i, r in enumerate(self.reasons) if r and i not in steady]
        cols = [*PARAM_NAMES, *(f"{p}_derivative1" for p in PARAM_NAMES), "framewise_displacement", "dvars",
                "std_dvars", *(f"cosine{k:02d}" for k in range(drift.shape[1]))]
        values = [self.motion, deriv, fd[:, None], dvars[:, None], self.std_dvars[:, None], drift]
        for name, idx in (("non_steady_state_outlier", steady), ("motion_outlier", outliers)):
            onehot = np.zeros((n, len(idx)))
            onehot[idx, np.arange(len(idx))] = 1
            cols += [f"{name}{k:02d}" for k in range(len(idx))]
            values.append(onehot)
        return cols, np.hstack(values)

    def summary(self) -> str:
        """One line: volumes, how many were scored and why the others were not, motion extent."""
        c = self.counts
        moved = self.motion[~np.isnan(self.motion[:, 0])]
        extent = (f"max |trans| {np.abs(moved[:, :3]).max():.2f} mm, max |rot| "
                  f"{np.rad2deg(np.abs(moved[:, 3:]).max()):.2f}°, max FD {np.nanmax(self.fd):.2f} mm"
                  if len(moved) else "no volume realigned")
        skipped = {k: v for k, v in dataclasses.asdict(c).items() if v and k not in ("volumes", "scored")}
        return (f"{c.volumes} volumes ({'causal' if self.causal else 'whole-run'} GLM): {c.scored} kept"
                + (f", excluded {skipped}" if skipped else "") + f"; {extent}")


def preprocess_run(img, config: PreprocessConfig = PreprocessConfig(), reference=None, *, causal: bool = False,
                   tr: float | None = None, mask: np.ndarray | None = None,
                   target: TargetSpace | None = None) -> PreprocessResult:
    """Preprocess a whole run: ``img`` a 4-D nibabel image (or its path); ``reference`` a 3-D volume (array
    or image) on the run's grid with ``config.reference == "given"``; ``tr`` s (default: the header);
    ``mask`` (X, Y, Z) bool of the output voxels (default: the reference's EPI mask; with ``target``: on
    its grid, default its mask); ``target``: the weights' space the run's reference is registered to once
    and every volume resliced into, as :class:`encoders.stream.LivePreprocess` does live.

    ``causal=True`` computes exactly what a :class:`Preprocessor` fed the volumes one by one returns
    (realignment and censoring volume by volume, then :func:`clean_series` with ``causal=True``);
    ``causal=False`` fits the confounds on the whole run (nilearn's design matrix) and z-scores over it.
    """
    import nibabel as nib

    from encoders.data import _load_nifti, _nifti_data

    path = None
    if isinstance(img, (str, Path)):
        path = Path(img)
        img = _load_nifti(path, "BOLD run")
    name = str(path) if path else "BOLD image"
    if len(img.shape) != 4:
        raise PreprocessError(f"{name}: not a 4-D BOLD run (shape {img.shape})")
    n = img.shape[3]
    if n <= config.dummy_scans:
        raise PreprocessError(f"{name}: {n} volumes, all dummy scans ({config.dummy_scans})")
    if tr is None:
        zooms = img.header.get_zooms()
        tr = float(zooms[3]) if len(zooms) > 3 else 0.0
        if not tr > 0:
            raise PreprocessError(f"{name}: no repetition time in the header; give the TR")
    if not tr > 0:
        raise PreprocessError(f"TR must be > 0 s, got {tr}")
    vols = _nifti_data(path or Path(name), img, np.float32) if path else np.asarray(img.dataobj, np.float32)
    if reference is not None and isinstance(reference, nib.spatialimages.SpatialImage):
        if not np.allclose(reference.affine, img.affine, atol=1e-3):
            raise PreprocessError("reference is on another grid (affine) than the run")
        reference = np.asarray(reference.dataobj, np.float32)
    if reference is not None:
        reference = np.asarray(reference, np.float32)
        if reference.shape != img.shape[:3]:
            raise PreprocessError(f"reference shape {reference.shape} differs from the run's {img.shape[:3]}")
    mc = MotionCorrector(config, img.affine, reference=reference, mask=mask, target=target)
    out_shape = img.shape[:3] if target is None else target.shape
    steps, realigned = [], np.empty((n, *out_shape), np.float32)
    for t in range(n):
        vol = np.ascontiguousarray(vols[..., t])  # a volume of an (X, Y, Z, T) array is strided
        step = mc.step(vol, t * tr)
        realigned[t] = step.realigned if step.processed else (vol if vol.shape == out_shape else np.nan)
        step.realigned = None  # one copy of the run is enough
        steps.append(step)
    ok = np.array([s.processed for s in steps])
    if not ok.any():
        raise PreprocessError(f"{name}: no usable volume ({steps[-1].reasons[0]})")
    y = np.stack([s.data for s in steps if s.processed])
    motion = np.stack([s.params for s in steps])
    include = np.array([not s.reasons for s in steps if s.processed])
    times = np.arange(n)[ok] * tr
    cleaned = clean_series(y, times, motion[ok], include, config, causal)
    reasons = [list(s.reasons) for s in steps]
    if causal:  # the same warm-up rule as Preprocessor.push
        for k, t in enumerate(np.flatnonzero(ok)):
            if k < config.warmup_trs or not cleaned.determined[k] or cleaned.n_std[k] < 2:
                reasons[t].append("warm-up")
                mc.counts.warmup += 1
    data = np.zeros((n, mc.n_voxels), np.float32)
    data[ok] = cleaned.data
    joined = ["; ".join(r) for r in reasons]
    mc.counts.scored = sum(1 for r in joined if not r)
    return PreprocessResult(
        config=config, affine=np.asarray(mc.out_affine, float), tr=float(tr), causal=causal, mask=mc.mask,
        realigned=realigned, data=data, motion=motion, fd=np.array([s.fd for s in steps]),
        dvars=np.array([s.dvars for s in steps]), std_dvars=np.array([s.std_dvars for s in steps]),
        converged=np.array([s.converged for s in steps]), excluded=np.array([bool(r) for r in joined]),
        reasons=joined, counts=mc.counts)


@dataclass
class FitSeries:
    """Raw 4-D runs preprocessed for a fit exactly as the live core will preprocess them
    (:func:`preprocess_for_fit`)."""

    runs: list[np.ndarray]
    """Per run (T_i, V) float32 preprocessed voxels in the mask; excluded volumes (warm-up, censored,
    unusable) set to 0: live, their cleaned values are never scored (causal: do not exist yet)."""
    zeroed: list[list[int]]
    """Per run, the indices of the volumes set to 0."""
    motion: list[np.ndarray]
    """Per run (T_i, 6) realignment parameters (trans mm, rot rad; NaN where not processed)."""
    reference: np.ndarray | None
    """(X, Y, Z) float32 the volume every run was registered to (the first run's first usable volume):
    the weights' reference, to which a live session is registered the same way; None with ``align`` off."""
    counts: list[PreprocessCounts]
    """Per run, the volumes seen and why volumes were excluded."""


def preprocess_for_fit(runs: Sequence, config: PreprocessConfig, mask: np.ndarray, *, causal: bool = True,
                       tr: float | None = None, align: bool = True, reference: np.ndarray | None = None
                       ) -> FitSeries:
    """The one fit-time preprocessing of raw (not yet realigned) runs: ``runs`` 4-D NIfTI images or paths
    on one grid, ``mask`` (X, Y, Z) bool of the fit's voxels, ``tr`` s (default: each header).

    Each run goes through :func:`preprocess_run`: realignment to its first usable volume + reslice, then
    ``causal=True`` the live core's causal GLM and running standardisation (what
    :class:`Preprocessor` returns volume by volume), or ``causal=False`` the whole-run GLM and z-score.
    ``align=True``: every run's reference is also registered to the first run's (a :class:`TargetSpace`) and
    its volumes resliced there in one interpolation — exactly what ``LivePreprocess`` does with weights
    that keep that reference, so a training run fed live gives the fit's values; runs that start in
    another head position land in one space. ``align=False``: each run stays on its own reference (live:
    weights without a reference, sessions assumed on their grid). ``reference`` (X, Y, Z) on the mask's grid:
    register to it instead of the first run's volume (a held-out run cleaned for weights that keep it)."""
    from encoders.data import _load_nifti, _nifti_data

    mask = np.asarray(mask, bool)
    target, out = None, FitSeries([], [], [], None, [])
    if align and reference is not None:
        first = np.asarray(reference, np.float32)
        if first.shape != mask.shape:
            raise PreprocessError(f"reference shape {first.shape} differs from the mask's {mask.shape}")
        img = _load_nifti(Path(runs[0]), "BOLD run") if isinstance(runs[0], (str, Path)) else runs[0]
        target, out.reference = TargetSpace(first, np.asarray(img.affine, float), mask), first
    for k, run in enumerate(runs):
        name = str(run) if isinstance(run, (str, Path)) else f"run {k + 1}"
        if align and target is None:
            img = _load_nifti(Path(run), "BOLD run") if isinstance(run, (str, Path)) else run
            if len(img.shape) != 4:
                raise PreprocessError(f"{name}: not a 4-D BOLD run (shape {img.shape})")
            vols = _nifti_data(Path(name), img, np.float32) if isinstance(run, (str, Path)) else \
                np.asarray(img.dataobj, np.float32)
            first = _first_usable(vols, config.dummy_scans)
            del vols
            if first is None:
                raise PreprocessError(f"{name}: no finite volume after the dummy scans to serve as the fit's reference")
            target, out.reference = TargetSpace(first, np.asarray(img.affine, float), mask), first
        try:
            res = preprocess_run(run, config, causal=causal, tr=tr, mask=mask, target=target)
        except PreprocessError as e:
            raise PreprocessError(str(e) if name in str(e) else f"{name}: {e}") from None
        if res.mask.shape != mask.shape or not np.array_equal(res.mask, mask):
            raise PreprocessError(f"{name}: not on the fit's grid {mask.shape}")
        data = res.data.copy()
        data[res.excluded] = 0  # censored: not in the GLM; causal warm-up: their values do not exist yet live
        out.runs.append(data)
        out.zeroed.append(np.flatnonzero(res.excluded).tolist())
        out.motion.append(res.motion)
        out.counts.append(res.counts)
        del res  # the realigned copy of the run
    if not out.runs:
        raise PreprocessError("no runs to preprocess")
    return out


def _first_usable(vols: np.ndarray, dummy_scans: int) -> np.ndarray | None:
    """(X, Y, Z) float32 the first finite volume of ``vols`` (X, Y, Z, T) after the dummies (None: none)."""
    for t in range(dummy_scans, vols.shape[3]):
        v = np.ascontiguousarray(vols[..., t])
        if np.isfinite(v).all() and v.any():
            return v
    return None


# ------------------------------------------------------------------------------ files


def bids_stem(path: str | Path) -> str:
    """``sub-01_task-x_run-1`` of ``…/sub-01_task-x_run-1_bold.nii.gz`` (the name without ``_bold`` and the
    NIfTI extension): outputs are named ``<stem>_desc-<what>_…``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len("_bold")] if name.endswith("_bold") else name


def write_outputs(result: PreprocessResult, out_dir: str | Path, stem: str) -> list[Path]:
    """``<stem>_desc-realigned_bold.nii.gz``, ``<stem>_desc-preproc_bold.nii.gz`` (+ JSON sidecar with the
    config and counts) and ``<stem>_desc-confounds_timeseries.tsv`` (+ JSON column descriptions) in
    ``out_dir``. Raises :class:`PreprocessError` when the folder cannot be written."""
    import nibabel as nib

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"{stem}_desc-{k}" for k in ("realigned", "preproc", "confounds")}
        written = []
        for which in ("realigned", "preproc"):
            p = Path(f"{paths[which]}_bold.nii.gz")
            nib.save(result.to_image(which), p)
            written.append(p)
        side = Path(f"{paths['preproc']}_bold.json")
        side.write_text(json.dumps({
            "RepetitionTime": result.tr, "SkullStripped": False,
            "CausalGLM": result.causal, "Preprocessing": result.config.to_dict(),
            "Counts": dataclasses.asdict(result.counts),
            "Excluded": {str(i): r for i, r in enumerate(result.reasons) if r},
        }, indent=2))
        written.append(side)
        cols, values = result.confounds()
        tsv = Path(f"{paths['confounds']}_timeseries.tsv")
        lines = ["\t".join(cols)]
        lines += ["\t".join("n/a" if np.isnan(v) else f"{v:.10g}" for v in row) for row in values]
        tsv.write_text("\n".join(lines) + "\n")
        written.append(tsv)
        units = {"trans": "mm", "rot": "rad", "framewise_displacement": "mm"}
        meta = {c: {"Units": next((u for k, u in units.items() if c.startswith(k)), "arbitrary")} for c in cols}
        Path(f"{paths['confounds']}_timeseries.json").write_text(json.dumps(meta, indent=2))
        written.append(Path(f"{paths['confounds']}_timeseries.json"))
    except OSError as e:
        raise PreprocessError(f"{out}: cannot write the outputs ({e.strerror or e})") from None
    return written


def preprocess_file(bold: str | Path, out_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), *,
                    reference: str | Path | None = None, causal: bool = False,
                    tr: float | None = None) -> tuple[PreprocessResult, list[Path]]:
    """Preprocess the run at ``bold`` and write its outputs (:func:`write_outputs`) into ``out_dir``.
    ``reference``: a 3-D NIfTI (or a 4-D one, whose first volume is used) on the run's grid. Unusable
    inputs raise :class:`~encoders.data.FitInputError` naming the file."""
    from encoders.data import _load_nifti, _nifti_data

    bold = Path(bold)
    img = _load_nifti(bold, "BOLD run")
    if len(img.shape) != 4:
        raise PreprocessError(f"{bold}: not a 4-D BOLD run (shape {img.shape})")
    ref = None
    if reference is not None:
        reference = Path(reference)
        ref_img = _load_nifti(reference, "reference")
        ref = _nifti_data(reference, ref_img, np.float32)
        if ref.ndim == 4:
            ref = ref[..., 0]
        if ref.ndim != 3 or ref.shape != img.shape[:3] or not np.allclose(ref_img.affine, img.affine, atol=1e-3):
            raise PreprocessError(f"{reference}: not a volume on the run's grid ({ref_img.shape} vs {img.shape[:3]})")
    result = preprocess_run(bold, config, ref, causal=causal, tr=tr)
    return result, write_outputs(result, out_dir, bids_stem(bold))
