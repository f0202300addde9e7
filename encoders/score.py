"""Pearson r of predicted vs measured series: the one definition, batch and running, and the score rows.

**Rule for an undefined r.** r is undefined — NaN — for a column whose values are all equal in
either series (max == min: a constant prediction or a constant measurement), and for fewer than 2
samples. 0 would claim "no correlation", which a constant series cannot show either way. Every
aggregate over voxels, ROIs or runs leaves NaNs out (``mean_r``) and says how many it left out
(``n_undefined`` in the score rows); a caller that must store a finite value says so where it calls.

The test for a constant column is exact (max == min), not ``variance > 0``: the centred sum of
squares of a constant column such as 0.1 is a rounding residue (~1e-33), which would give an
arbitrary r.

**Score rows** (every per-ROI score written to TSV/JSON or read by ``pipelines.report``): the score
is column ``r``; column ``kind`` (one of ``KINDS``) says what it is an r of.
"""

from __future__ import annotations

import numpy as np

ROI_MEAN = "roi_mean"
VOXEL_MEAN = "voxel_mean"
CV_VOXEL_MEAN = "cv_voxel_mean"
KINDS: dict[str, str] = {
    ROI_MEAN: "r of the ROI-mean predicted vs ROI-mean measured time course",
    CV_VOXEL_MEAN: "mean over the ROI's voxels of each voxel's leave-one-run-out cross-validated r",
    VOXEL_MEAN: "mean over the ROI's voxels of each voxel's r (predicted vs measured)",
}
"""``kind`` of a score row → what its ``r`` is; in the order a report prefers them as a stream's headline."""


def pearson_r(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of measured and predicted series.

    Parameters
    ----------
    y : array of shape (n_samples, n_targets)
        Measured series (e.g. BOLD of each voxel or ROI).
    pred : array of shape (n_samples, n_targets)
        Predicted series.

    Returns
    -------
    r : array of shape (n_targets,)
        Pearson r per target; NaN where either column is constant or ``n_samples < 2`` (module rule).
        Computed in the inputs' floating dtype (float32 inputs give float32).
    """
    y, pred = np.asarray(y), np.asarray(pred)
    if y.shape != pred.shape or y.ndim != 2:
        raise ValueError(f"pearson_r needs two (n_samples, n_targets) arrays of one shape, got {y.shape} and "
                         f"{pred.shape}")
    dtype = np.result_type(y, pred, np.float32)
    if len(y) < 2:
        return np.full(y.shape[1], np.nan, dtype=dtype)
    y = y.astype(dtype, copy=False)
    pred = pred.astype(dtype, copy=False)
    constant = (y.max(0) == y.min(0)) | (pred.max(0) == pred.min(0))
    yc = y - y.mean(0)
    pc = pred - pred.mean(0)
    den = np.sqrt((yc * yc).sum(0) * (pc * pc).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(0) / den
    return np.where(constant | ~(den > 0), np.nan, r).astype(dtype, copy=False)


class RunningPearson:
    """Pearson r per target over paired samples added one at a time (the live scores of a run).

    Keeps sufficient statistics (n, sums, sums of squares and products, min and max), so a score
    costs O(n_targets) per sample; ``r()`` equals ``pearson_r`` of the samples added so far, with the
    same rule for an undefined r, to float64 rounding of the running sums.
    """

    def __init__(self, n_targets: int):
        self.n = 0
        self.sp = np.zeros(n_targets)
        self.sm = np.zeros(n_targets)
        self.spp = np.zeros(n_targets)
        self.smm = np.zeros(n_targets)
        self.spm = np.zeros(n_targets)
        self._lo = [np.full(n_targets, np.inf), np.full(n_targets, np.inf)]  # predicted, measured
        self._hi = [np.full(n_targets, -np.inf), np.full(n_targets, -np.inf)]

    def add(self, pred: np.ndarray, measured: np.ndarray) -> None:
        """One sample: predicted and measured values, each (n_targets,)."""
        p = np.asarray(pred, dtype=np.float64)
        m = np.asarray(measured, dtype=np.float64)
        self.n += 1
        self.sp += p
        self.sm += m
        self.spp += p * p
        self.smm += m * m
        self.spm += p * m
        for x, lo, hi in zip((p, m), self._lo, self._hi):
            np.minimum(lo, x, out=lo)
            np.maximum(hi, x, out=hi)

    def r(self) -> np.ndarray:
        """(n_targets,) r of the samples so far; NaN where undefined (``pearson_r``'s rule)."""
        if self.n < 2:
            return np.full(self.sp.shape, np.nan)
        cov = self.spm - self.sp * self.sm / self.n
        vp = self.spp - self.sp**2 / self.n
        vm = self.smm - self.sm**2 / self.n
        den = np.sqrt(np.clip(vp, 0, None) * np.clip(vm, 0, None))
        constant = (self._hi[0] == self._lo[0]) | (self._hi[1] == self._lo[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(constant | ~(den > 0), np.nan, cov / den)


def mean_r(r: np.ndarray) -> tuple[float, int]:
    """Aggregate of r values (voxels, ROIs or runs): (mean of the defined ones, how many were undefined).

    The mean is NaN when none is defined.
    """
    r = np.asarray(r, dtype=np.float64).ravel()
    defined = np.isfinite(r)
    n_undefined = int(r.size - defined.sum())
    return (float(r[defined].mean()) if defined.any() else float("nan")), n_undefined
