"""DICOM layouts written with pydicom: single-slice series, enhanced multi-frame, Siemens mosaic, vs NIfTI.

One synthetic oblique volume (non-square slices, unequal pixel spacing, rescale slope/intercept)
is written in every layout; each must read back to the same array and the same RAS affine.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.plumbing.dicom import DicomReadError, SliceAssembler, read_dicom
from services.scanner import FolderSource, read_volume_file

ROWS, COLS, NSL = 6, 5, 4
PS = (2.0, 2.5)  # mm between rows, between columns
DZ = 3.0
SLOPE, INTERCEPT = 0.5, 10.0
MR, ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"


def _rotation() -> np.ndarray:
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


ROT = _rotation()
ROW_COS, COL_COS, NORMAL = ROT[:, 0], ROT[:, 1], ROT[:, 2]  # NORMAL = ROW_COS × COL_COS
IOP = [float(x) for x in np.r_[ROW_COS, COL_COS]]
IPP0 = np.array([-60.5, 30.25, 12.0])


def ipp(k: int, shift: float = 0.0) -> list[float]:
    return [float(x) for x in IPP0 + (k * DZ + shift) * NORMAL]


def stored(t: int) -> np.ndarray:
    """Stored uint16 values of volume t, [row, col, slice]."""
    return (np.arange(ROWS * COLS * NSL).reshape(ROWS, COLS, NSL) * 7 + 100 + 13 * t).astype(np.uint16)


def real(t: int) -> np.ndarray:
    return stored(t) * SLOPE + INTERCEPT


def expected_affine() -> np.ndarray:
    """From the DICOM definition: pixel (r, c) of slice k at IPP_k + c·Δc·row_cos + r·Δr·col_cos (LPS)."""
    def ras(r, c, k):
        p = np.array(ipp(k)) + c * PS[1] * ROW_COS + r * PS[0] * COL_COS
        return np.array([-p[0], -p[1], p[2]])

    o = ras(0, 0, 0)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = ras(1, 0, 0) - o, ras(0, 1, 0) - o, ras(0, 0, 1) - o, o
    assert np.allclose(aff @ [3, 2, 1, 1], np.r_[ras(3, 2, 1), 1])
    return aff


SERIES = generate_uid()


def _ds(sop_class: str, series: str = SERIES) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer = "MR", "TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_slice(path: Path, t: int, k: int, *, series: str = SERIES, acquisition: int | None = None,
                temporal: int | None = None, instance: int | None = None, images: int | None = NSL,
                rows: int = ROWS, shift: float = 0.0, pixels: np.ndarray | None = None) -> Path:
    """Slice k of volume t as one classic MR Image file."""
    ds = _ds(MR, series)
    ds.Rows, ds.Columns = rows, COLS
    ds.InstanceNumber = instance if instance is not None else t * NSL + k + 1
    if acquisition is not None:
        ds.AcquisitionNumber = acquisition
    if temporal is not None:
        ds.TemporalPositionIdentifier = temporal
    if images is not None:
        ds.ImagesInAcquisition = images
    ds.ImageOrientationPatient, ds.ImagePositionPatient = IOP, ipp(k, shift)
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = list(PS), DZ, DZ
    ds.AcquisitionTime = f"1200{t * 2:02d}.{k:06d}"
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    px = stored(t)[..., k] if pixels is None else pixels
    ds.PixelData = np.ascontiguousarray(px[:rows], np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced(path: Path, times: list[int], *, instance: int = 1, order=None, shared_orientation=True,
                   temporal_index=True, drop: tuple[int, ...] = (), pixel_spacing=PS) -> Path:
    """Volumes ``times`` as one Enhanced MR Image file, frames in ``order`` (Siemens XA: orientation in
    the shared groups; Philips: per frame). No DimensionIndexValues / StackID: geometry alone orders."""
    frames = [(t, k) for t in times for k in range(NSL) if k not in drop]
    if order is not None:
        frames = [frames[i] for i in order]
    ds = _ds(ENHANCED_MR)
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, len(frames)
    ds.InstanceNumber = instance
    ds.AcquisitionDateTime = "20240101120000.000000"

    def item(**kw) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = item(PixelMeasuresSequence=Sequence([item(PixelSpacing=list(pixel_spacing), SliceThickness=DZ,
                                                       SpacingBetweenSlices=DZ)]),
                  PixelValueTransformationSequence=Sequence([item(RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT,
                                                                  RescaleType="US")]))
    if shared_orientation:
        shared.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=IOP)])
    per = []
    for t, k in frames:
        fg = item(PlanePositionSequence=Sequence([item(ImagePositionPatient=ipp(k))]))
        content = item(FrameAcquisitionDateTime=f"20240101120{t:01d}0{k}.000000")
        if temporal_index:
            content.TemporalPositionIndex = t + 1
        fg.FrameContentSequence = Sequence([content])
        if not shared_orientation:
            fg.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=IOP)])
        per.append(fg)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack([stored(t)[..., k] for t, k in frames]).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 ('SV10') header, as nibabel.nicom.csareader reads it."""
    out = b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for v in values:
            b = v.encode() + b"\x00"
            out += struct.pack("<4i", len(b), len(b), 77, len(b)) + b + b"\x00" * (-len(b) % 4)
    return out


def write_mosaic(path: Path, t: int) -> Path:
    """Volume t as a Siemens mosaic: slices tiled 2×2; ImagePositionPatient of the whole mosaic."""
    m = int(np.ceil(np.sqrt(NSL)))
    mosaic = np.zeros((m * ROWS, m * COLS), np.uint16)
    for k in range(NSL):
        mosaic[(k // m) * ROWS:(k // m + 1) * ROWS, (k % m) * COLS:(k % m + 1) * COLS] = stored(t)[..., k]
    ds = _ds(MR)
    ds.Manufacturer = "SIEMENS"
    ds.Rows, ds.Columns = mosaic.shape
    ds.InstanceNumber = t + 1
    ds.ImageOrientationPatient = IOP
    # Siemens writes the position of the mosaic's corner: slice 0's minus half the extra tiles
    fix = (np.array(mosaic.shape) - np.array([ROWS, COLS])) / 2
    ds.ImagePositionPatient = [float(x) for x in np.array(ipp(0)) - COL_COS * PS[0] * fix[0] - ROW_COS * PS[1] * fix[1]]
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = list(PS), DZ, DZ
    ds.AcquisitionTime = f"1200{t * 2:02d}.000000"
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    ds.add_new((0x29, 0x10), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x29, 0x1010), "OB", _csa2({
        "NumberOfImagesInMosaic": ("US", [str(NSL)]), "AcquisitionMatrixText": ("SH", [f"{ROWS}*{COLS}"]),
        "SliceNormalVector": ("FD", [repr(float(x)) for x in NORMAL])}))
    ds.PixelData = mosaic.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _feed(asm: SliceAssembler, paths, now: float = 0.0):
    vols, events = [], []
    for p in paths:
        v, e = asm.add(read_dicom(p).slice, now)
        vols += v
        events += e
    return vols, events


def _check(data, affine, t: int = 0):
    np.testing.assert_allclose(data, real(t), atol=1e-4)
    np.testing.assert_allclose(affine, expected_affine(), atol=1e-4)


# --- every layout gives the same volume --------------------------------------------------------


def test_every_layout_reads_to_the_same_array_and_ras_affine(tmp_path):
    rng = np.random.default_rng(0)
    # single-slice series, slices in a random order
    slices = [write_slice(tmp_path / f"s{k}.dcm", 0, k, acquisition=1) for k in rng.permutation(NSL)]
    vols, events = _feed(SliceAssembler(1.0), slices)
    assert events == [] and len(vols) == 1 and vols[0].index == 0
    _check(vols[0].data, vols[0].affine)
    # enhanced multi-frame: Siemens XA style (shared orientation) and Philips style (per frame), frames shuffled
    for shared in (True, False):
        f = read_dicom(write_enhanced(tmp_path / f"e{shared}.dcm", [0], order=rng.permutation(NSL),
                                      shared_orientation=shared))
        assert f.slice is None and f.problems == [] and len(f.volumes) == 1 and f.volumes[0].index == 0
        _check(f.volumes[0].data, f.volumes[0].affine)
    # Siemens mosaic (nibabel.nicom), through the scanner's one-file reader
    data, affine, index, _ = read_volume_file(write_mosaic(tmp_path / "m.dcm", 0))
    assert index == 0
    _check(data, affine)
    # NIfTI of the same volume with the affine from the DICOM definition
    nib.save(nib.Nifti1Image(real(0).astype(np.float32), expected_affine()), tmp_path / "vol_00000.nii")
    data, affine, index, _ = read_volume_file(tmp_path / "vol_00000.nii")
    assert index == 0
    _check(data, affine)
    # a single-slice file alone is no volume for the one-file reader
    with pytest.raises(Exception, match="single-slice series"):
        read_volume_file(slices[0])


def test_enhanced_file_with_frames_across_time(tmp_path):
    order = np.random.default_rng(1).permutation(3 * NSL)
    for tpi in (True, False):  # TemporalPositionIndex, or k-th frame at a position = time k
        f = read_dicom(write_enhanced(tmp_path / f"run{tpi}.dcm", [0, 1, 2],
                                      order=None if not tpi else order, temporal_index=tpi))
        assert [v.index for v in f.volumes] == [0, 1, 2] and f.problems == []
        for v in f.volumes:
            _check(v.data, v.affine, v.index)
    # a volume missing its middle frame: uneven spacing, rejected for good (not retried)
    with pytest.raises(DicomReadError, match="uneven slice spacing") as e:
        read_dicom(write_enhanced(tmp_path / "gap.dcm", [0], drop=(1,)))
    assert not e.value.retry


# --- single-slice series assembly -------------------------------------------------------------


def test_slices_out_of_order_missing_slice_and_other_geometry(tmp_path):
    asm = SliceAssembler(timeout_s=1.0)
    files = {(t, k): write_slice(tmp_path / f"v{t}s{k}.dcm", t, k, acquisition=t + 1)
             for t in range(4) for k in range(NSL) if (t, k) != (1, 2)}  # volume 1 lacks slice 2
    odd = write_slice(tmp_path / "odd.dcm", 2, 1, acquisition=3, rows=3, pixels=stored(2)[..., 1])
    # volume 2 and 3 interleaved and reversed, before volume 0; the odd slice in the middle
    arrival = [files[(t, k)] for k in reversed(range(NSL)) for t in (3, 2)] + [odd]
    arrival += [files[(0, k)] for k in (2, 0, 3, 1)] + [files[(1, k)] for k in (0, 1, 3)]
    vols, events = [], []
    for i, p in enumerate(arrival):
        v, e = asm.add(read_dicom(p).slice, now=i * 0.01)
        vols += v
        events += e
    assert [v.index for v in vols] == [3, 2, 0]  # each as soon as complete, none waits for volume 1
    for v in vols:
        _check(v.data, v.affine, v.index)
    assert [(e.kind, e.index, e.skipped) for e in events] == [("wrong_geometry", 2, False)]
    assert "3×5 pixels, series has 6×5" in events[0].detail
    assert asm.poll(now=0.5) == [] and asm.waiting  # volume 1 waits for its slice …
    [ev] = asm.poll(now=2.0)  # … until timeout_s after its last slice
    assert (ev.kind, ev.index, ev.skipped) == ("incomplete", 1, True) and "3 of 4 slices" in ev.detail
    assert not asm.waiting
    _, [late] = asm.add(read_dicom(write_slice(tmp_path / "late.dcm", 1, 2, acquisition=2)).slice, now=2.1)
    assert (late.kind, late.index) == ("late_slice", 1)
    _, [dup] = asm.add(read_dicom(files[(0, 1)]).slice, now=2.2)
    assert (dup.kind, dup.index) == ("duplicate", 0)


def test_vendor_numbering_ge_philips_and_no_header(tmp_path):
    rng = np.random.default_rng(2)
    cases = {  # name → how each slice is numbered
        "ge": dict(acquisition=1, images=None),  # one AcquisitionNumber for the run, InstanceNumber per slice
        "philips": dict(temporal="t", images=None),  # TemporalPositionIdentifier
        "siemens_no_count": dict(acquisition="t", images=None),  # per-volume numbers, no slice count
    }
    for name, how in cases.items():
        series = generate_uid()
        paths = []
        for t in range(3):
            for k in rng.permutation(NSL):
                kw = {key: (t + 1 if val == "t" else val) for key, val in how.items()}
                paths.append(write_slice(tmp_path / f"{name}{t}{k}.dcm", t, int(k), series=series, **kw))
        vols, events = _feed(SliceAssembler(1.0), paths)
        assert events == [], name
        # without a slice count, volumes 0 and 1 go out once volume 2 has begun (and 2 is never confirmed
        # by a later one, but its count is known by then)
        assert sorted(v.index for v in vols) == [0, 1, 2], name
        for v in vols:
            _check(v.data, v.affine, v.index)


def test_motion_corrected_positions_still_assemble(tmp_path):
    """Prospective motion correction moves each volume a little: slices group per volume, not per grid."""
    paths = [write_slice(tmp_path / f"{t}{k}.dcm", t, k, acquisition=t + 1, shift=0.4 * t)
             for t in range(2) for k in range(NSL)]
    vols, events = _feed(SliceAssembler(1.0), paths)
    assert events == [] and [v.index for v in vols] == [0, 1]
    assert vols[1].affine[:3, 3] == pytest.approx(vols[0].affine[:3, 3] + 0.4 * np.array([-1, -1, 1]) * NORMAL)


# --- live folder ------------------------------------------------------------------------------


def _wait(cond, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_live_folder_assembles_slices_and_retries_a_file_written_late(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    src = FolderSource(folder, tr=0.2, settle_s=0.02, partial_timeout_s=0.2, missing_after_s=5.0,
                       incomplete_after_s=1.5, n_volumes=4)
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(src), daemon=True)
    reader.start()
    full = write_slice(tmp_path / "full.dcm", 2, 3, acquisition=3).read_bytes()
    for t in (1, 0, 3, 2):
        for k in range(NSL):
            if (t, k) == (1, 0):
                continue  # never written: volume 1 is skipped as incomplete
            if (t, k) == (2, 3):  # the scanner stalls half way through this file
                (folder / "v2s3.dcm").write_bytes(full[: len(full) - 50])
                continue
            write_slice(folder / f"v{t}s{k}.dcm", t, k, acquisition=t + 1)
    write_slice(folder / "odd.dcm", 3, 0, acquisition=4, rows=3, pixels=stored(3)[..., 0])
    _wait(lambda: any(e.kind == "partial" for e in src.events), 30, "the half-written file reported")
    (folder / "v2s3.dcm").write_bytes(full)  # … and finishes it: read now, not rejected for good
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert sorted(v.tr_index for v in out) == [0, 2, 3]
    for v in out:
        _check(v.data, v.affine, v.tr_index)
    kinds = sorted((e.kind, e.tr_index) for e in src.events)
    assert ("incomplete", 1) in kinds and ("partial", None) in kinds and ("wrong_geometry", 3) in kinds
    assert {k for k, _ in kinds} <= {"incomplete", "partial", "wrong_geometry", "out_of_order"}
    assert out[0].acq_time_s is not None


def test_live_folder_enhanced_volumes_geometry_and_truncation(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    write_enhanced(folder / "e1.dcm", [0], instance=1)
    write_enhanced(folder / "e2.dcm", [1], instance=2, pixel_spacing=(2.0, 3.0))  # same shape, other voxels
    write_enhanced(folder / "e3.dcm", [2], instance=3, drop=(2,))  # a frame missing
    raw = write_enhanced(tmp_path / "e4.dcm", [3], instance=4).read_bytes()
    (folder / "e4.dcm").write_bytes(raw[: len(raw) // 2])  # truncated for good
    write_enhanced(folder / "e5.dcm", [4], instance=5)
    src = FolderSource(folder, tr=0.2, settle_s=0.02, partial_timeout_s=0.2, missing_after_s=60.0,
                       idle_timeout_s=0.5)
    out = list(src)
    assert [v.tr_index for v in out] == [0, 4]
    for v in out:
        _check(v.data, v.affine, v.tr_index)
    by_kind = {e.kind: e for e in src.events}
    assert set(by_kind) == {"wrong_geometry", "unreadable", "partial", "missing"}  # 1-3: never delivered
    assert by_kind["wrong_geometry"].tr_index == 1 and "voxel size" in by_kind["wrong_geometry"].detail
    assert "e3.dcm" in by_kind["unreadable"].path and "uneven slice spacing" in by_kind["unreadable"].detail
    assert by_kind["partial"].path.endswith("e4.dcm")
