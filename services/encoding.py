"""Encoding service: activations + BOLD in, per-TR predictions and running scores out.

``EncodingCore`` is the whole per-TR logic as a plain class (no sockets): tests and the replay
product call it directly. ``run_encoding_service`` is the thin ZMQ layer around it:

    agents' PUB (Activation) ─┐
    scanner PUB (Trigger)   ──┼─ SUB ─► EncodingCore ─► PUB (Prediction, TOPIC_PREDICTION)
    scanner PUB (BoldVolume) ─┘                       └► at the end: predicted 4D NIfTI + scores TSV

Per TR t: the feature row is the mean of the decisions whose newest frame was shown during TR t
(``encoders/align.py``); it closes ``grace_s`` after trigger t+1 (activations lag the frames),
goes through the fit's preprocessing and the delay ring buffer (``encoders/stream.py``), and
the prediction for TR t is published; measured volume t updates the running Pearson r per ROI
(ROI-mean time courses) and per voxel as soon as both exist, and is re-published with it.

Bad input never stops the service: a malformed message, an activation from another model /
layer / condition / dimension, a volume of the wrong shape each raise ``InputError`` inside the
core; the loop counts it by kind, logs the first of each kind clearly, and goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.align import TrAligner
from encoders.preprocess import PreprocessCounts
from encoders.score import ROI_MEAN, VOXEL_MEAN, RunningPearson, mean_r
from encoders.stream import LivePreprocess, OnlinePredictor
from encoders.weights import EncodingWeights, WeightsError, roi_table
from protocols import Activation, BoldVolume, Prediction, Trigger, VolumeQuality
from services.plumbing.security import CurveConfig, ServerSecurity, check_bind, check_connect, secure_connect

log = logging.getLogger("neuroarcade.encoding")


class InputError(ValueError):
    """An input the core rejects; ``kind`` names the counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class CoreConfig:
    """Options of the per-TR core."""

    agent_id: str = ""
    """Only this agent's activations ('' = the first agent whose activations match the weights)."""
    grace_s: float = 0.5
    """TR t closes this long after trigger t+1, so activations of its last frames can arrive."""
    tr_s: float | None = None
    """Actual TR of the stream (default: the weights' TR); a time-compressed simulation sets it."""
    send_voxels: bool = False
    """Attach the whole-mask prediction (float32) to every Prediction message."""
    device: str = "cpu"
    """Where the per-TR matrix product runs: "cpu" (numpy) or a torch device ("cuda")."""
    max_pending_volumes: int = 64
    """Measured volumes kept while waiting for their prediction (older ones are dropped)."""
    ignore_sibling_streams: bool = False
    """Count (not reject) activations of the weights' model under another prompt condition or pooling:
    set it when the followed agent publishes several conditions/poolings on one socket."""
    preprocess: bool = True
    """Apply the preprocessing the weights record (mode ``none``: nothing to apply); False forces it off
    (comparisons only: the weights' scores then do not mean what the fit meant)."""
    align: bool = True
    """With the preprocessing on and a reference volume in the weights: register the session's reference to it
    once and reslice every volume into the weights' space (``encoders.register``). False: the session is taken
    to be in the weights' space already (it must then come on their grid)."""


class EncodingCore:
    """Per-TR encoding logic for one agent's feature stream(s) against one BOLD run."""

    def __init__(self, weights: EncodingWeights, cfg: CoreConfig | None = None):
        self.weights = weights
        self.cfg = cfg or CoreConfig()
        self.tr_ns = int(round((self.cfg.tr_s or weights.tr) * 1e9))
        self.aligners = [TrAligner(dim=s.dim, tr_ns=self.tr_ns, fill_value=s.mean) for s in weights.spaces]
        self.rois = roi_table(weights)
        self.roi_names = [name for name, _ in self.rois]
        # ROI averaging as one (n_voxels, n_rois) matrix: applied where the prediction is computed (on the
        # GPU too), so only n_rois numbers are added per TR; 'all' (every masked voxel) is column 0
        self._pool = np.zeros((weights.n_voxels, len(self.rois)), dtype=np.float32)
        for k, (_, idx) in enumerate(self.rois):
            self._pool[idx, k] = 1.0 / max(len(idx), 1)
        self.predictor = OnlinePredictor(weights, device=self.cfg.device, pool=self._pool)
        self.agent_id = self.cfg.agent_id
        self.triggers: dict[int, int] = {}
        self.predictions: dict[int, np.ndarray] = {}
        self.roi_predicted: dict[int, np.ndarray] = {}
        self.roi_measured: dict[int, np.ndarray] = {}
        self._pending_volumes: dict[int, np.ndarray] = {}
        self._scored: set[int] = set()
        self.roi_scores = RunningPearson(len(self.rois))
        self.voxel_scores = RunningPearson(weights.n_voxels)
        self.errors: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.preprocess = (LivePreprocess(weights, align=self.cfg.align)
                           if self.cfg.preprocess and weights.preprocess_mode != "none" else None)
        """The weights' preprocessing applied to every measured volume (None: volumes scored as they come)."""
        self.excluded_trs: set[int] = set()
        """Measured TRs the preprocessing excluded (not scored; reasons in ``preprocess.counts``)."""
        self.ignored = 0
        """Activations of the same model under another prompt condition or pooling (not for these weights)."""

    @property
    def pending_volumes(self) -> int:
        """Measured volumes waiting for their prediction (at most ``max_pending_volumes``)."""
        return len(self._pending_volumes)

    # --- inputs -----------------------------------------------------------------------------
    def reject(self, err: InputError) -> None:
        """Count a rejected input; log the first of each kind (callers keep going)."""
        self.errors[err.kind] += 1
        if err.kind not in self.first_error:
            self.first_error[err.kind] = str(err)
            log.error("encoding: rejected %s: %s", err.kind, err)

    def on_trigger(self, tr_index: int, t_ns: int) -> None:
        if tr_index < 0:
            raise InputError("bad_trigger", f"trigger with negative TR index {tr_index}")
        self.triggers[tr_index] = t_ns
        for a in self.aligners:
            a.add_trigger(tr_index, t_ns)

    def on_activation(self, act: Activation) -> None:
        """Route one decision's vector to the feature space it belongs to (raises InputError)."""
        if self.agent_id and act.agent_id != self.agent_id:
            raise InputError("other_agent", f"activation from agent {act.agent_id!r}; this core follows "
                                             f"{self.agent_id!r}")
        vectors = np.asarray(act.vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(act.layers):
            raise InputError("bad_activation", f"vectors of shape {vectors.shape} for layers {act.layers} "
                                               "(expected (len(layers), dim))")
        spaces = self.weights.spaces
        if self.cfg.ignore_sibling_streams and all(not sp.model or sp.model == act.model for sp in spaces) and all(
                (sp.condition and sp.condition != act.condition) or (sp.pooling and sp.pooling != act.pooling)
                for sp in spaces):
            # the same model's other prompt condition or pooling (agents publish all of theirs): not an error
            self.ignored += 1
            return
        problems = []
        for space, aligner in zip(self.weights.spaces, self.aligners):
            try:
                row = space.check_provenance(model=act.model, layer_list=list(act.layers), condition=act.condition,
                                             pooling=act.pooling)
            except WeightsError as e:
                problems.append(str(e))
                continue
            if row is None and vectors.shape[0] != 1:
                problems.append(f"space {space.name!r} names no layer but the activation has {vectors.shape[0]}")
                continue
            vec = vectors[row or 0]
            if vec.shape[0] != space.dim:
                raise InputError("feature_mismatch", f"activation of dim {vec.shape[0]} from {act.model!r} "
                                 f"layer {act.layers[row or 0]}, but weights space {space.name!r} was fitted on "
                                 f"dim {space.dim}")
            if not np.all(np.isfinite(vec)):
                raise InputError("bad_activation", f"non-finite values in activation from {act.agent_id!r}")
            if not self.agent_id:
                self.agent_id = act.agent_id
            aligner.add(vec, act.frame_t_ns)
            return
        raise InputError("feature_mismatch", f"activation from agent {act.agent_id!r} matches no feature space "
                                             "of the weights: " + " | ".join(problems))

    def on_volume(self, tr_index: int, data: np.ndarray, affine=None) -> list[Prediction]:
        """A measured volume (``affine``: its 4×4 voxel → world map, row-major 16 numbers or (4, 4); None = the
        weights'); returns a Prediction update if its prediction already exists. When the preprocessing aligns
        the session to the weights' space (the weights keep a reference volume), the volume may come on any
        grid: it is registered and resliced there."""
        data = np.asarray(data)
        if self.preprocess is not None and self.preprocess.aligns:
            if data.ndim != 3:
                raise InputError("wrong_shape", f"BOLD volume {tr_index} has shape {data.shape}, not a 3-D volume")
            if not np.all(np.isfinite(data)):
                raise InputError("bad_volume", f"BOLD volume {tr_index} has non-finite values")
            aff = None if affine is None else np.asarray(affine, float).reshape(4, 4)
            out = self.preprocess.push(tr_index, data, tr_index * self.tr_ns / 1e9, aff)
            if out.excluded:
                self.excluded_trs.add(tr_index)
                return []
            return self._measured(tr_index, out.data)
        if data.shape != self.weights.mask.shape:
            raise InputError("wrong_shape", f"BOLD volume {tr_index} has shape {data.shape}, the weights were "
                                            f"fitted on grid {self.weights.mask.shape}")
        masked = data[self.weights.mask].astype(np.float32)
        if not np.all(np.isfinite(masked)):
            raise InputError("bad_volume", f"BOLD volume {tr_index} has non-finite values in the mask")
        if self.preprocess is not None:  # the full 3-D volume: realignment needs it
            out = self.preprocess.push(tr_index, data, tr_index * self.tr_ns / 1e9)
            if out.excluded:
                self.excluded_trs.add(tr_index)
                return []
            masked = out.data
        return self._measured(tr_index, masked)

    def _measured(self, tr_index: int, masked: np.ndarray) -> list[Prediction]:
        """Measured voxels (n_voxels,) of TR ``tr_index``, ready to score."""
        self.roi_measured[tr_index] = (masked @ self._pool).astype(np.float64)
        if tr_index in self.predictions:
            return [self._score(tr_index, masked)]
        self._pending_volumes[tr_index] = masked
        while len(self._pending_volumes) > self.cfg.max_pending_volumes:
            self._pending_volumes.pop(min(self._pending_volumes))
        return []

    # --- TR closing -------------------------------------------------------------------------
    def close_through(self, t_last: int) -> list[Prediction]:
        """Close TRs up to ``t_last``: build rows, predict, publish (and score if measured)."""
        out = []
        for t in range(self.predictor.t + 1, t_last + 1):
            rows = [a.close(t) for a in self.aligners]
            self.predictions[t] = np.asarray(self.predictor.push(rows), dtype=np.float32)
            self.roi_predicted[t] = self.predictor.last_pooled.astype(np.float64)
            masked = self._pending_volumes.pop(t, None)
            out.append(self._score(t, masked) if masked is not None else self._message(t))
        return out

    def tick(self, now_ns: int) -> list[Prediction]:
        """Close every TR whose next trigger is at least ``grace_s`` old."""
        grace = int(self.cfg.grace_s * 1e9)
        t = self.predictor.t + 1
        while t + 1 in self.triggers and now_ns - self.triggers[t + 1] >= grace:
            t += 1
        return self.close_through(t - 1)

    def run_complete(self, n_trs: int, now_ns: int) -> bool:
        """True once TRs 0..n_trs-1 all have a measured volume and TR n_trs-1 ended ``grace_s`` ago."""
        last = self.triggers.get(n_trs - 1)
        return (last is not None and all(t in self.roi_measured or t in self.excluded_trs for t in range(n_trs))
                and now_ns - last >= self.tr_ns + int(self.cfg.grace_s * 1e9))

    def finish(self) -> list[Prediction]:
        """End of run: close every TR that had a trigger."""
        return self.close_through(max(self.triggers, default=-1))

    # --- outputs ----------------------------------------------------------------------------
    def _score(self, t: int, masked: np.ndarray) -> Prediction:
        if t not in self._scored:
            self._scored.add(t)
            self.roi_scores.add(self.roi_predicted[t], self.roi_measured[t])
            self.voxel_scores.add(self.predictions[t], masked)
        return self._message(t)

    def _message(self, t: int) -> Prediction:
        conditions = "+".join(s.condition or s.name for s in self.weights.spaces)
        return Prediction(
            agent_id=self.agent_id, condition=conditions, tr_index=t, t_ns=time.monotonic_ns(),
            roi_names=self.roi_names, roi_predicted=[float(x) for x in self.roi_predicted[t]],
            roi_measured=[float(x) for x in self.roi_measured[t]] if t in self.roi_measured else [],
            roi_scores=[_finite(x) for x in self.roi_scores.r()],
            voxels=self.predictions[t] if self.cfg.send_voxels else None,
        )

    def volume_quality(self, tr_index: int, process_ms: float, overlay_png: bytes = b"") -> VolumeQuality:
        """What the preprocessing did with measured volume ``tr_index`` (motion, FD, exclusion, time) and the
        session's registration to the weights' space (``overlay_png``: the overlay, given once), for sinks."""
        qc = self.preprocess.trace[-1] if self.preprocess is not None and self.preprocess.trace else None
        qc = qc if qc is not None and qc.tr_index == tr_index else None
        reg = self.registration()
        if reg is not None:
            text = (f"aligned: {reg['translation_mm']:.2f} mm, {reg['rotation_deg']:.2f}°, match r "
                    f"{reg['match_r'] if reg['match_r'] is not None else float('nan'):.3f}" if reg["converged"]
                    else f"NOT aligned: {reg['reason']}")
        elif self.preprocess is not None and not self.preprocess.aligns:  # never: say why
            text = ("not registered: " + ("alignment off" if not self.cfg.align else "the weights keep no reference "
                                          "volume") + " (volumes taken to be in the weights' space)")
        else:
            text = ""
        nan = float("nan")
        return VolumeQuality(
            aligned=-1 if reg is None else int(bool(reg["converged"])), registration=text,
            align_mm=nan if reg is None or not reg["converged"] else float(reg["translation_mm"]),
            align_deg=nan if reg is None or not reg["converged"] else float(reg["rotation_deg"]),
            align_match_r=nan if reg is None or reg["match_r"] is None else float(reg["match_r"]),
            overlay_png=overlay_png,
            agent_id=self.agent_id, condition="+".join(s.condition or s.name for s in self.weights.spaces),
            tr_index=tr_index, t_ns=time.monotonic_ns(),
            params=[float(x) for x in qc.params] if qc is not None else [],
            fd_mm=qc.fd if qc is not None else float("nan"), std_dvars=qc.std_dvars if qc is not None else float("nan"),
            excluded=tr_index in self.excluded_trs, reason=qc.reason if qc is not None else "",
            excluded_total=len(self.excluded_trs), volumes=len(self.roi_measured) + len(self.excluded_trs),
            preprocess_ms=qc.preprocess_ms if qc is not None else float("nan"), process_ms=float(process_ms))

    def predicted_array(self) -> np.ndarray:
        """(n_trs, n_voxels) predictions of TRs 0..last closed."""
        return np.stack([self.predictions[t] for t in range(self.predictor.t + 1)]) if self.predictions else \
            np.zeros((0, self.weights.n_voxels), dtype=np.float32)

    def scores_rows(self) -> list[dict]:
        """Two score rows per ROI (``encoders.score``): ``kind`` roi_mean, the running r of the ROI-mean time
        courses, and voxel_mean, the mean of the ROI's per-voxel running r; ``n_undefined`` counts the
        series whose r is undefined (left out of the mean)."""
        voxel_r = self.voxel_scores.r()
        roi_r = self.roi_scores.r()
        rows = []
        for i, (name, idx) in enumerate(self.rois):
            mean, n_undefined = mean_r(voxel_r[idx])
            common = {"roi": name, "n_voxels": len(idx), "n_trs": self.roi_scores.n}
            rows.append({**common, "kind": ROI_MEAN, "r": _finite(roi_r[i]), "n_undefined": int(np.isnan(roi_r[i]))})
            rows.append({**common, "kind": VOXEL_MEAN, "r": _finite(mean), "n_undefined": n_undefined})
        return rows

    def registration(self) -> dict | None:
        """The session's registration to the weights' space (``SessionAlignment.to_dict()``: converged, reason,
        trans_mm, rot_deg, match_r, overlay path once written), or None (no preprocessing, no weights reference,
        or no volume yet)."""
        al = self.preprocess.alignment if self.preprocess is not None else None
        return None if al is None else al.to_dict()

    def write_qc(self, out_dir: str | Path, stem: str = "encoding") -> list[Path]:
        """The preprocessing's per-volume QC beside the scores (``LivePreprocess.write_qc``: ``<stem>_motion.tsv``,
        ``<stem>_tsnr.tsv``, ``<stem>_alignment.json`` + ``.png``); nothing without preprocessing."""
        return [] if self.preprocess is None else self.preprocess.write_qc(out_dir, stem)

    def write_outputs(self, out_dir: str | Path, stem: str = "encoding") -> tuple[Path, Path]:
        """Write ``<stem>_pred.nii.gz`` (4D, zeros outside the mask) and ``<stem>_scores.tsv``."""
        import nibabel as nib

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vol = self.weights.to_volume(self.predicted_array())
        img = nib.Nifti1Image(vol, self.weights.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = self.weights.tr
        nii = out_dir / f"{stem}_pred.nii.gz"
        nib.save(img, nii)
        tsv = out_dir / f"{stem}_scores.tsv"
        rows = self.scores_rows()
        cols = list(rows[0])
        tsv.write_text("\t".join(cols) + "\n" + "".join(
            "\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + "\n" for r in rows))
        return nii, tsv


def _finite(x) -> float:
    x = float(x)
    return x if np.isfinite(x) else float("nan")


_OVERLAY_LOCK = threading.Lock()
"""matplotlib's pyplot is not thread-safe: encoding services running as threads of one process draw in turn."""


def _draw_overlay(core: EncodingCore, out_dir: str, stem: str) -> bytes:
    """Draw the alignment overlay (``<out_dir>/<stem>_alignment.png``; a temporary file when ``out_dir`` is '')
    and return it for the wire: colours quantized, at most 1100 px wide, halved until it fits
    ``OVERLAY_MAX_BYTES`` (b"" if it never does)."""
    import io
    import tempfile

    from PIL import Image

    from protocols.messages import OVERLAY_MAX_BYTES

    with _OVERLAY_LOCK, tempfile.TemporaryDirectory() as tmp:
        path = core.preprocess.write_overlay(out_dir or tmp, stem)
        if not out_dir:
            core.preprocess.alignment.overlay = ""  # the temporary file is gone when this returns
        img = Image.open(path).convert("RGB")
        img.load()
    width = min(img.width, 1100)
    while width >= 200:
        small = img if width == img.width else img.resize((width, max(1, round(img.height * width / img.width))),
                                                          Image.LANCZOS)
        buf = io.BytesIO()
        small.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= OVERLAY_MAX_BYTES:
            return buf.getvalue()
        width //= 2
    return b""


# --- the ZMQ layer ----------------------------------------------------------------------------


@dataclass
class EncodingServiceConfig:
    """Sockets and run control of the encoding service."""

    weights: str
    """Weights file written by `neuroarcade fit`."""
    activations: list[str] = field(default_factory=list)
    """Agent PUB endpoints to subscribe to (Activation)."""
    bold: list[str] = field(default_factory=list)
    """Scanner PUB endpoints (BoldVolume and/or Trigger)."""
    predictions: str = ""
    """PUB endpoint to bind for Prediction messages ('' = do not publish)."""
    out_dir: str = ""
    """Where to write the predicted 4D NIfTI and the scores TSV at the end ('' = nowhere)."""
    out_stem: str = "encoding"
    """File stem of those outputs (``<stem>_pred.nii.gz``, ``<stem>_scores.tsv``)."""
    n_trs: int | None = None
    """Stop once this many TRs are predicted and scored (None = run until stopped)."""
    idle_timeout_s: float | None = None
    """Stop after this long without any message (None = never)."""
    core: CoreConfig = field(default_factory=CoreConfig)
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (None = off; 0 = any free port)."""
    status_s: float = 1.0
    """Publish a Status (topic ``heartbeat``) on the prediction PUB this often."""
    keep_stamps: int = 0
    """Keep receipt time stamps of the last N activations and volumes, for ``bench e2e`` (0 = none)."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE keys: our key pair, the agents' and scanner's public keys (as client) and the allow-list
    of subscribers to our prediction PUB (as server). Required when any endpoint is off loopback."""


@dataclass
class EncodingServiceReport:
    """What a finished service run did (returned and logged)."""

    trs_predicted: int
    trs_scored: int
    errors: dict[str, int]
    first_errors: dict[str, str]
    scores: list[dict]
    outputs: list[str]
    received: int
    rejected_messages: int
    alignment: dict[str, dict[str, int]]
    """Per feature space: decisions, before_scan, late, empty_trs (encoders.align.AlignCounts)."""
    stamps: list[tuple[str, str, int, int]] = field(default_factory=list)
    """``(kind, agent_id, frame seq or TR index, receipt monotonic ns)`` of the last ``keep_stamps`` inputs."""
    preprocess: PreprocessCounts | None = None
    """Volumes the weights' preprocessing saw and why it excluded some (None: the weights record none)."""
    registration: dict | None = None
    """The session's registration to the weights' space (``EncodingCore.registration``: converged, reason,
    trans_mm, rot_deg, match_r, ``overlay`` PNG path); None without one."""
    excluded_trs: list[int] = field(default_factory=list)
    """Measured TRs the preprocessing excluded (not scored)."""
    preprocess_ms: list[float] = field(default_factory=list)
    """Wall time of the preprocessing of each measured volume (the last 4096), ms, in arrival order (the first
    one includes the session's registration to the weights' space)."""


def run_encoding_service(cfg: EncodingServiceConfig, stop: threading.Event | None = None, ctx=None,
                         ready: threading.Event | None = None) -> EncodingServiceReport:
    """Run until ``stop`` / ``n_trs`` / idle timeout; the weights are loaded before any socket opens."""
    import zmq

    from protocols import Decoder
    from protocols import Status
    from services.plumbing.transport import (TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_HEARTBEAT, TOPIC_PREDICTION, TOPIC_QUALITY,
                                    TOPIC_TRIGGER,
                                    Channel, make_socket, split_topic)

    stop = stop or threading.Event()
    for ep in [*cfg.activations, *cfg.bold]:  # exposed endpoints without keys: refused before any work
        check_connect(ep, cfg.curve)
    if cfg.predictions:
        check_bind(cfg.predictions, cfg.curve)
    core = EncodingCore(EncodingWeights.load(cfg.weights), cfg.core)
    ctx = ctx or zmq.Context.instance()
    security = ServerSecurity(ctx, cfg.curve) if cfg.predictions else None
    sub = make_socket(ctx, zmq.SUB, hwm=10_000)
    for topic in (TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_TRIGGER):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    for ep in [*cfg.activations, *cfg.bold]:
        secure_connect(sub, ep, cfg.curve)
    inbox = Channel(sub, Decoder(accept=[Activation, BoldVolume, Trigger]))
    pub = None
    if cfg.predictions:
        pub = Channel(make_socket(ctx, zmq.PUB))
        try:
            security.bind(pub.sock, cfg.predictions)
        except Exception:
            pub.sock.close(0)
            sub.close(0)
            security.close()
            raise
    from collections import deque

    stamps: deque = deque(maxlen=cfg.keep_stamps)  # bounded: appending costs ~100 ns, nothing when 0
    published = [0]
    # The overlay is drawn off the loop (matplotlib takes ~1 s, the first time more): a volume must never wait
    # for a picture. Once ready it goes out once, in a quality message of its own (the newest TR's state).
    from concurrent.futures import ThreadPoolExecutor, wait

    drawer = ThreadPoolExecutor(1, thread_name_prefix="overlay")
    overlay: list = [None, False]  # [Future of the PNG bytes, sent]
    last_volume: list = [-1, 0.0]  # tr_index and process_ms of the newest volume's quality message

    def overlay_png() -> bytes:
        fut = overlay[0]
        if fut is None or overlay[1] or not fut.done():
            return b""
        overlay[1] = True
        try:
            return fut.result()
        except Exception as err:  # noqa: BLE001
            al = core.preprocess.alignment
            al.overlay = "-" if cfg.out_dir else ""
            log.error("encoding: could not draw the alignment overlay: %s", err)
            return b""

    def snapshot() -> dict:
        c = inbox.counters
        a = [x.counts for x in core.aligners]
        return {
            "counters": {"messages_received": c.received, "messages_rejected": dict(c.rejected_by_code),
                         "inputs_rejected": dict(core.errors), "predictions_published": published[0],
                         "trs_predicted": len(core.predictions), "trs_scored": core.roi_scores.n,
                         "triggers": len(core.triggers), "late_activations": sum(x.late for x in a)},
            "gauges": {"tr_index": core.predictor.t, "pending_volumes": core.pending_volumes,
                       "stamps_kept": len(stamps), "trs_excluded": len(core.excluded_trs),
                       # 1 registered to the weights' space, 0 failed (volumes excluded), -1 not (yet) / no reference
                       "aligned": -1 if (reg := core.registration()) is None else int(bool(reg["converged"]))},
            "labels": {"messages_rejected": "code", "inputs_rejected": "kind"},
        }

    metrics_server = None
    if cfg.metrics_port is not None:
        from services.plumbing.metrics import serve_metrics

        metrics_server, _ = serve_metrics("encoder", snapshot, cfg.metrics_port)
        cfg.metrics_port = metrics_server.server_port  # the port actually bound (0 = any)
    if ready is not None:
        ready.set()

    def publish(msgs: list[Prediction]) -> None:
        if pub is not None:
            for m in msgs:
                pub.send(m, topic=TOPIC_PREDICTION)
                published[0] += 1

    next_status = time.monotonic()

    def publish_status() -> None:
        c = inbox.counters
        if pub is not None:
            pub.send(Status(service="encoder", session_id="", t_ns=time.monotonic_ns(), seq=core.predictor.t,
                            steps=len(core.predictions), received=c.received, sent=published[0],
                            rejected=c.rejected + sum(core.errors.values()), rejected_by_code=dict(c.rejected_by_code),
                            clients={core.agent_id: "followed"} if core.agent_id else {}, triggers=len(core.triggers)),
                     topic=TOPIC_HEARTBEAT)

    last_msg = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + cfg.status_s
                publish_status()
            if cfg.n_trs is not None and core.run_complete(cfg.n_trs, time.monotonic_ns()):
                break
            if cfg.idle_timeout_s is not None and time.monotonic() - last_msg > cfg.idle_timeout_s:
                break
            if sub.poll(50, zmq.POLLIN):
                last_msg = time.monotonic()
                _, parts = split_topic(inbox.recv_parts())
                msg = inbox.decode(parts)  # None = malformed: counted by the channel, logged at debug
                if cfg.keep_stamps:
                    if isinstance(msg, Activation):
                        stamps.append(("activation", msg.agent_id, msg.frame_seqs[-1] if msg.frame_seqs else -1,
                                       time.monotonic_ns()))
                    elif isinstance(msg, BoldVolume):
                        stamps.append(("bold", "", msg.tr_index, time.monotonic_ns()))
                try:
                    if isinstance(msg, Activation):
                        core.on_activation(msg)
                    elif isinstance(msg, Trigger):
                        core.on_trigger(msg.tr_index, msg.t_ns)
                    elif isinstance(msg, BoldVolume):
                        t_vol = time.perf_counter_ns()
                        publish(core.on_volume(msg.tr_index, msg.data, msg.affine))
                        process_ms = (time.perf_counter_ns() - t_vol) / 1e6
                        al = core.preprocess.alignment if core.preprocess is not None else None
                        if al is not None and overlay[0] is None and (cfg.out_dir or pub is not None):
                            # once, as soon as registered: the report reads the file (registration()["overlay"])
                            overlay[0] = drawer.submit(_draw_overlay, core, cfg.out_dir, cfg.out_stem)
                        if pub is not None:  # motion, FD, exclusion, time per volume, registration (topic "quality")
                            pub.send(core.volume_quality(msg.tr_index, process_ms), topic=TOPIC_QUALITY)
                            last_volume[:] = [msg.tr_index, process_ms]
                except InputError as err:
                    core.reject(err)
            publish(core.tick(time.monotonic_ns()))
            if pub is not None and (png := overlay_png()):
                pub.send(core.volume_quality(*last_volume, png), topic=TOPIC_QUALITY)
        publish(core.finish())
        if overlay[0] is not None and not overlay[1]:  # the stream ended before the picture was ready
            wait([overlay[0]], timeout=60)
            if pub is not None and (png := overlay_png()):
                pub.send(core.volume_quality(*last_volume, png), topic=TOPIC_QUALITY)
    finally:
        drawer.shutdown(wait=True)
        sub.close()
        if pub is not None:
            pub.sock.close()
        if security is not None:
            security.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    outputs = [str(p) for p in core.write_outputs(cfg.out_dir, cfg.out_stem)] if cfg.out_dir else []
    if cfg.out_dir:
        try:  # QC files are for people: a failure to draw one must not lose the scores written above
            with _OVERLAY_LOCK:  # it draws the overlay again (pyplot: one thread at a time)
                outputs += [str(p) for p in core.write_qc(cfg.out_dir, cfg.out_stem)]
        except Exception as err:  # noqa: BLE001
            log.error("encoding: could not write the preprocessing QC files: %s", err)
    if inbox.counters.rejected:
        log.error("encoding: %d malformed messages rejected: %s", inbox.counters.rejected,
                  inbox.counters.rejected_by_code)
    return EncodingServiceReport(
        trs_predicted=len(core.predictions), trs_scored=core.roi_scores.n, errors=dict(core.errors),
        first_errors=dict(core.first_error), scores=core.scores_rows(), outputs=outputs,
        received=inbox.counters.received, rejected_messages=inbox.counters.rejected,
        alignment={s.name: dict(a.counts.__dict__) for s, a in zip(core.weights.spaces, core.aligners)},
        stamps=list(stamps), preprocess=core.preprocess.counts if core.preprocess is not None else None,
        registration=core.registration(), excluded_trs=sorted(core.excluded_trs),
        preprocess_ms=[q.preprocess_ms for q in core.preprocess.trace] if core.preprocess is not None else [],
    )
