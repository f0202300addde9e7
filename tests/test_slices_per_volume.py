"""``--slices-per-volume`` (``scanner live``, ``live``): an override of the slice count of single-slice DICOM
series, for exports whose headers do not say it. GE numbers every slice of a run with AcquisitionNumber 1: with
the count given, the first volume goes out as soon as its slices are there, and the next volume's slices
(same AcquisitionNumber, new InstanceNumbers) must start volume 1, not be dropped as duplicates of volume 0."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from services.plumbing.dicom import SliceAssembler
from services.plumbing.transport import free_tcp_endpoint
from tests.test_dicom import NSL, _check, _feed, write_slice


def _ge_series(folder: Path, n_volumes: int) -> list[Path]:
    series = generate_uid()
    return [write_slice(folder / f"v{t}s{k}.dcm", t, k, series=series, acquisition=1, images=None)
            for t in range(n_volumes) for k in range(NSL)]


def test_given_slice_count_assembles_a_ge_series_at_once(tmp_path):
    paths = _ge_series(tmp_path, 3)
    vols, events = _feed(SliceAssembler(1.0, slices_per_volume=NSL), paths)
    assert events == [] and [v.index for v in vols] == [0, 1, 2]  # each out once its last slice is there
    for v in vols:
        _check(v.data, v.affine, v.index)
    # a wrong override: no volume of the wrong size comes out, and it is reported, not raised
    wrong = SliceAssembler(1.0, slices_per_volume=NSL + 1)
    out, events = _feed(wrong, paths)
    events += wrong.poll(100.0, final=True)
    assert out == [] and events and all(e.kind in ("incomplete", "duplicate", "late_slice") for e in events)


def test_scanner_command_takes_slices_per_volume(tmp_path):
    from typer.testing import CliRunner

    from neuroarcade.cli import app

    (tmp_path / "export").mkdir()
    _ge_series(tmp_path / "export", 2)
    res = CliRunner().invoke(app, ["scanner", "live", "--folder", str(tmp_path / "export"), "--n-volumes", "2",
                                   "--endpoint", free_tcp_endpoint(), "--slices-per-volume", str(NSL)])
    assert res.exit_code == 0, res.output
    assert "published 2 volumes" in res.output and "duplicate" not in res.output
    bad = CliRunner().invoke(app, ["scanner", "live", "--folder", str(tmp_path / "export"), "--slices-per-volume", "0"])
    assert bad.exit_code == 2
