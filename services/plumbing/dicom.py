"""DICOM export files → 3D volumes with a NIfTI (RAS) affine. File formats only: no sockets, no clocks.

Three layouts a scanner export folder holds:

* Siemens mosaic: one file per volume, slices tiled in one image (read by nibabel.nicom).
* Enhanced multi-frame (Siemens XA, Philips): one file per volume, one frame per slice, geometry
  in the Per-frame / Shared Functional Groups (PlanePosition, PlaneOrientation, PixelMeasures,
  PixelValueTransformation). A file holding several time points (frames across time) gives one
  volume per time point. Frames are ordered by geometry only (position along the slice normal),
  never by DimensionIndexValues / StackID / InStackPositionNumber, whose use differs between
  vendors and software versions (XA30 among them).
* Single-slice series (GE, Philips, non-mosaic Siemens): one file per slice; ``SliceAssembler``
  groups them by SeriesInstanceUID and volume, and emits a volume once all its slices are there.

Every volume comes out as ``data[row, column, slice]`` with slices ascending along
ImageOrientationPatient row × column cosines and ``affine`` mapping (row, column, slice) to RAS
millimetres: the DICOM LPS geometry with x and y negated (nibabel's ``DPCS_TO_TAL``), as
``nibabel.nicom.dicomreaders.mosaic_to_nii`` does. The same acquisition gives the same array and
affine in all three layouts.

``DicomReadError(retry=True)``: the file may still be being written (no or short pixel data,
unparsable), read it again later. ``retry=False``: the file is complete but not usable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_RTOL = 0.02
"""Slices of a volume must be evenly spaced: every gap within 2 % (or 0.01 mm) of the mean gap."""


class DicomReadError(Exception):
    """A DICOM file that cannot give a volume (yet)."""

    def __init__(self, msg: str, retry: bool = True):
        super().__init__(msg)
        self.retry = retry


@dataclass
class DicomVolume:
    data: np.ndarray
    """(rows, columns, slices)."""
    affine: np.ndarray
    """4×4 voxel → RAS mm."""
    index: int | None
    """TR index (0-based) or None when the file has none."""
    acq_time_s: float | None
    """Acquisition time of the volume's first slice, seconds since midnight."""
    series_uid: str
    path: str


@dataclass
class DicomSlice:
    """One 2D slice of a single-slice series, with what assembly needs."""

    path: str
    series_uid: str
    sop_uid: str
    instance: int | None
    acquisition: int | None
    temporal: int | None
    """TemporalPositionIdentifier (1-based)."""
    images_in_acquisition: int | None
    echo: int | None
    """EchoNumbers: a series streams one echo (its first slice's)."""
    rows: int
    cols: int
    iop: np.ndarray
    """(6,) row then column direction cosines (LPS)."""
    ipp: np.ndarray
    """(3,) position of the first pixel (LPS mm)."""
    pixel_spacing: np.ndarray
    """(2,) mm between rows, between columns."""
    nominal_spacing: float
    """SpacingBetweenSlices, else SliceThickness, else 1 mm (only for a one-slice volume and tolerances)."""
    acq_time_s: float | None
    pixels: np.ndarray = field(repr=False)

    @property
    def position(self) -> float:
        """Position along the slice normal (row × column cosines), mm."""
        return float(np.dot(slice_normal(self.iop), self.ipp))


@dataclass
class DicomFile:
    """What one file gave: volumes (mosaic, enhanced) or one slice, and time points it had to drop."""

    volumes: list[DicomVolume] = field(default_factory=list)
    slice: DicomSlice | None = None
    problems: list[tuple[int | None, str]] = field(default_factory=list)
    """(TR index, why) for time points of a multi-frame file that were skipped."""


# --- geometry ---------------------------------------------------------------------------------


def slice_normal(iop) -> np.ndarray:
    iop = np.asarray(iop, float)
    return np.cross(iop[:3], iop[3:])


def stack_affine(iop, pixel_spacing, ipp_first, ipp_last=None, n_slices: int = 1,
                 nominal_spacing: float = 1.0) -> np.ndarray:
    """RAS affine of ``data[row, column, slice]`` for a stack from ``ipp_first`` to ``ipp_last``.

    DICOM: pixel (r, c) of a slice lies at IPP + c·Δc·row_cosines + r·Δr·column_cosines (LPS),
    PixelSpacing = (Δr, Δc). The slice axis is the measured step between first and last slice
    (as dcm2niix), or the normal × ``nominal_spacing`` for a single slice.
    """
    iop = np.asarray(iop, float)
    ps = np.asarray(pixel_spacing, float)
    first = np.asarray(ipp_first, float)
    aff = np.eye(4)
    aff[:3, 0] = iop[3:] * ps[0]
    aff[:3, 1] = iop[:3] * ps[1]
    if n_slices > 1 and ipp_last is not None:
        aff[:3, 2] = (np.asarray(ipp_last, float) - first) / (n_slices - 1)
    else:
        aff[:3, 2] = slice_normal(iop) * nominal_spacing
    aff[:3, 3] = first
    return LPS_TO_RAS @ aff


def spacing_problem(positions: np.ndarray) -> str | None:
    """Why sorted slice positions are not one evenly spaced stack (None when they are)."""
    if len(positions) < 2:
        return None
    gaps = np.diff(positions)
    mean = float(gaps.mean())
    if gaps.min() <= 1e-3:
        return "two slices at the same position"
    if np.abs(gaps - mean).max() > max(0.01, SPACING_RTOL * mean):
        return (f"uneven slice spacing {np.round(gaps, 3).tolist()} mm (a slice missing from the middle?)")
    return None


def assemble(pixels: list[np.ndarray], ipps: list, iop, pixel_spacing, nominal_spacing: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Slices (any order, one orientation) → (data[row, col, slice], RAS affine). Raises ValueError."""
    iop = np.asarray(iop, float)
    ipps = np.asarray(ipps, float).reshape(-1, 3)
    pos = ipps @ slice_normal(iop)
    order = np.argsort(pos, kind="stable")
    problem = spacing_problem(pos[order])
    if problem:
        raise ValueError(problem)
    data = np.stack([pixels[i] for i in order], axis=-1)
    return data, stack_affine(iop, pixel_spacing, ipps[order[0]], ipps[order[-1]], len(order), nominal_spacing)


def _same_orientation(a, b, tol: float = 1e-4) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol))


# --- small DICOM helpers ----------------------------------------------------------------------


def dicom_seconds(tm) -> float | None:
    """DICOM TM 'HHMMSS.ffffff' (or the time part of a DT) → seconds since midnight."""
    if not tm:
        return None
    tm = str(tm)
    try:
        return int(tm[0:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:] or 0)
    except ValueError:
        return None


def _dt_seconds(dt) -> float | None:
    """DICOM DT 'YYYYMMDDHHMMSS.ffffff(+ZZZZ)' → seconds since midnight."""
    if not dt:
        return None
    dt = str(dt).split("+")[0].split("-")[0]
    return dicom_seconds(dt[8:]) if len(dt) > 8 else None


def _int(ds, key) -> int | None:
    v = ds.get(key)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _scaled(pixels: np.ndarray, slope, intercept) -> np.ndarray:
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if slope == 1.0 and intercept == 0.0:
        return pixels
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _pixels(ds, name: str) -> np.ndarray:
    """Decoded pixel data; a missing or short PixelData means the file is still being written."""
    if "PixelData" not in ds:
        raise DicomReadError(f"{name}: no pixel data (yet)")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
        try:
            from pydicom.pixels import get_decoder

            if not get_decoder(ts).is_available:
                raise DicomReadError(f"{name}: compressed transfer syntax {ts.name}: no decoder installed "
                                     "(pylibjpeg / gdcm)", retry=False)
        except (ImportError, NotImplementedError, ValueError):
            pass
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:  # short pixel data: still being written
        raise DicomReadError(f"{name}: pixel data unreadable: {type(e).__name__}: {str(e)[:200]}") from None


def _group(frame, shared, name: str):
    """First item of functional group ``name`` for a frame: per-frame, else shared, else None."""
    for fg in (frame, shared):
        if fg is not None and name in fg and len(fg[name].value):
            return fg[name].value[0]
    return None


# --- reading one file -------------------------------------------------------------------------


def read_dicom(path: str | Path) -> DicomFile:
    """Read one exported DICOM file: a mosaic or enhanced volume, or one slice of a series."""
    import pydicom

    path = Path(path)
    name = path.name
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:  # truncated header, not DICOM (yet)
        raise DicomReadError(f"{name}: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        if "PerFrameFunctionalGroupsSequence" in ds:
            return _read_enhanced(ds, path)
        if _int(ds, "NumberOfFrames") not in (None, 1):
            pixels = _pixels(ds, name)  # complete? then it is a layout we do not read
            raise DicomReadError(f"{name}: multi-frame DICOM without functional groups "
                                 f"({pixels.shape}); not a supported volume layout", retry=False)
        mosaic = _read_mosaic(ds, path)
        if mosaic is not None:
            return mosaic
        return DicomFile(slice=_read_slice(ds, path))
    except DicomReadError:
        raise
    except Exception as e:  # pydicom/nibabel raise many types for short or damaged files
        raise DicomReadError(f"{name}: {type(e).__name__}: {str(e)[:200]}") from None


def _index(ds) -> int | None:
    """TR index of a one-volume file: InstanceNumber − 1 (Siemens numbers volumes from 1)."""
    for key in ("InstanceNumber", "AcquisitionNumber"):
        v = _int(ds, key)
        if v is not None:
            return v - 1
    return None


def _read_mosaic(ds, path: Path) -> DicomFile | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nicom warns that its readers are "experimental"
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_data(ds)
        if not wrapper.is_mosaic:
            return None
        data = np.asarray(wrapper.get_data())
        affine = LPS_TO_RAS @ np.asarray(wrapper.affine)
    return DicomFile(volumes=[DicomVolume(data, affine, _index(ds), dicom_seconds(ds.get("AcquisitionTime")),
                                          str(ds.get("SeriesInstanceUID", "")), str(path))])


def _read_slice(ds, path: Path) -> DicomSlice:
    name = path.name
    pixels = _pixels(ds, name)  # first: a file with all its pixels is complete
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise DicomReadError(f"{name}: single-slice DICOM without {', '.join(missing)}: no geometry, "
                             "not an image volume slice", retry=False)
    if pixels.ndim != 2:
        raise DicomReadError(f"{name}: pixel data of shape {pixels.shape} is not one slice", retry=False)
    nominal = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    return DicomSlice(
        path=str(path), series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance=_int(ds, "InstanceNumber"), acquisition=_int(ds, "AcquisitionNumber"),
        temporal=_int(ds, "TemporalPositionIdentifier"), images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        echo=_int(ds, "EchoNumbers"),
        rows=int(ds.Rows), cols=int(ds.Columns), iop=np.array([float(x) for x in ds.ImageOrientationPatient]),
        ipp=np.array([float(x) for x in ds.ImagePositionPatient]),
        pixel_spacing=np.array([float(x) for x in ds.PixelSpacing]), nominal_spacing=abs(float(nominal)) or 1.0,
        acq_time_s=dicom_seconds(ds.get("AcquisitionTime")),
        pixels=_scaled(pixels, ds.get("RescaleSlope"), ds.get("RescaleIntercept")))


def _read_enhanced(ds, path: Path) -> DicomFile:
    name = path.name
    per = ds.PerFrameFunctionalGroupsSequence
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq is not None and len(shared_seq) else None
    n = _int(ds, "NumberOfFrames") or len(per)
    pixels = _pixels(ds, name)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != n or len(per) != n:
        raise DicomReadError(f"{name}: {n} frames announced, {pixels.shape[0]} in the pixel data and "
                             f"{len(per)} per-frame groups", retry=False)
    frames = []
    for i, fg in enumerate(per):
        pos, ori, meas = (_group(fg, shared, k) for k in
                          ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise DicomReadError(f"{name}: frame {i + 1} has no PlanePosition / PlaneOrientation / "
                                 "PixelMeasures (PixelSpacing)", retry=False)
        pvt = _group(fg, shared, "PixelValueTransformationSequence")
        slope = pvt.get("RescaleSlope") if pvt is not None else ds.get("RescaleSlope")
        intercept = pvt.get("RescaleIntercept") if pvt is not None else ds.get("RescaleIntercept")
        content = _group(fg, None, "FrameContentSequence")
        echo = _group(fg, None, "MREchoSequence")
        frames.append(dict(
            te=float(echo.EffectiveEchoTime) if echo is not None and "EffectiveEchoTime" in echo else None,
            ipp=np.array([float(x) for x in pos.ImagePositionPatient]),
            iop=np.array([float(x) for x in ori.ImageOrientationPatient]),
            ps=np.array([float(x) for x in meas.PixelSpacing]),
            nominal=abs(float(meas.get("SpacingBetweenSlices") or meas.get("SliceThickness") or 1.0)) or 1.0,
            temporal=_int(content, "TemporalPositionIndex") if content is not None else None,
            t=_dt_seconds(content.get("FrameAcquisitionDateTime")) if content is not None else None,
            pixels=_scaled(pixels[i], slope, intercept)))
    echoes = sorted({f["te"] for f in frames if f["te"] is not None})
    if len(echoes) > 1:
        raise DicomReadError(f"{name}: multi-echo file (echo times {echoes} ms); only single-echo volumes are "
                             "streamed", retry=False)
    iop0, ps0 = frames[0]["iop"], frames[0]["ps"]
    for i, f in enumerate(frames):
        if not _same_orientation(f["iop"], iop0) or not np.allclose(f["ps"], ps0, rtol=1e-4):
            raise DicomReadError(f"{name}: frame {i + 1} has another orientation or pixel spacing than frame 1; "
                                 "not one stack", retry=False)
    # time points: TemporalPositionIndex when it varies, else the k-th frame at each position is time k
    temporal = [f["temporal"] for f in frames]
    if None not in temporal and len(set(temporal)) > 1:
        keys = [t - 1 for t in temporal]
    else:
        normal = slice_normal(iop0)
        tol = 0.25 * frames[0]["nominal"]
        seen: list[list] = []  # [position, count]
        keys = []
        for f in frames:
            p = float(normal @ f["ipp"])
            hit = next((s for s in seen if abs(s[0] - p) < tol), None)
            if hit is None:
                seen.append([p, 0])
                hit = seen[-1]
            keys.append(hit[1])
            hit[1] += 1
    times = sorted(set(keys))
    counts = {k: keys.count(k) for k in times}
    n_slices = max(counts.values())
    top_time = dicom_seconds(ds.get("AcquisitionTime")) or _dt_seconds(ds.get("AcquisitionDateTime"))
    out = DicomFile()
    for k in times:
        fr = [f for f, key in zip(frames, keys) if key == k]
        index = _index(ds) if len(times) == 1 else k
        if counts[k] != n_slices:
            out.problems.append((index, f"{name}: time point {k + 1} has {counts[k]} of {n_slices} slices; skipped"))
            continue
        try:
            data, affine = assemble([f["pixels"] for f in fr], [f["ipp"] for f in fr], iop0, ps0, fr[0]["nominal"])
        except ValueError as e:
            out.problems.append((index, f"{name}: time point {k + 1}: {e}; skipped"))
            continue
        ts = [f["t"] for f in fr if f["t"] is not None]
        out.volumes.append(DicomVolume(data, affine, index, min(ts) if ts else top_time,
                                       str(ds.get("SeriesInstanceUID", "")), str(path)))
    if not out.volumes and len(times) == 1:
        raise DicomReadError(out.problems[0][1], retry=False)
    return out


# --- single-slice series → volumes -----------------------------------------------------------


@dataclass
class AssemblyEvent:
    kind: str
    """incomplete | wrong_geometry (another slice size, spacing, plane or echo) | duplicate | late_slice"""
    index: int | None
    path: str
    detail: str
    skipped: bool = False
    """True when volume ``index`` as a whole was dropped (it will never come out)."""


MODES = ("temporal", "acquisition", "instance")


@dataclass
class _Series:
    uid: str
    ref: DicomSlice
    modes: list[str]
    n: int | None = None
    n_from: str = ""
    mode_i: int = 0
    locked: bool = False
    """True once a volume was emitted: the grouping key no longer changes."""
    open: list[tuple[DicomSlice, float]] = field(default_factory=list)
    """Slices waiting for their volume, with their arrival time."""
    closed: dict[int, str] = field(default_factory=dict)
    """Volume key → 'emitted' | 'skipped'."""
    spacing: float | None = None
    last_arrival: float = 0.0

    @property
    def mode(self) -> str:
        return self.modes[self.mode_i]

    @property
    def tol(self) -> float:
        """Two slices closer than this along the normal are at the same position."""
        return 0.25 * self.ref.nominal_spacing


class SliceAssembler:
    """Single-slice DICOM series → complete volumes.

    Grouping, per SeriesInstanceUID: the volume is TemporalPositionIdentifier − 1, else
    AcquisitionNumber − 1, else (InstanceNumber − 1) // slices-per-volume. A key is abandoned for
    the next one when two different slices of one "volume" share a position (GE numbers every
    slice of a run with AcquisitionNumber 1). Slices per volume: ``slices_per_volume``, else
    ImagesInAcquisition (temporal / acquisition keys), else learned — from the instance numbers'
    period (the smallest instance gap between two slices at one position), or, without a header
    (or with one no volume reaches), from two volumes with the same slice count once a later
    volume has begun: then the first two volumes go out one TR late.

    A volume goes out when it has that many slices, one orientation, evenly spaced; sorted along
    the normal. A volume still short ``timeout_s`` after its last slice (after the series' last
    slice while the slice count is unknown) is reported ``incomplete`` and dropped; its late
    slices are reported and dropped. Later volumes never wait for an earlier one.
    """

    def __init__(self, timeout_s: float, slices_per_volume: int | None = None):
        self.timeout_s = timeout_s
        self.slices_per_volume = slices_per_volume
        self.series: dict[str, _Series] = {}

    @property
    def waiting(self) -> bool:
        return any(s.open for s in self.series.values())

    def add(self, sl: DicomSlice, now: float) -> tuple[list[DicomVolume], list[AssemblyEvent]]:
        events: list[AssemblyEvent] = []
        s = self.series.get(sl.series_uid)
        if s is None:
            modes = [m for m, v in zip(MODES[:2], (sl.temporal, sl.acquisition)) if v is not None] + ["instance"]
            s = self.series[sl.series_uid] = _Series(sl.series_uid, sl, modes)
            if self.slices_per_volume:
                s.n, s.n_from = self.slices_per_volume, "slices_per_volume"
        problem = self._geometry_problem(s, sl)
        if problem:
            events.append(AssemblyEvent("wrong_geometry", self._key(s, sl), sl.path, problem))
            return [], events
        s.open.append((sl, now))
        s.last_arrival = now
        volumes = self._process(s, now, events)
        return volumes, events

    def poll(self, now: float, final: bool = False) -> list[AssemblyEvent]:
        """Report and drop volumes incomplete for ``timeout_s`` (all open ones if ``final``)."""
        events: list[AssemblyEvent] = []
        for s in self.series.values():
            if not s.open:
                continue
            groups, unassigned = self._groups(s)
            for key, items in sorted(groups.items()):
                last = s.last_arrival if s.n is None else max(t for _, t in items)
                if final or now - last >= self.timeout_s:
                    have = len(items)
                    want = s.n if s.n is not None else "an unknown number of"
                    events.append(AssemblyEvent(
                        "incomplete", key, items[-1][0].path,
                        f"series {s.uid[-12:]}: volume has {have} of {want} slices "
                        f"{'at the end of the stream' if final else f'{self.timeout_s:.1f} s after its last slice'}"
                        "; skipped", skipped=True))
                    s.closed[key] = "skipped"
                    ids = {id(sl) for sl, _ in items}
                    s.open = [(sl, t) for sl, t in s.open if id(sl) not in ids]
            if unassigned and (final or now - s.last_arrival >= self.timeout_s):
                events.append(AssemblyEvent(
                    "incomplete", None, unassigned[-1][0].path,
                    f"series {s.uid[-12:]}: {len(unassigned)} slices cannot be grouped into volumes (no "
                    "TemporalPositionIdentifier / AcquisitionNumber per volume and no repeating slice position "
                    "in the InstanceNumbers); skipped"))
                ids = {id(sl) for sl, _ in unassigned}
                s.open = [(sl, t) for sl, t in s.open if id(sl) not in ids]
        return events

    # --- internals

    def _geometry_problem(self, s: _Series, sl: DicomSlice) -> str | None:
        ref = s.ref
        if sl.echo != ref.echo:
            return f"echo {sl.echo} of a multi-echo series; only echo {ref.echo} (the first received) is streamed"
        if (sl.rows, sl.cols) != (ref.rows, ref.cols):
            return f"slice of {sl.rows}×{sl.cols} pixels, series has {ref.rows}×{ref.cols}; rejected"
        if not np.allclose(sl.pixel_spacing, ref.pixel_spacing, rtol=1e-4):
            return (f"pixel spacing {sl.pixel_spacing.tolist()} mm, series has {ref.pixel_spacing.tolist()} mm; "
                    "rejected")
        if abs(float(np.dot(slice_normal(sl.iop), slice_normal(ref.iop)))) < 0.99:
            return "slice orientation differs from the series' (another slice plane); rejected"
        return None

    def _key(self, s: _Series, sl: DicomSlice, mode: str | None = None) -> int | None:
        mode = mode or s.mode
        if mode == "temporal":
            return sl.temporal - 1 if sl.temporal is not None else None
        if mode == "acquisition":
            return sl.acquisition - 1 if sl.acquisition is not None else None
        if sl.instance is None or not s.n:
            return None
        return (sl.instance - 1) // s.n

    def _groups(self, s: _Series):
        groups: dict[int, list] = {}
        unassigned = []
        for sl, t in s.open:
            key = self._key(s, sl)
            (unassigned if key is None else groups.setdefault(key, [])).append((sl, t))
        return groups, unassigned

    def _collides(self, s: _Series, groups) -> bool:
        """Two different slices (instance numbers) at one position within one key?"""
        for items in groups.values():
            seen: list[tuple[float, int | None]] = []
            for sl, _ in items:
                p = sl.position
                for q, inst in seen:
                    if abs(p - q) < s.tol and inst != sl.instance:
                        return True
                seen.append((p, sl.instance))
        return False

    def _run_constant_key(self, s: _Series) -> bool:
        """Locked on acquisition keys with a known slice count (e.g. ``slices_per_volume`` emitted the first
        volume at once): does a waiting slice fall in an emitted volume by its AcquisitionNumber but in a new one
        by its InstanceNumber? Then the AcquisitionNumber is the run's, not the volume's (GE), and the instance
        key ``(InstanceNumber − 1) // n`` (which gives the emitted volumes the same keys) takes over."""
        for sl, _ in s.open:
            key = self._key(s, sl)
            if key is not None and s.closed.get(key) == "emitted" and sl.instance is not None:
                by_instance = self._key(s, sl, "instance")
                if by_instance is not None and by_instance not in s.closed:
                    return True
        return False

    def _learn_period(self, s: _Series) -> None:
        """Instance keys: slices per volume = the instance gap a → b where b is at a's position and
        every instance from a to b − 1 is there, at distinct positions (so the gap is one volume, not two)."""
        pos = {sl.instance: sl.position for sl, _ in s.open if sl.instance is not None}
        for a in sorted(pos):
            seen = [pos[a]]
            b = a + 1
            while b in pos:
                if abs(pos[b] - pos[a]) < s.tol:
                    s.n, s.n_from = b - a, "learned from InstanceNumber period"
                    return
                if any(abs(pos[b] - q) < s.tol for q in seen):
                    break  # a repeat of another slice first: not a clean volume from a
                seen.append(pos[b])
                b += 1

    def _process(self, s: _Series, now: float, events: list[AssemblyEvent]) -> list[DicomVolume]:
        if not s.locked:
            while s.mode != "instance" and self._collides(s, self._groups(s)[0]):
                s.mode_i += 1
                if s.n_from == "ImagesInAcquisition":
                    s.n, s.n_from = None, ""
            if s.n is None and s.mode != "instance" and s.ref.images_in_acquisition:
                s.n, s.n_from = s.ref.images_in_acquisition, "ImagesInAcquisition"
            if s.n is None and s.mode == "instance":
                self._learn_period(s)
        elif s.mode == "acquisition" and s.n and "instance" in s.modes and self._run_constant_key(s):
            s.mode_i = s.modes.index("instance")  # GE: one AcquisitionNumber for the run, seen only after a volume
        groups, _ = self._groups(s)
        # slices of closed volumes, and second slices at one position
        for key, items in list(groups.items()):
            keep = []
            for sl, t in items:
                if key in s.closed:
                    kind = "duplicate" if s.closed[key] == "emitted" else "late_slice"
                    events.append(AssemblyEvent(kind, key, sl.path, f"slice of volume {key}, which was already "
                                                f"{s.closed[key]}; dropped"))
                elif any(abs(sl.position - k.position) < s.tol for k, _ in keep):
                    events.append(AssemblyEvent("duplicate", key, sl.path,
                                                f"second slice at position {sl.position:.2f} mm; dropped"))
                else:
                    keep.append((sl, t))
                    continue
                s.open = [(o, u) for o, u in s.open if o is not sl]
            groups[key] = keep
        if s.mode != "instance" and (s.n is None or (s.n_from == "ImagesInAcquisition" and not s.locked)):
            self._learn_from_volumes(s, groups)  # also overrides a header count no volume reaches
        if s.n is None:
            return []
        volumes = []
        for key, items in sorted(groups.items()):
            if len(items) < s.n:
                continue
            slices = [sl for sl, _ in items]
            problem = None
            if len(items) > s.n:
                problem = f"{len(items)} slices at distinct positions, series has {s.n} ({s.n_from})"
            elif not all(_same_orientation(sl.iop, slices[0].iop) for sl in slices):
                problem = "its slices have different orientations"
            if problem is None:
                try:
                    data, affine = assemble([sl.pixels for sl in slices], [sl.ipp for sl in slices],
                                            slices[0].iop, slices[0].pixel_spacing, slices[0].nominal_spacing)
                    step = float(np.linalg.norm(affine[:3, 2]))
                    if s.spacing is not None and s.n > 1 and abs(step - s.spacing) > max(0.01, 0.02 * s.spacing):
                        problem = f"slice spacing {step:.3f} mm, series has {s.spacing:.3f} mm"
                except ValueError as e:
                    problem = str(e)
            ids = {id(sl) for sl in slices}
            s.open = [(o, u) for o, u in s.open if id(o) not in ids]
            if problem:
                s.closed[key] = "skipped"
                events.append(AssemblyEvent("wrong_geometry", key, slices[-1].path,
                                            f"series {s.uid[-12:]} volume {key}: {problem}; skipped",
                                            skipped=True))
                continue
            s.closed[key] = "emitted"
            s.locked = True
            if s.spacing is None and s.n > 1:
                s.spacing = float(np.linalg.norm(affine[:3, 2]))
            ts = [sl.acq_time_s for sl in slices if sl.acq_time_s is not None]
            last = max(items, key=lambda it: it[1])[0]
            volumes.append(DicomVolume(data, affine, key, min(ts) if ts else None, s.uid, last.path))
        return volumes

    def _learn_from_volumes(self, s: _Series, groups) -> None:
        """No header count: two volumes with the same, largest slice count, both over (a later one began)."""
        counts = {k: len(v) for k, v in groups.items() if k not in s.closed}
        if len(counts) < 3:
            return
        top = max(counts.values())
        full = sorted(k for k, c in counts.items() if c == top)
        if len(full) >= 2 and max(counts) > full[1] and top != s.n:
            s.n_from = "learned from two volumes" + (f" (ImagesInAcquisition says {s.n})" if s.n else "")
            s.n = top
