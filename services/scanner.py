"""BOLD sources behind one stream API, and their ZMQ publisher.

Every source is an iterator of ``ScanVolume`` (run, TR index, acquisition time, 3D data, affine)
and keeps a list of ``StreamEvent`` reports (partial file, late, missing, out-of-order …):

* ``RecordedSource``: a BIDS run (4D NIfTI) replayed at TR pace from a chosen start time, or
  as fast as possible. Volume k is released at the END of TR k, when a scanner would have it.
* ``FolderSource`` (live): watches a scanner export folder with watchdog; reads NIfTI volumes and
  DICOM (``services.plumbing.dicom``): Siemens mosaics, enhanced multi-frame volumes (Siemens XA,
  Philips) and single-slice series (GE, Philips, non-mosaic Siemens) assembled into volumes, each
  file only once complete: its size has been stable for ``settle_s`` AND it parses. A file that
  stays unreadable is reported as partial and skipped (read again if it changes later); a volume
  missing slices, gaps, late and out-of-order volumes are reported; the stream goes on.
  DICOM affines are converted from LPS to the NIfTI (RAS) convention.
* ``SimulatedScanner``: writes the volumes of a 4D NIfTI into a folder at TR pace (what a
  scanner's export does) and publishes a Trigger at the start of every TR; optionally with the
  faults of a real scanner room (``encoders.faults``: head motion, drift, physiology, spikes), their
  true per-TR motion written beside the volumes.

``publish_stream`` sends each volume as ``protocols.BoldVolume`` on a PUB socket (topic
``TOPIC_BOLD``); triggers go out as ``protocols.Trigger`` (``TOPIC_TRIGGER``). Publishers are
XPUB sockets that can wait for their subscribers first (no slow-joiner losses, no sleeps).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import zmq

from encoders.faults import FaultConfig, apply_faults, fault_schedule, write_motion_tsv
from protocols import BoldVolume, Trigger
from services.plumbing.dicom import DicomReadError, SliceAssembler, dicom_seconds, read_dicom
from services.plumbing.security import CurveConfig, ServerSecurity, check_bind, check_connect, secure_connect
from services.plumbing.transport import TOPIC_BOLD, TOPIC_TRIGGER, Channel, make_socket

log = logging.getLogger("neuroarcade.scanner")

VOLUME_SUFFIXES = (".dcm", ".ima", ".nii", ".nii.gz")


@dataclass
class ScanVolume:
    """One volume as every source yields it."""

    run: str
    tr_index: int
    acq_time_s: float
    """Acquisition time from the run start, seconds."""
    data: np.ndarray
    """3D (x, y, z) array."""
    affine: np.ndarray
    source: str
    """File it came from, or 'recorded'."""


@dataclass
class StreamEvent:
    """Something wrong with the stream that was reported and stepped over."""

    kind: str
    """partial | unreadable | duplicate | out_of_order | late | missing | wrong_shape | wrong_geometry |
    unknown_index | incomplete (a volume missing slices) | late_slice (a slice of a skipped volume)"""
    tr_index: int | None
    path: str
    detail: str


class VolumeReadError(Exception):
    """A volume file that cannot be read (yet): partial, truncated or not a volume."""


# --- reading one volume file -------------------------------------------------------------


def read_volume_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None, float | None]:
    """Read one volume file → (3D data, affine, TR index or None, acquisition time s or None).

    DICOM: a Siemens mosaic or an enhanced multi-frame volume (one file per volume); index =
    InstanceNumber − 1, time = AcquisitionTime; RAS affine. NIfTI: a 3D image (or 4D with one
    volume); index = the last number in the file name. Raises VolumeReadError for a
    partial/truncated/unsupported file, and for one slice of a single-slice series (FolderSource
    assembles those).
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise VolumeReadError(f"{path.name}: NIfTI of shape {data.shape} is not one 3D volume")
            numbers = re.findall(r"\d+", name.split(".")[0])
            return data, img.affine, (int(numbers[-1]) if numbers else None), None
        f = read_dicom(path)
        if f.slice is not None:
            raise VolumeReadError(f"{path.name}: one slice of a single-slice series (FolderSource assembles "
                                  "these into volumes)")
        if len(f.volumes) != 1:
            raise VolumeReadError(f"{path.name}: {len(f.volumes)} volumes in one file "
                                  f"{[p for _, p in f.problems]}")
        v = f.volumes[0]
        return v.data, v.affine, v.index, v.acq_time_s
    except VolumeReadError:
        raise
    except DicomReadError as e:
        raise VolumeReadError(str(e)) from None
    except Exception as e:  # nibabel/pydicom raise many types for short or damaged files
        raise VolumeReadError(f"{path.name}: {type(e).__name__}: {str(e)[:200]}") from None


_dicom_seconds = dicom_seconds  # DICOM TM → seconds since midnight (kept for old imports)


# --- sequence bookkeeping shared by the live source -------------------------------------------


@dataclass
class SequenceTracker:
    """Detects duplicate, out-of-order, late and missing TR indices in arrival order."""

    missing_after_s: float
    """A gap is declared missing when a later volume arrived this long ago and it still has not."""
    events: list[StreamEvent] = field(default_factory=list)
    received: set[int] = field(default_factory=set)
    gaps: dict[int, float] = field(default_factory=dict)
    """Index → monotonic time when the gap was noticed."""
    missing: set[int] = field(default_factory=set)
    highest: int = -1

    def accept(self, index: int, path: str, now: float) -> bool:
        """Record an arrival; False = duplicate (drop it)."""
        if index in self.received:
            self.report("duplicate", index, path, "volume already received; ignored")
            return False
        self.received.add(index)
        if index in self.missing:
            self.missing.discard(index)
            self.report("late", index, path, "arrived after being declared missing; delivered anyway")
        elif index < self.highest:
            self.gaps.pop(index, None)
            self.report("out_of_order", index, path, f"arrived after volume {self.highest}")
        for gap in range(self.highest + 1, index):
            if gap not in self.received and gap not in self.missing:
                self.gaps.setdefault(gap, now)
        self.highest = max(self.highest, index)
        return True

    def check(self, now: float, final: bool = False) -> None:
        """Declare gaps missing once they have waited ``missing_after_s`` (all of them if final)."""
        for gap, since in sorted(self.gaps.items()):
            if final or now - since >= self.missing_after_s:
                del self.gaps[gap]
                self.missing.add(gap)
                self.report("missing", gap, "", f"not received {self.missing_after_s:.1f} s after a later volume")

    def give_up(self, kind: str, index: int, path: str, detail: str) -> None:
        """A volume that will never be delivered (e.g. missing slices): missing now, reported as ``kind``."""
        self.gaps.pop(index, None)
        if index not in self.received:
            self.missing.add(index)
        self.report(kind, index, path, detail)

    def report(self, kind: str, index: int | None, path: str, detail: str) -> None:
        """Record and log one stream event (the live source reports unreadable files here too)."""
        self.events.append(StreamEvent(kind, index, path, detail))
        log.warning("scanner %s: TR %s %s %s", kind, index, path, detail)


# --- sources ----------------------------------------------------------------------------------


class RecordedSource:
    """Replay a 4D NIfTI run volume by volume at TR pace (``speed`` > 0) or as fast as possible (0)."""

    def __init__(self, path: str | Path, *, tr: float | None = None, start_s: float = 0.0, speed: float = 1.0,
                 run: str | None = None, stop: threading.Event | None = None):
        import nibabel as nib

        self.path = Path(path)
        self.img = nib.load(str(self.path))
        if len(self.img.shape) != 4:
            raise ValueError(f"{self.path} is not a 4D run (shape {self.img.shape})")
        self.tr = float(tr or self.img.header.get_zooms()[3] or 2.0)
        self.start_index = int(start_s // self.tr)
        self.speed = speed
        self.run = run or self.path.name.split("_bold")[0]
        self.stop = stop or threading.Event()
        self.events: list[StreamEvent] = []

    def __iter__(self) -> Iterator[ScanVolume]:
        t0 = time.monotonic()
        proxy = self.img.dataobj
        for k in range(self.start_index, self.img.shape[3]):
            if self.speed > 0:
                release = t0 + (k - self.start_index + 1) * self.tr / self.speed
                if self.stop.wait(max(0.0, release - time.monotonic())):
                    return
            elif self.stop.is_set():
                return
            yield ScanVolume(self.run, k, k * self.tr, np.asarray(proxy[..., k]), self.img.affine, "recorded")


class _Handler:
    """watchdog handler: every created/modified/moved-in path goes to a queue."""

    def __init__(self, q: "queue.Queue[str]"):
        from watchdog.events import FileSystemEventHandler

        class H(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                q.put(getattr(event, "dest_path", "") or event.src_path)

        self.handler = H()


class FolderSource:
    """Live: volumes appearing in a scanner export folder, each read once complete."""

    def __init__(self, folder: str | Path, *, tr: float = 2.0, run: str = "live", settle_s: float = 0.1,
                 partial_timeout_s: float | None = None, missing_after_s: float | None = None,
                 expected_shape: tuple[int, ...] | None = None, n_volumes: int | None = None,
                 idle_timeout_s: float | None = None, stop: threading.Event | None = None,
                 incomplete_after_s: float | None = None, slices_per_volume: int | None = None):
        """
        settle_s: a file's size must be unchanged this long before it is parsed.
        partial_timeout_s: a file still unreadable this long after its last change is reported
            partial and skipped (default 2 TR); it is read again if it changes afterwards.
        missing_after_s: a gap becomes "missing" this long after a later volume arrived (default 1.5 TR).
        expected_shape: volumes of another shape are reported and skipped (default: the first's);
            so are volumes of other voxel sizes than the first's ("wrong_geometry").
        n_volumes: stop after this many TR indices were delivered or declared missing.
        idle_timeout_s: stop when no new file event for this long (None = run until ``stop``).
        incomplete_after_s: single-slice DICOM series: a volume still missing slices this long after
            its last slice arrived is reported "incomplete" and skipped (default: the larger of
            ``partial_timeout_s`` and ``missing_after_s``).
        slices_per_volume: single-slice series: slices per volume, when the files cannot tell
            (see ``services.plumbing.dicom.SliceAssembler``).
        """
        self.folder = Path(folder)
        self.tr = tr
        self.run = run
        self.settle_s = settle_s
        self.partial_timeout_s = 2 * tr if partial_timeout_s is None else partial_timeout_s
        self.tracker = SequenceTracker(1.5 * tr if missing_after_s is None else missing_after_s)
        self.expected_shape = expected_shape
        self.n_volumes = n_volumes
        self.idle_timeout_s = idle_timeout_s
        self.stop = stop or threading.Event()
        self.done_paths: set[str] = set()
        self.gave_up: dict[str, tuple[int, int]] = {}
        """Path → (size, mtime_ns) of files skipped as unreadable: read again if they change."""
        self.assembler = SliceAssembler(
            max(self.partial_timeout_s, self.tracker.missing_after_s) if incomplete_after_s is None
            else incomplete_after_s, slices_per_volume)
        self.expected_zooms: np.ndarray | None = None
        self._t0_acq: float | None = None

    @property
    def events(self) -> list[StreamEvent]:
        return self.tracker.events

    def _finished(self) -> bool:
        if self.n_volumes is None:
            return False
        return len(self.tracker.received | self.tracker.missing) >= self.n_volumes

    def __iter__(self) -> Iterator[ScanVolume]:
        from watchdog.observers import Observer

        self.folder.mkdir(parents=True, exist_ok=True)
        paths: "queue.Queue[str]" = queue.Queue()
        observer = Observer()
        observer.schedule(_Handler(paths).handler, str(self.folder), recursive=False)
        observer.start()
        # files already there (the scan may have started before us) — after the observer, so none is missed
        for p in sorted(self.folder.iterdir()):
            paths.put(str(p))
        pending: dict[str, tuple[int, float, float]] = {}  # path → (size, size-changed-at, first-seen)
        last_event = time.monotonic()
        try:
            while not self.stop.is_set() and not self._finished():
                try:
                    new = [paths.get(timeout=min(self.settle_s, 0.05))]
                    while not paths.empty():
                        new.append(paths.get_nowait())
                except queue.Empty:
                    new = []
                for p in new:
                    if p in self.gave_up and self._changed_since_given_up(p):
                        self.done_paths.discard(p)  # a skipped file written further: read it again
                    if p not in self.done_paths and p.lower().endswith(VOLUME_SUFFIXES):
                        pending.setdefault(p, (-1, time.monotonic(), time.monotonic()))
                        last_event = time.monotonic()
                now = time.monotonic()
                for p in sorted(pending):
                    yield from self._try_read(p, pending, now)
                for ev in self.assembler.poll(now):
                    self._assembly_event(ev)
                self.tracker.check(now)
                if (self.idle_timeout_s is not None and not pending and not self.assembler.waiting
                        and now - last_event > self.idle_timeout_s):
                    break
        finally:
            observer.stop()
            observer.join(timeout=5)
            final = self.n_volumes is None or self._finished()
            if final:
                for ev in self.assembler.poll(time.monotonic(), final=True):
                    self._assembly_event(ev)
            self.tracker.check(time.monotonic(), final=final)

    def _changed_since_given_up(self, p: str) -> bool:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) == self.gave_up[p]:
            return False
        del self.gave_up[p]
        return True

    def _assembly_event(self, ev) -> None:
        if ev.skipped and ev.index is not None:
            self.tracker.give_up(ev.kind, ev.index, ev.path, ev.detail)
        else:
            self.tracker.report(ev.kind, ev.index, ev.path, ev.detail)

    def _try_read(self, p: str, pending: dict, now: float) -> list[ScanVolume]:
        size0, changed_at, _ = pending[p]
        try:
            size = os.path.getsize(p)
        except OSError:
            del pending[p]  # vanished (e.g. a temporary file renamed away)
            return []
        if size != size0:
            pending[p] = (size, now, pending[p][2])
            return []
        if now - changed_at < self.settle_s:
            return []
        try:
            if p.lower().endswith((".nii", ".nii.gz")):
                vols = [(*read_volume_file(p), p)]
                problems = []
            else:
                f = read_dicom(p)
                vols = [(v.data, v.affine, v.index, v.acq_time_s, v.path) for v in f.volumes]
                problems = f.problems
                if f.slice is not None:
                    assembled, events = self.assembler.add(f.slice, now)
                    for ev in events:
                        self._assembly_event(ev)
                    vols = [(v.data, v.affine, v.index, v.acq_time_s, v.path) for v in assembled]
        except (VolumeReadError, DicomReadError) as e:
            if not getattr(e, "retry", True):
                self._skip(p, pending, "unreadable", str(e))
            elif now - changed_at >= self.partial_timeout_s:
                self._skip(p, pending, "partial", f"unreadable {self.partial_timeout_s:.1f} s after its last "
                           f"change, skipped: {e}")
            return []
        del pending[p]
        self.done_paths.add(p)
        for index, detail in problems:
            if index is None:
                self.tracker.report("incomplete", None, p, detail)
            else:
                self.tracker.give_up("incomplete", index, p, detail)
        out = []
        for data, affine, index, acq, path in vols:
            vol = self._deliver(data, affine, index, acq, path, now)
            if vol is not None:
                out.append(vol)
        return out

    def _skip(self, p: str, pending: dict, kind: str, detail: str) -> None:
        del pending[p]
        self.done_paths.add(p)
        try:
            st = os.stat(p)
            self.gave_up[p] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
        self.tracker.report(kind, None, p, detail)

    def _deliver(self, data, affine, index: int | None, acq: float | None, p: str, now: float) -> ScanVolume | None:
        """Checks every volume passes, whatever its file format: index, shape, voxel size, sequence."""
        if index is None:
            self.tracker.report("unknown_index", None, p, "no TR index in the file (InstanceNumber / file name)")
            return None
        if self.expected_shape is None:
            self.expected_shape = data.shape
        elif tuple(data.shape) != tuple(self.expected_shape):
            self.tracker.report("wrong_shape", index, p, f"shape {data.shape}, stream has {self.expected_shape}")
            return None
        zooms = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
        if self.expected_zooms is None:
            self.expected_zooms = zooms
        elif not np.allclose(zooms, self.expected_zooms, rtol=1e-3, atol=1e-3):
            self.tracker.report("wrong_geometry", index, p, f"voxel size {np.round(zooms, 3).tolist()} mm, stream "
                                f"has {np.round(self.expected_zooms, 3).tolist()} mm")
            return None
        if not self.tracker.accept(index, p, now):
            return None
        if acq is not None:  # DICOM: relative to the first volume received
            self._t0_acq = acq if self._t0_acq is None else self._t0_acq
            acq_s = acq - self._t0_acq
        else:
            acq_s = index * self.tr
        return ScanVolume(self.run, index, float(acq_s), data, affine, p)


# --- simulated scanner ------------------------------------------------------------------------


class TriggerPublisher:
    """XPUB socket publishing typed messages; ``wait_for_subscribers`` avoids slow-joiner losses.

    With ``curve`` keys it is a CURVE server admitting only allow-listed subscribers; without, it
    binds loopback endpoints only (``SecurityError`` otherwise).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: CurveConfig | None = None):
        curve = curve or CurveConfig()
        check_bind(endpoint, curve)
        self.security = ServerSecurity(ctx, curve)
        self.sock = make_socket(ctx, zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # pass on every subscriber's subscription, not only the first
        try:
            self.security.bind(self.sock, endpoint)
        except Exception:
            self.sock.close(0)
            self.security.close()
            raise
        self.channel = Channel(self.sock)
        self.subscriptions: list[bytes] = []

    def wait_for_subscribers(self, n: int, timeout_s: float, topic: bytes = b"") -> bool:
        """Wait until ``n`` subscriptions that receive ``topic`` arrived (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        while sum(topic.startswith(s) for s in self.subscriptions) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000), zmq.POLLIN):
                return False
            msg = self.sock.recv()
            if msg[:1] == b"\x01":
                self.subscriptions.append(msg[1:])
        return True

    def send(self, msg, topic: bytes) -> None:
        self.channel.send(msg, topic=topic)

    def close(self) -> None:
        self.sock.close()
        self.security.close()


@dataclass
class SimulatedScannerConfig:
    """A scanner simulator writing one run into an export folder."""

    bold: str
    """4D NIfTI whose volumes are written one by one."""
    folder: str
    """Export folder the volumes are written into (what a live FolderSource watches)."""
    tr: float | None = None
    """Seconds per volume (default: the NIfTI's pixdim[4])."""
    speed: float = 1.0
    """Time compression: 2.0 runs twice as fast as real time."""
    n_volumes: int | None = None
    """Write only the first n volumes."""
    trigger_endpoint: str | None = None
    """Publish a Trigger at the start of each TR here (XPUB bind)."""
    wait_subscribers: int = 0
    """Wait for this many trigger subscribers before starting (0 = start at once)."""
    skip: tuple[int, ...] = ()
    """TR indices never written (to exercise missing-volume handling)."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE keys of the trigger publisher (key pair + allow-list); required off loopback."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Scanner-room faults put on every volume before it is written (``encoders.faults``; default none)."""
    truth: str = ""
    """With faults: where the true per-TR motion goes (fMRIPrep columns; default
    ``<folder>/truth_motion.tsv``, which a FolderSource ignores: not a volume file)."""


def run_simulated_scanner(cfg: SimulatedScannerConfig, ctx: zmq.Context | None = None,
                          stop: threading.Event | None = None) -> list[Path]:
    """Write the run into ``cfg.folder`` at TR pace: trigger at TR start, volume file at TR end (with
    ``cfg.faults`` on each volume, the true motion written before the first volume)."""
    import nibabel as nib

    stop = stop or threading.Event()
    img = nib.load(cfg.bold)
    if len(img.shape) != 4:
        raise ValueError(f"{cfg.bold} is not a 4D run (shape {img.shape})")
    tr_native = float(cfg.tr or img.header.get_zooms()[3] or 2.0)
    tr = tr_native / cfg.speed
    n = img.shape[3] if cfg.n_volumes is None else min(cfg.n_volumes, img.shape[3])
    folder = Path(cfg.folder)
    folder.mkdir(parents=True, exist_ok=True)
    schedule = None
    if cfg.faults.active:  # drawn for the whole run up front (pure, from the seed): the truth is known per TR
        schedule = fault_schedule(cfg.faults, n, tr_native, tuple(img.shape[:3]))
        write_motion_tsv(cfg.truth or folder / "truth_motion.tsv", schedule.motion)
    pub = (TriggerPublisher(ctx or zmq.Context.instance(), cfg.trigger_endpoint, cfg.curve)
           if cfg.trigger_endpoint else None)
    written = []
    try:
        if pub is not None and cfg.wait_subscribers:
            if not pub.wait_for_subscribers(cfg.wait_subscribers, timeout_s=10.0, topic=TOPIC_TRIGGER):
                log.warning("simulated scanner: starting without all %d subscribers", cfg.wait_subscribers)
        t0 = time.monotonic()
        for k in range(n):
            if stop.wait(max(0.0, t0 + k * tr - time.monotonic())):
                break
            if pub is not None:
                pub.send(Trigger(tr_index=k, t_ns=time.monotonic_ns(), source="simulated"), TOPIC_TRIGGER)
            if stop.wait(max(0.0, t0 + (k + 1) * tr - time.monotonic())):
                break
            if k in cfg.skip:
                continue
            data = np.asarray(img.dataobj[..., k])
            if schedule is not None:
                data = apply_faults(data, k, schedule, img.affine)
            vol = nib.Nifti1Image(data, img.affine)
            path = folder / f"vol_{k:05d}.nii"
            nib.save(vol, path)  # written in place, like a scanner export: readers must check completeness
            written.append(path)
    finally:
        if pub is not None:
            pub.close()
    return written


# --- publishing -------------------------------------------------------------------------------


def to_message(vol: ScanVolume) -> BoldVolume:
    return BoldVolume(run=vol.run, tr_index=vol.tr_index, acq_time_s=vol.acq_time_s, t_ns=time.monotonic_ns(),
                      affine=[float(x) for x in np.asarray(vol.affine, dtype=np.float64).ravel()],
                      data=np.ascontiguousarray(vol.data), source=vol.source)


def publish_stream(source, endpoint: str, ctx: zmq.Context | None = None, wait_subscribers: int = 0,
                   wait_timeout_s: float = 10.0, curve: CurveConfig | None = None,
                   metrics_port: int | None = None) -> int:
    """Publish every volume of ``source`` as BoldVolume on ``endpoint`` (XPUB bind); return the count.

    ``metrics_port``: serve Prometheus metrics there while streaming: volumes published, the
    source's stream events by kind (missing, late, duplicate, partial …), the highest TR index and
    the seconds since the last volume (a stalled export shows there first).
    """
    pub = TriggerPublisher(ctx or zmq.Context.instance(), endpoint, curve)
    progress = {"sent": 0, "tr_index": -1, "t_last": None}
    metrics_server = None
    if metrics_port is not None:
        from services.plumbing.metrics import serve_metrics

        def snapshot() -> dict:
            kinds: dict[str, int] = {}
            for ev in list(getattr(source, "events", [])):
                kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
            t_last = progress["t_last"]
            return {"counters": {"volumes_published": progress["sent"], "stream_events": kinds},
                    "gauges": {"tr_index": progress["tr_index"],
                               "seconds_since_volume": time.monotonic() - t_last if t_last is not None else math.nan},
                    "labels": {"stream_events": "kind"}}

        metrics_server, _ = serve_metrics("scanner", snapshot, metrics_port)
    try:
        if wait_subscribers and not pub.wait_for_subscribers(wait_subscribers, wait_timeout_s, topic=TOPIC_BOLD):
            log.warning("scanner: publishing without all %d subscribers", wait_subscribers)
        for vol in source:
            pub.send(to_message(vol), TOPIC_BOLD)
            progress.update(sent=progress["sent"] + 1, tr_index=max(progress["tr_index"], vol.tr_index),
                            t_last=time.monotonic())
    finally:
        pub.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    return progress["sent"]


# --- a recorded run paced by replayed triggers -------------------------------------------------


def run_trigger_paced(bold: str | Path, trigger_endpoint: str, out_endpoint: str, *, stop: threading.Event,
                      ready: threading.Event | None = None, run: str | None = None, n_volumes: int | None = None,
                      ctx: zmq.Context | None = None, curve: CurveConfig | None = None) -> int:
    """Publish volume k of a recorded 4D run when trigger k+1 arrives (the scan of TR k is complete).

    For replays of a scanned session: the emulator re-emits the session's recorded triggers as it
    replays the frames, so the participant's measured volumes reach the encoder in step with the
    frames the agents see, exactly as in the scanner. The last volume goes out one TR after its
    trigger. Triggers are forwarded on ``out_endpoint`` too, so the encoder needs one BOLD source.
    Returns the number of volumes published. ``curve``: keys for both sockets (required off loopback).
    """
    import nibabel as nib

    from protocols import Decoder
    from services.plumbing.transport import split_topic

    img = nib.load(str(bold))
    n = img.shape[3] if n_volumes is None else min(n_volumes, img.shape[3])
    tr = float(img.header.get_zooms()[3] or 2.0)
    run = run or Path(bold).name.split("_bold")[0]
    ctx = ctx or zmq.Context.instance()
    check_connect(trigger_endpoint, curve)
    check_bind(out_endpoint, curve)
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    secure_connect(sub, trigger_endpoint, curve)
    inbox = Channel(sub, Decoder(accept=[Trigger]))
    pub = TriggerPublisher(ctx, out_endpoint, curve)
    if ready is not None:
        ready.set()
    sent, pending = 0, None  # pending: (tr_index, deadline) of the newest trigger's volume
    proxy = img.dataobj

    def publish(k: int) -> None:
        nonlocal sent
        if 0 <= k < n:
            pub.send(to_message(ScanVolume(run, k, k * tr, np.asarray(proxy[..., k]), img.affine, "recorded")),
                     TOPIC_BOLD)
            sent += 1

    try:
        while not stop.is_set() and sent < n:
            if pending is not None and time.monotonic() >= pending[1]:
                publish(pending[0])
                pending = None
            if not sub.poll(50):
                continue
            _, parts = split_topic(inbox.recv_parts())
            msg = inbox.decode(parts)
            if not isinstance(msg, Trigger):
                continue
            pub.send(msg, TOPIC_TRIGGER)
            if pending is not None:  # the next trigger closes the previous TR
                publish(pending[0])
            pending = (msg.tr_index, time.monotonic() + tr)
        if pending is not None and not stop.is_set():
            stop.wait(max(0.0, pending[1] - time.monotonic()))
            publish(pending[0])
    finally:
        sub.close(0)
        pub.close()
    return sent
