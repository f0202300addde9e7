"""Fit voxelwise encoding models (the paper's method) with himalaya, and score them honestly.

Pipeline, run by run (runs never leak into each other):

1. features: z-score each run with its own mean/std (removes run offsets), optionally PCA to K
   dims (basis fitted on all training rows; matches dimensionality across models);
2. FIR delays (default 1–4 TRs = 2–8 s at TR 2 s) built *inside* each run, zero-filled at the run
   start (himalaya's ``Delayer`` would let run k's last rows leak into run k+1's first rows);
3. BOLD: z-score every voxel within each run;
4. ridge with one alpha per voxel chosen by leave-one-run-out (LORO) CV over ``alphas``:
   ``RidgeCV`` (primal) when features ≤ samples, else ``KernelRidgeCV`` (dual, converted back to
   primal weights), ``BandedRidgeCV`` when several feature spaces are fitted jointly (one
   penalty per space and voxel);
5. scores: nested LORO — each run is predicted by a model (alphas re-chosen by LORO inside the
   other runs) that never saw it; r and R² per voxel on the concatenated held-out predictions.

At application time the weights z-score incoming rows with pooled training stats (mean of the
per-run means, RMS of the per-run stds): run stats do not exist yet while a run is streaming.

Thread note (REFERENCE §2): numpy RidgeCV ran 4× faster with 1 BLAS thread than with 2 on the
2-core dev box, so BLAS threads are limited to ``FitConfig.blas_threads`` during the fit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from encoders.data import FitInputError
from encoders.score import pearson_r
from encoders.weights import EncodingWeights, FeatureSpace, PreprocessRecord, delay_run

CONTIGUOUS_FOLDS = 5
"""Alpha-selection folds when there are too few runs for leave-one-run-out (see :func:`loro_splits`)."""


@dataclass
class FitConfig:
    """Options of an encoding fit."""

    delays: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """FIR delays in TRs."""
    pca: int | None = None
    """Reduce every feature space to this many principal components (None = keep all)."""
    alphas: np.ndarray = field(default_factory=lambda: np.logspace(-2, 8, 21))
    """Ridge penalties searched per voxel."""
    backend: str = "numpy"
    """himalaya backend: numpy, torch, torch_cuda (GPU) or cupy."""
    blas_threads: int | None = 1
    """BLAS / torch threads during the fit (None = leave as is)."""
    score: bool = True
    """Compute nested leave-one-run-out CV r and R² per voxel (n_runs extra fits)."""
    n_permutations: int = 0
    """Block permutations for per-voxel significance of the CV r (0 = skip)."""
    permutation_block: int = 10
    """Block length in TRs for the permutation test (keeps BOLD autocorrelation)."""
    fdr_q: float = 0.05
    """False discovery rate for the significance mask (Benjamini–Hochberg)."""
    banded_iter: int = 20
    """Random-search iterations of banded ridge over the per-space penalty ratios."""
    n_targets_batch: int | None = None
    """Voxels per solver batch (None = all at once); lower it when memory is short."""
    seed: int = 0
    """Random seed (banded-ridge search, permutations)."""
    progress: bool = True
    """Show rich progress bars."""


@dataclass
class FitResult:
    """A fitted model plus the held-out evidence behind it."""

    weights: EncodingWeights
    cv_r: np.ndarray | None = None
    """(V,) Pearson r of the concatenated LORO held-out predictions (0 where undefined, see cv_r_undefined)."""
    cv_r_undefined: np.ndarray | None = None
    """(V,) bool: r undefined (``encoders.score.pearson_r``: constant held-out BOLD or prediction)."""
    cv_r2: np.ndarray | None = None
    """(V,) R² of the same predictions."""
    cv_pred: np.ndarray | None = None
    """(T, V) held-out predictions (z-units), runs concatenated."""
    y: np.ndarray | None = None
    """(T, V) per-run z-scored BOLD, runs concatenated."""
    p_values: np.ndarray | None = None
    """(V,) block-permutation p-values of cv_r (when n_permutations > 0)."""
    q_values: np.ndarray | None = None
    """(V,) Benjamini–Hochberg adjusted p-values."""
    significant: np.ndarray | None = None
    """(V,) bool: q ≤ fdr_q."""
    noise_ceiling: np.ndarray | None = None
    """(V,) explainable variance from repeated runs (when the fit found repeats)."""
    warnings: list[str] = field(default_factory=list)
    """What the fit could not do as the method asks (one run: no leave-one-run-out, no held-out
    scores); also in the weights' provenance under ``warnings``."""


# --- preprocessing -------------------------------------------------------------------------


def zscore_run(X: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score columns of one run (into ``out`` if given); constant columns become 0. Returns (Z, mean, std).

    Three passes over the data and no temporaries beyond the result: BOLD runs are the big arrays.
    """
    X = np.asarray(X)
    mean = X.mean(0, dtype=np.float64).astype(np.float32)
    if out is not None:
        Z = np.subtract(X, mean, out=out, dtype=np.float32)
    else:
        Z = (X - mean).astype(np.float32, copy=False)
    std = np.sqrt(np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / max(len(Z), 1)).astype(np.float32)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, np.float32(1.0)).astype(np.float32)
    Z /= std
    return Z, mean, std


def prepare_space(name: str, runs: list[np.ndarray], pca: int | None, provenance: dict | None = None
                  ) -> tuple[FeatureSpace, list[np.ndarray]]:
    """Per-run z-score (+ PCA) one feature space; return its FeatureSpace and transformed runs."""
    dims = {np.asarray(r).shape[1] for r in runs}
    if len(dims) != 1:
        raise FitInputError(f"feature space {name!r}: runs have different dims {sorted(dims)}")
    dim = dims.pop()
    zs, means, stds = zip(*(zscore_run(r) for r in runs))
    space = FeatureSpace(
        name=name, dim=dim, **(provenance or {}),
        mean=np.mean(means, axis=0).astype(np.float32),
        std=np.sqrt(np.mean(np.square(stds), axis=0)).astype(np.float32),
    )
    zs = list(zs)
    if pca is not None:
        Z = np.concatenate(zs)
        k = min(pca, Z.shape[0], dim)
        if k < pca:
            raise FitInputError(f"feature space {name!r}: PCA to {pca} dims needs ≥{pca} rows and dims, "
                                f"have {Z.shape[0]} rows × {dim} dims")
        center = Z.mean(0)
        _, _, vt = np.linalg.svd(Z - center, full_matrices=False)
        space.pca_components = vt[:k].astype(np.float32)
        space.pca_mean = center.astype(np.float32)
        zs = [((z - center) @ space.pca_components.T).astype(np.float32) for z in zs]
    return space, zs


def loro_splits(lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-run-out (train, test) index pairs over runs concatenated in order.

    With fewer than 3 runs an inner LORO would train on one run only, so ``CONTIGUOUS_FOLDS``
    contiguous folds are used instead (still no shuffling: neighbouring TRs are correlated).
    """
    edges = np.concatenate([[0], np.cumsum(lengths)])
    n = int(edges[-1])
    if len(lengths) >= 3:
        return [(np.r_[0:edges[i], edges[i + 1]:n], np.arange(edges[i], edges[i + 1])) for i in range(len(lengths))]
    folds = np.array_split(np.arange(n), CONTIGUOUS_FOLDS)
    return [(np.setdiff1d(np.arange(n), f), f) for f in folds]


@contextlib.contextmanager
def himalaya_backend(name: str, threads: int | None) -> Iterator[object]:
    """Set himalaya's (global) backend and the thread count for the duration of a fit, then restore."""
    from himalaya.backend import get_backend, set_backend
    from threadpoolctl import threadpool_limits

    previous = get_backend().name
    backend = set_backend(name, on_error="raise")
    torch_threads = None
    if threads is not None and name == "torch":  # CPU torch only: torch_cuda keeps its host threads
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads) if threads is not None else contextlib.nullcontext():
            yield backend
    finally:
        set_backend(previous)
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)


def solve_ridge(X: np.ndarray, Y: np.ndarray, cv: list, groups: np.ndarray, cfg: FitConfig, backend
                ) -> tuple[np.ndarray, np.ndarray]:
    """One himalaya fit with per-voxel alpha by ``cv``; returns float32 (primal coef, alphas)."""
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import BandedRidgeCV, RidgeCV

    alphas = np.asarray(cfg.alphas, dtype=np.float32)
    batch = {} if cfg.n_targets_batch is None else {"n_targets_batch": cfg.n_targets_batch}
    if len(np.unique(groups)) > 1:
        model = BandedRidgeCV(groups=groups, cv=cv, random_state=cfg.seed, solver_params=dict(
            n_iter=cfg.banded_iter, alphas=alphas, progress_bar=False, warn=False, **batch))
        model.fit(X, Y)
        coef = model.coef_
    elif X.shape[1] <= X.shape[0]:
        model = RidgeCV(alphas=alphas, cv=cv, solver_params=batch)
        model.fit(X, Y)
        coef = model.coef_
    else:
        model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=cv, solver_params=batch)
        model.fit(X, Y)
        coef = model.get_primal_coef()
    return (np.asarray(backend.to_numpy(coef), dtype=np.float32),
            np.asarray(backend.to_numpy(model.best_alphas_), dtype=np.float32))


# --- scores --------------------------------------------------------------------------------


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Column-wise R² = 1 − SSE/SST (can be negative)."""
    sst = ((y - y.mean(0)) ** 2).sum(0)
    sse = ((y - pred) ** 2).sum(0)
    return np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), 0.0).astype(np.float32)


def variance_partition(r2_joint: np.ndarray, r2_a: np.ndarray, r2_b: np.ndarray) -> dict[str, np.ndarray]:
    """Two-space variance partitioning (set theory on held-out R², Dupré la Tour et al. 2022).

    unique_a = R²(A∪B) − R²(B); unique_b = R²(A∪B) − R²(A); shared = R²(A) + R²(B) − R²(A∪B).
    Values are kept when negative: with finite data the joint model can score below a single
    space (more parameters, more estimation noise), which makes a "unique" part negative, and a
    shared part is negative when the spaces suppress each other. Negative ≈ "none detectable".
    """
    return {
        "unique_a": (r2_joint - r2_b).astype(np.float32),
        "unique_b": (r2_joint - r2_a).astype(np.float32),
        "shared": (r2_a + r2_b - r2_joint).astype(np.float32),
    }


def noise_ceiling(repeats: np.ndarray) -> np.ndarray:
    """Explainable variance per voxel from repeats (n_repeats, T, V) of the same stimulus.

    EV = var(mean over repeats) / mean(var of each repeat), bias-corrected for the noise left in
    the mean: (n·EV − 1)/(n − 1) (Schoppe et al. 2016; voxelwise_tutorials). Repeats are
    z-scored first, so the result is the fraction of variance a perfect model could explain.
    """
    reps = np.stack([zscore_run(r)[0] for r in repeats])
    n = reps.shape[0]
    if n < 2:
        raise ValueError("noise ceiling needs at least 2 repeats")
    ev = reps.mean(0).var(0) / reps.var(1).mean(0)
    return ((n * ev - 1) / (n - 1)).astype(np.float32)


def block_permutation_test(y: np.ndarray, pred: np.ndarray, lengths: list[int], n_permutations: int,
                           block: int, seed: int = 0) -> np.ndarray:
    """One-sided p-value per voxel of r(y, pred) against block-permuted time courses.

    Within every run, the TR axis of ``y`` is cut into blocks of ``block`` TRs whose order is
    shuffled (blocks keep the BOLD autocorrelation a TR-wise shuffle would destroy).
    p = (1 + #{r_perm ≥ r_obs}) / (1 + n_permutations).
    """
    rng = np.random.default_rng(seed)
    zy = (y - y.mean(0)) / np.where(y.std(0) > 0, y.std(0), 1)
    zp = (pred - pred.mean(0)) / np.where(pred.std(0) > 0, pred.std(0), 1)
    n = y.shape[0]
    r_obs = (zy * zp).sum(0) / n
    edges = np.concatenate([[0], np.cumsum(lengths)])
    run_blocks = [np.array_split(np.arange(a, b), max(1, (b - a) // block)) for a, b in zip(edges[:-1], edges[1:])]
    exceed = np.zeros(y.shape[1], dtype=np.int64)
    for _ in range(n_permutations):
        order = np.concatenate([np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
                                for blocks in run_blocks])
        exceed += ((zy[order] * zp).sum(0) / n >= r_obs)
    return ((1 + exceed) / (1 + n_permutations)).astype(np.float64)


def fdr(p_values: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg adjusted p-values and the mask of discoveries at level ``q``."""
    from scipy.stats import false_discovery_control

    adjusted = false_discovery_control(p_values, method="bh")
    return adjusted, adjusted <= q


# --- the fit -------------------------------------------------------------------------------


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=True)


def cv_predict(designs: list[np.ndarray], ys: list[np.ndarray], groups: np.ndarray, cfg: FitConfig, backend,
               on_fold: Callable[[], None] = lambda: None) -> np.ndarray:
    """Nested LORO: predictions for every run from a model fitted on the other runs."""
    lengths = [len(y) for y in ys]
    preds = []
    for i in range(len(ys)):
        train = [j for j in range(len(ys)) if j != i]
        coef, _ = solve_ridge(np.concatenate([designs[j] for j in train]), np.concatenate([ys[j] for j in train]),
                              loro_splits([lengths[j] for j in train]), groups, cfg, backend)
        preds.append(designs[i] @ coef)
        on_fold()
    return np.concatenate(preds)


def prepare_design(bold_runs: list[np.ndarray], feature_runs: dict[str, list[np.ndarray]], cfg: FitConfig,
                   provenance: dict[str, dict] | None = None):
    """Check run counts/lengths, then build (spaces, per-run designs, banded groups, per-run z-scored BOLD).

    The per-run BOLD arrays are consecutive views of one (T, V) array, ``concat_runs`` returns it uncopied.
    """
    n_runs = len(bold_runs)
    for name, runs in feature_runs.items():
        if len(runs) != n_runs:
            raise FitInputError(f"feature space {name!r} has {len(runs)} runs, BOLD has {n_runs}")
        for i, (x, y) in enumerate(zip(runs, bold_runs)):
            if len(x) != len(y):
                raise FitInputError(f"run {i + 1}: {len(x)} feature rows of space {name!r} for {len(y)} "
                                    "BOLD volumes")
    provenance = provenance or {}
    spaces, transformed = [], []
    for name, runs in feature_runs.items():
        space, zs = prepare_space(name, runs, cfg.pca, provenance.get(name))
        spaces.append(space)
        transformed.append(zs)
    designs = [np.concatenate([delay_run(t[i], cfg.delays) for t in transformed], axis=1) for i in range(n_runs)]
    groups = np.concatenate([np.full(s.out_dim * len(cfg.delays), k) for k, s in enumerate(spaces)])
    # z-score every run straight into its slice of one array: no copy when the runs are concatenated
    edges = np.concatenate([[0], np.cumsum([len(y) for y in bold_runs])])
    y_all = np.empty((int(edges[-1]), bold_runs[0].shape[1]), dtype=np.float32)
    ys = [zscore_run(y, out=y_all[a:b])[0] for y, a, b in zip(bold_runs, edges[:-1], edges[1:])]
    return spaces, designs, groups, ys


def concat_runs(ys: list[np.ndarray]) -> np.ndarray:
    """Runs stacked in time; free when they are the consecutive views ``prepare_design`` makes."""
    base = ys[0].base
    starts_at_base = isinstance(base, np.ndarray) and ys[0].ctypes.data == base.ctypes.data
    if starts_at_base and base.ndim == 2 and len(base) == sum(len(y) for y in ys) and all(y.base is base for y in ys):
        return base
    return np.concatenate(ys)


def fit_encoding(
    bold_runs: list[np.ndarray],
    feature_runs: dict[str, list[np.ndarray]],
    cfg: FitConfig,
    *,
    mask: np.ndarray,
    affine: np.ndarray,
    tr: float,
    provenance: dict[str, dict] | None = None,
    roi_labels: np.ndarray | None = None,
    roi_names: dict[int, str] | None = None,
    atlas: str = "",
    extra_provenance: dict | None = None,
    preprocessing: PreprocessRecord | None = None,
    reference: np.ndarray | None = None,
) -> FitResult:
    """Fit one encoding model on runs of masked BOLD (T_i, V) and raw features {space: [(T_i, d)]}.

    Several spaces are fitted jointly with banded ridge. ``provenance`` maps a space name to its
    model/layer/condition/pooling, checked later against incoming activations. ``preprocessing`` records
    how ``bold_runs`` were cleaned (None = not at all: mode ``none``) and ``reference`` is the (X, Y, Z) mean
    EPI on the fit grid; both go into the weights.
    """
    n_runs = len(bold_runs)
    spaces, designs, groups, ys = prepare_design(bold_runs, feature_runs, cfg, provenance)
    lengths = [len(y) for y in ys]

    result = FitResult(weights=None)  # type: ignore[arg-type]
    scoring = cfg.score and n_runs >= 2
    alpha_cv = "leave-one-run-out" if n_runs >= 3 else f"{CONTIGUOUS_FOLDS} contiguous folds (fewer than 3 runs)"
    if n_runs == 1:  # the method needs runs to hold out: say so instead of writing weights silently
        result.warnings.append(f"one run only: alphas were chosen by {CONTIGUOUS_FOLDS} contiguous folds within "
                               "it, not by leave-one-run-out CV, and no held-out scores exist (fit ≥2 runs for "
                               "scores, ≥3 for leave-one-run-out alphas)")
    with himalaya_backend(cfg.backend, cfg.blas_threads) as backend, _progress(cfg.progress) as progress:
        task = progress.add_task(f"ridge fit ({designs[0].shape[1]} features × {ys[0].shape[1]} voxels)",
                                 total=(n_runs if scoring else 0) + 1)
        if scoring:
            pred = cv_predict(designs, ys, groups, cfg, backend, on_fold=lambda: progress.advance(task))
            y = concat_runs(ys)
            result.cv_pred, result.y = pred.astype(np.float32), y
            r = pearson_r(y, pred)
            # cv_r is a voxel map: stored in the weights file, written as a NIfTI map and averaged by callers
            # (pipelines/batch.py). A voxel whose r is undefined (NaN: its held-out BOLD or prediction is
            # constant, e.g. outside the brain) is stored there as 0, as before, and marked in cv_r_undefined
            # so that ROI summaries can leave it out and count it (encoders.score's rule).
            result.cv_r_undefined = np.isnan(r)
            result.cv_r, result.cv_r2 = np.nan_to_num(r).astype(np.float32), r2_score(y, pred)
        coef, alphas = solve_ridge(np.concatenate(designs), concat_runs(ys), loro_splits(lengths), groups, cfg, backend)
        progress.advance(task)
    if scoring and cfg.n_permutations > 0:
        result.p_values = block_permutation_test(result.y, result.cv_pred, lengths, cfg.n_permutations,
                                                 cfg.permutation_block, cfg.seed)
        result.q_values, result.significant = fdr(result.p_values, cfg.fdr_q)
    repeats = repeated_runs(feature_runs)
    if repeats:
        result.noise_ceiling = noise_ceiling(np.stack([bold_runs[i] for i in repeats[0]]))

    result.weights = EncodingWeights(
        spaces=spaces, delays=list(cfg.delays), coef=coef, alphas=alphas, mask=mask.astype(bool),
        affine=np.asarray(affine, dtype=np.float64), tr=float(tr), roi_labels=roi_labels,
        roi_names=dict(roi_names or {}), atlas=atlas, cv_r=result.cv_r, cv_r2=result.cv_r2,
        provenance={
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_runs": n_runs, "n_trs": lengths, "pca": cfg.pca, "backend": cfg.backend,
            "alphas": [float(a) for a in cfg.alphas], "alpha_cv": alpha_cv,
            "zscore": "per run (fit); pooled train stats (apply)", "warnings": list(result.warnings),
            **(extra_provenance or {}),
        },
        preprocessing=preprocessing if preprocessing is not None else PreprocessRecord(),
        reference=None if reference is None else np.asarray(reference, np.float32),
    )
    return result


def repeated_runs(feature_runs: dict[str, list[np.ndarray]]) -> list[list[int]]:
    """Groups of run indices whose features are identical in every space (the same stimulus shown again)."""
    keys: dict[bytes, list[int]] = {}
    n_runs = len(next(iter(feature_runs.values())))
    for i in range(n_runs):
        key = b"".join(np.ascontiguousarray(runs[i]).tobytes() for runs in feature_runs.values())
        keys.setdefault(key, []).append(i)
    return [idx for idx in keys.values() if len(idx) >= 2]


def partition_variance(bold_runs: list[np.ndarray], space_a: tuple[str, list[np.ndarray]],
                       space_b: tuple[str, list[np.ndarray]], cfg: FitConfig) -> dict[str, np.ndarray]:
    """CV R² of A, B and the banded joint A∪B model, and the variance partition per voxel."""
    (name_a, runs_a), (name_b, runs_b) = space_a, space_b
    if len(bold_runs) < 2:
        raise FitInputError("variance partitioning needs ≥2 runs (scores are leave-one-run-out)")
    r2 = {}
    with himalaya_backend(cfg.backend, cfg.blas_threads) as backend, _progress(cfg.progress) as progress:
        models = (("a", {name_a: runs_a}), ("b", {name_b: runs_b}), ("joint", {name_a: runs_a, name_b: runs_b}))
        task = progress.add_task("variance partitioning (A, B, A∪B)", total=3 * len(bold_runs))
        for key, spaces in models:
            _, designs, groups, ys = prepare_design(bold_runs, spaces, cfg)
            pred = cv_predict(designs, ys, groups, cfg, backend, on_fold=lambda: progress.advance(task))
            r2[key] = r2_score(concat_runs(ys), pred)
    parts = variance_partition(r2["joint"], r2["a"], r2["b"])
    return {"r2_" + k: v for k, v in r2.items()} | parts
