"""Per-TR application of encoding weights: the offline ``EncodingWeights.predict`` one row at a time.

A ring buffer holds the transformed feature rows of the last ``max(delays) + 1`` TRs; the delayed
design row of TR t is assembled from it exactly as ``delay_run`` builds it offline (zeros before
the run start), so streaming and offline predictions agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np

from encoders.preprocess import PreprocessCounts, PreprocessedVolume, Preprocessor
from encoders.weights import EncodingWeights


class OnlinePredictor:
    """Feed raw rows TR by TR (``push``), get that TR's predicted BOLD (n_voxels,) back."""

    def __init__(self, weights: EncodingWeights, device: str = "cpu", pool: np.ndarray | None = None):
        """``device``: "cpu" (numpy) or a torch device such as "cuda": the coefficients then live on the
        accelerator and only the design row (KBs) goes up and the prediction (4 B/voxel) comes back.
        ``pool``: optional (n_voxels, k) matrix applied to every prediction where it is computed
        (e.g. ROI averaging); the result of the last push is ``last_pooled``."""
        self.weights = weights
        self.device = device
        self._coef_t = None
        self._pool = None if pool is None else np.ascontiguousarray(pool, dtype=np.float32)
        self.last_pooled: np.ndarray | None = None
        if device != "cpu":
            import torch

            self._torch = torch
            self._coef_t = torch.as_tensor(weights.coef, device=device)
            self._pool_t = None if pool is None else torch.as_tensor(self._pool, device=device)
        self.delays = list(weights.delays)
        self.depth = max(self.delays) + 1
        self._dims = [s.out_dim for s in weights.spaces]
        self._ring = [np.zeros((self.depth, d), dtype=np.float32) for d in self._dims]
        # preallocated design row: space-major, then delay-major (EncodingWeights column order)
        self._row = np.zeros((1, weights.n_features_in), dtype=np.float32)
        self._slices = []
        start = 0
        for d in self._dims:
            self._slices.append([slice(start + k * d, start + (k + 1) * d) for k in range(len(self.delays))])
            start += d * len(self.delays)
        self.t = -1
        """Index of the newest TR pushed (-1 = none)."""

    def reset(self) -> None:
        """Start a new run (the delay buffer is zero-filled again)."""
        for r in self._ring:
            r[:] = 0
        self.t = -1

    def push(self, rows: list[np.ndarray]) -> np.ndarray:
        """Add the raw feature rows (one per space) of the next TR; return its prediction (n_voxels,)."""
        if len(rows) != len(self._ring):
            raise ValueError(f"expected {len(self._ring)} feature rows (one per space), got {len(rows)}")
        self.t += 1
        slot = self.t % self.depth
        for space, ring, row in zip(self.weights.spaces, self._ring, rows):
            ring[slot] = space.transform(np.asarray(row).reshape(1, -1))[0]
        for ring, slices in zip(self._ring, self._slices):
            for lag, sl in zip(self.delays, slices):
                self._row[0, sl] = ring[(self.t - lag) % self.depth] if self.t - lag >= 0 else 0.0
        if self._coef_t is None:
            pred = (self._row @ self.weights.coef)[0]
            self.last_pooled = None if self._pool is None else pred @ self._pool
            return pred
        pred_t = (self._torch.from_numpy(self._row).to(self.device) @ self._coef_t)[0]
        self.last_pooled = None if self._pool_t is None else (pred_t @ self._pool_t).cpu().numpy()
        return pred_t.cpu().numpy()


@dataclass(frozen=True)
class LiveVolumeQC:
    """What the live preprocessing did to one measured volume (for a dashboard: motion trace, FD, time)."""

    tr_index: int
    params: np.ndarray
    """(6,) trans_x/y/z mm, rot_x/y/z radians relative to the session's motion reference."""
    fd: float
    """Framewise displacement, mm (NaN when the volume was not processed)."""
    std_dvars: float
    """DVARS relative to the usual DVARS so far (NaN early)."""
    excluded: bool
    """Not scored (censored, warm-up or unusable)."""
    reason: str
    """Why it was excluded ("" when scored)."""
    preprocess_ms: float
    """Wall time of the whole preprocessing of this volume, ms."""


class LivePreprocess:
    """The weights' recorded preprocessing applied live: ONE :class:`encoders.preprocess.Preprocessor` per
    session (built from ``weights.preprocess``, on the weights' affine and mask), fed every measured volume
    in acquisition order.

    The live GLM is always the causal one (nothing after TR t exists at TR t), whether the weights were
    fitted after ``offline`` (whole-run) or ``causal`` cleaning. The motion reference is the first volume of
    the session (a recorded ``reference: "given"`` falls back to it too); registering that session
    reference to the weights' mean EPI (``weights.reference``) is a later step, so for now the session is
    assumed to start on the fit's grid and head position."""

    def __init__(self, weights: EncodingWeights, max_trace: int = 4096):
        config = weights.preprocess
        if config is None:
            raise ValueError("the weights record no preprocessing (mode 'none')")
        if config.reference != "first":
            config = dataclasses.replace(config, reference="first")
        self.config = config
        self.preprocessor = Preprocessor(config, weights.affine, mask=weights.mask)
        self.trace: deque[LiveVolumeQC] = deque(maxlen=max_trace)
        """The last ``max_trace`` volumes' QC, oldest first."""
        self.excluded = 0
        """Volumes not scored (the reasons are counted in :attr:`counts`; one volume can have several)."""

    @property
    def counts(self) -> PreprocessCounts:
        """Volumes seen and why volumes were not scored (typed counters: fd, dvars, not_converged, warmup, …)."""
        return self.preprocessor.counts

    def push(self, tr_index: int, volume: np.ndarray, t_s: float) -> PreprocessedVolume:
        """Preprocess one (X, Y, Z) volume; ``.data`` (n_voxels,) follows the weights' mask order."""
        out = self.preprocessor.push(volume, t_s)
        self.excluded += int(out.excluded)
        self.trace.append(LiveVolumeQC(tr_index, np.asarray(out.params, np.float64).copy(), float(out.fd),
                                       float(out.std_dvars), bool(out.excluded), out.reason,
                                       float(out.timings.total_ms)))
        return out
