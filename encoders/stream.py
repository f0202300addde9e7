"""Per-TR application of encoding weights: the offline ``EncodingWeights.predict`` one row at a time.

A ring buffer holds the transformed feature rows of the last ``max(delays) + 1`` TRs; the delayed
design row of TR t is assembled from it exactly as ``delay_run`` builds it offline (zeros before
the run start), so streaming and offline predictions agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.motion import PARAM_NAMES
from encoders.preprocess import PreprocessCounts, PreprocessedVolume, Preprocessor, RunningStandardizer, StageTimes
from encoders.register import SessionAlignment, TargetSpace, write_overlay
from encoders.weights import EncodingWeights, roi_table


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
    session (built from ``weights.preprocess`` at the first volume, on that volume's grid and affine), fed
    every measured volume in acquisition order.

    The live GLM is always the causal one (nothing after TR t exists at TR t), whether the weights were
    fitted after ``offline`` (whole-run) or ``causal`` cleaning. The motion reference is the first volume of
    the session (a recorded ``reference: "given"`` falls back to it too). When the weights keep their
    reference volume (``weights.reference``, the fit's mean EPI) and ``align`` is on, that session reference
    is registered to it once (:mod:`encoders.register`) and every volume is resliced onto the weights' grid
    in one interpolation (motion ∘ session→weights); a registration that fails flags the session
    (``alignment.converged`` False) and excludes its volumes, counted (``counts.unaligned``). Without a
    weights reference the session must come on the weights' grid and is assumed in their space."""

    def __init__(self, weights: EncodingWeights, max_trace: int = 4096, align: bool = True):
        config = weights.preprocess
        if config is None:
            raise ValueError("the weights record no preprocessing (mode 'none')")
        if config.reference != "first":
            config = dataclasses.replace(config, reference="first")
        self.config = config
        self.weights = weights
        self.target = (TargetSpace(np.asarray(weights.reference, np.float32), np.asarray(weights.affine, float),
                                   weights.mask) if align and weights.reference is not None else None)
        """The weights' space the session is registered to (None: no weights reference, or ``align`` off)."""
        self.preprocessor: Preprocessor | None = None
        """Built at the first volume, on its affine (None before)."""
        self.session_affine: np.ndarray | None = None
        """(4, 4) the session's voxel → world affine (of its first volume)."""
        self._counts = PreprocessCounts()  # volumes refused before the preprocessor exists
        self.trace: deque[LiveVolumeQC] = deque(maxlen=max_trace)
        """The last ``max_trace`` volumes' QC, oldest first."""
        self.excluded = 0
        """Volumes not scored (the reasons are counted in :attr:`counts`; one volume can have several)."""
        self._mask_idx = np.flatnonzero(weights.mask)
        self._tsnr = None  # running mean / SD of the realigned signal per weights voxel (RunningStandardizer)

    @property
    def aligns(self) -> bool:
        """Volumes are registered to and resliced into the weights' space (they may come on any grid)."""
        return self.target is not None

    @property
    def alignment(self) -> SessionAlignment | None:
        """The session's registration to the weights' space (None before the session reference, or without)."""
        return None if self.preprocessor is None else self.preprocessor.motion.alignment

    @property
    def session_reference(self) -> np.ndarray | None:
        """(X', Y', Z') the session's motion reference on its own grid (with a target, once known)."""
        return None if self.preprocessor is None else self.preprocessor.motion.session_reference

    @property
    def counts(self) -> PreprocessCounts:
        """Volumes seen and why volumes were not scored (typed counters: fd, dvars, not_converged, unaligned,
        warmup, …)."""
        return self._counts if self.preprocessor is None else self.preprocessor.counts

    def push(self, tr_index: int, volume: np.ndarray, t_s: float, affine: np.ndarray | None = None
             ) -> PreprocessedVolume:
        """Preprocess one (X, Y, Z) volume (``affine`` (4, 4) its voxel → world map; None = the weights');
        ``.data`` (n_voxels,) follows the weights' mask order. Never raises for a bad volume: a volume on
        another grid than the session's first (shape or affine) comes back excluded, counted as bad_shape."""
        aff = np.asarray(self.weights.affine if affine is None else affine, float).reshape(4, 4)
        if self.preprocessor is None:
            if self.target is None and (np.shape(volume) != self.weights.mask.shape
                                        or not np.allclose(aff, self.weights.affine, atol=1e-3)):
                out = self._refuse(volume, t_s, "not on the weights' grid, and the weights keep no reference "
                                                "volume to register the session to")
                return self._record(tr_index, out)
            self.session_affine = aff
            self.preprocessor = Preprocessor(self.config, aff, mask=self.weights.mask, target=self.target)
            self.preprocessor.counts.volumes += self._counts.volumes
            self.preprocessor.counts.bad_shape += self._counts.bad_shape
        elif not np.allclose(aff, self.session_affine, atol=1e-3):
            out = self._refuse(volume, t_s, "affine differs from the session's first volume's")
            return self._record(tr_index, out)
        out = self.preprocessor.push(volume, t_s)
        return self._record(tr_index, out)

    def _refuse(self, volume: np.ndarray, t_s: float, reason: str) -> PreprocessedVolume:
        counts = self.counts
        counts.volumes += 1
        counts.bad_shape += 1
        n = len(self._mask_idx)
        return PreprocessedVolume(-1, float(t_s), np.full(n, np.nan, np.float32), np.full(6, np.nan), np.nan,
                                  np.nan, np.nan, False, True, f"shape {np.shape(volume)}: {reason}", StageTimes())

    def _record(self, tr_index: int, out: PreprocessedVolume) -> PreprocessedVolume:
        self.excluded += int(out.excluded)
        if out.realigned is not None and out.reason in ("", "warm-up"):  # tSNR of the realigned signal
            if self._tsnr is None:
                self._tsnr = RunningStandardizer(len(self._mask_idx))
            self._tsnr.add(out.realigned.ravel()[self._mask_idx].astype(np.float64))
        self.trace.append(LiveVolumeQC(tr_index, np.asarray(out.params, np.float64).copy(), float(out.fd),
                                       float(out.std_dvars), bool(out.excluded), out.reason,
                                       float(out.timings.total_ms)))
        return out

    def tsnr(self) -> np.ndarray:
        """(n_voxels,) temporal SNR (mean / SD over the volumes realigned and not censored) per weights voxel;
        NaN before two volumes or where the SD is 0."""
        n = len(self._mask_idx)
        if self._tsnr is None or self._tsnr.count < 2:
            return np.full(n, np.nan)
        sd = np.sqrt(self._tsnr._m2 / (self._tsnr.count - 1))
        return np.divide(self._tsnr.mean, sd, out=np.full(n, np.nan), where=sd > 0)

    def tsnr_rows(self) -> list[dict]:
        """Per ROI of the weights ('all' first): voxels, volumes, median and mean tSNR."""
        tsnr = self.tsnr()
        n = 0 if self._tsnr is None else self._tsnr.count
        rows = []
        for name, idx in roi_table(self.weights):
            v = tsnr[idx]
            v = v[np.isfinite(v)]
            rows.append({"roi": name, "n_voxels": len(idx), "n_volumes": n,
                         "tsnr_median": float(np.median(v)) if v.size else float("nan"),
                         "tsnr_mean": float(v.mean()) if v.size else float("nan")})
        return rows

    def qc_rows(self) -> list[dict]:
        """Per volume of :attr:`trace`: tr_index, trans_x … rot_z (fMRIPrep's names and units),
        framewise_displacement, std_dvars, excluded (0/1), reason, preprocess_ms."""
        return [{"tr_index": q.tr_index, **{k: float(v) for k, v in zip(PARAM_NAMES, q.params)},
                 "framewise_displacement": q.fd, "std_dvars": q.std_dvars, "excluded": int(q.excluded),
                 "reason": q.reason, "preprocess_ms": q.preprocess_ms} for q in self.trace]

    def write_overlay(self, out_dir: str | Path, stem: str) -> Path | None:
        """``<stem>_alignment.png`` in ``out_dir``: the weights' reference with the aligned session reference
        as contours (:func:`encoders.register.write_overlay`); its path also goes into ``alignment.overlay``.
        None before the session reference (or without a target)."""
        al = self.alignment
        if self.target is None or al is None:
            return None
        return write_overlay(Path(out_dir) / f"{stem}_alignment.png", self.target, self.session_reference,
                             self.session_affine, al, title=stem)

    def write_qc(self, out_dir: str | Path, stem: str) -> list[Path]:
        """``<stem>_motion.tsv`` (:meth:`qc_rows`), ``<stem>_tsnr.tsv`` (:meth:`tsnr_rows`) and, with a target,
        ``<stem>_alignment.json`` (:meth:`encoders.register.SessionAlignment.to_dict` + counts) and
        ``<stem>_alignment.png`` (:func:`encoders.register.write_overlay`). Returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, rows in (("motion", self.qc_rows()), ("tsnr", self.tsnr_rows())):
            if rows:
                path = out / f"{stem}_{name}.tsv"
                cols = list(rows[0])
                path.write_text("\t".join(cols) + "\n" + "".join(
                    "\t".join(("n/a" if not np.isfinite(r[c]) else f"{r[c]:.6g}") if isinstance(r[c], float)
                              else str(r[c]) for c in cols) + "\n" for r in rows))
                written.append(path)
        al = self.alignment
        if self.target is not None and al is not None:
            png = self.write_overlay(out, stem)
            info = {**al.to_dict(), "overlay": png.name, "session_affine": [float(v) for v in self.session_affine.ravel()],
                    "weights_affine": [float(v) for v in np.asarray(self.weights.affine).ravel()],
                    "session_shape": list(np.shape(self.session_reference)),
                    "weights_shape": list(self.weights.mask.shape),
                    "counts": dataclasses.asdict(self.counts)}
            path = out / f"{stem}_alignment.json"
            path.write_text(json.dumps(info, indent=2))
            written += [png, path]
        return written
