"""BOLD sources on real files: nibabel's functional.nii, real Siemens mosaic DICOMs, truncated files."""

from __future__ import annotations

import gzip
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import zmq

from protocols import BoldVolume, Decoder, Trigger
from services.scanner import (FolderSource, RecordedSource, SimulatedScannerConfig, publish_stream,
                              read_volume_file, run_simulated_scanner)
from services.plumbing.transport import TOPIC_BOLD, TOPIC_TRIGGER, free_tcp_endpoint, split_topic

NIB_DIR = Path(os.path.dirname(nib.__file__))
FUNCTIONAL = NIB_DIR / "tests" / "data" / "functional.nii"
# real Siemens DWI mosaics (InstanceNumber 1 and 2), gzipped in nibabel's test data
MOSAICS_GZ = [NIB_DIR / "nicom" / "tests" / "data" / f"siemens_dwi_{b}.dcm.gz" for b in (0, 1000)]


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("dicom")
    paths = []
    for i, gz in enumerate(MOSAICS_GZ):
        paths.append(out / f"mosaic{i}.dcm")
        paths[-1].write_bytes(gzip.decompress(gz.read_bytes()))
    return paths


def _wait(cond, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _read_into(src, out: list) -> threading.Thread:
    """Iterate ``src`` in a thread, appending each volume to ``out`` as it is delivered."""

    def run():
        for v in src:
            out.append(v)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _mosaic(path: Path) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_data(pydicom.dcmread(str(path))).get_data()


def test_recorded_replays_functional_nii_from_a_start_time():
    img = nib.load(FUNCTIONAL)
    vols = list(RecordedSource(FUNCTIONAL, speed=0))
    assert [v.tr_index for v in vols] == list(range(20))
    assert vols[0].data.shape == (17, 21, 3) and vols[0].acq_time_s == 0.0 and vols[3].acq_time_s == 6.0
    np.testing.assert_array_equal(np.stack([v.data for v in vols], axis=-1), np.asarray(img.dataobj))
    later = list(RecordedSource(FUNCTIONAL, speed=0, start_s=31.0))
    assert [v.tr_index for v in later] == list(range(15, 20))
    t0 = time.monotonic()
    paced = list(RecordedSource(FUNCTIONAL, speed=40.0, start_s=30.0))  # 5 volumes × 2 s / 40 = 0.25 s
    assert len(paced) == 5 and time.monotonic() - t0 >= 0.24


def test_live_folder_reads_real_siemens_mosaics_out_of_order(tmp_path, mosaics):
    folder = tmp_path / "export"
    folder.mkdir()
    src = FolderSource(folder, tr=2.0, n_volumes=2, settle_s=0.05, missing_after_s=60.0)
    out = []
    reader = _read_into(src, out)
    shutil.copy(mosaics[1], folder / "MR.0002.dcm")  # the second volume lands first
    _wait(lambda: len(out) == 1, 60, "the second volume delivered")  # read before the first exists
    shutil.copy(mosaics[0], folder / "MR.0001.dcm")
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert [v.tr_index for v in out] == [1, 0]
    assert out[0].data.shape == (128, 128, 48)
    assert out[1].acq_time_s == pytest.approx(-6.6275)  # AcquisitionTime relative to the first received
    np.testing.assert_array_equal(out[1].data, _mosaic(mosaics[0]))
    assert [e.kind for e in src.events] == ["out_of_order"]


def test_truncated_files_are_reported_and_the_stream_goes_on(tmp_path, mosaics):
    folder = tmp_path / "export"
    folder.mkdir()
    raw = mosaics[0].read_bytes()
    (folder / "MR.0001.dcm").write_bytes(raw[: len(raw) // 2])  # truncated DICOM (pixel data cut)
    img = nib.load(FUNCTIONAL)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., 0]), img.affine), folder / "good_00003.nii")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., 1]), img.affine), tmp_path / "full.nii")
    full = (tmp_path / "full.nii").read_bytes()
    (folder / "vol_00004.nii").write_bytes(full[: len(full) // 2])  # truncated NIfTI
    with pytest.raises(Exception, match="Expected 8568 bytes"):
        read_volume_file(folder / "vol_00004.nii")
    src = FolderSource(folder, tr=2.0, settle_s=0.05, partial_timeout_s=0.3, idle_timeout_s=0.8)
    out = list(src)
    assert [v.tr_index for v in out] == [3]
    partial = sorted(e.path for e in src.events if e.kind == "partial")
    assert [Path(p).name for p in partial] == ["MR.0001.dcm", "vol_00004.nii"]
    assert "pixel data" in next(e.detail for e in src.events if e.path.endswith(".dcm"))


def test_missing_late_duplicate_and_wrong_shape(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    img = nib.load(FUNCTIONAL)

    def write(name, k, data=None):
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., k]) if data is None else data, img.affine),
                 folder / name)

    # idle_timeout_s ends the stream once the test is done writing: generous, a loaded machine may pause
    src = FolderSource(folder, tr=0.2, settle_s=0.02, missing_after_s=0.3, idle_timeout_s=5.0)
    out = []
    reader = _read_into(src, out)

    def events():
        return [(e.kind, e.tr_index) for e in src.events]

    write("vol_00000.nii", 0)
    write("vol_00002.nii", 2)
    _wait(lambda: ("missing", 1) in events(), 60, "volume 1 declared missing")
    write("vol_00001.nii", 1)  # … then arrives late
    write("vol_00003.nii", 3, np.zeros((5, 5, 5), np.int16))  # wrong shape
    _wait(lambda: ("late", 1) in events() and ("wrong_shape", 3) in events(), 60, "the late and wrong-shape volumes")
    write("again_00002.nii", 2)  # duplicate index
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert [v.tr_index for v in out] == [0, 2, 1]
    kinds = [(e.kind, e.tr_index) for e in src.events]
    assert kinds == [("missing", 1), ("late", 1), ("wrong_shape", 3), ("duplicate", 2)]


def test_simulated_scanner_writes_at_tr_pace_and_publishes(tmp_path):
    ctx = zmq.Context()
    trig_ep, bold_ep = free_tcp_endpoint(), free_tcp_endpoint()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(trig_ep)
    sub.connect(bold_ep)
    folder = tmp_path / "export"
    cfg = SimulatedScannerConfig(bold=str(FUNCTIONAL), folder=str(folder), speed=40.0, n_volumes=6,
                                 trigger_endpoint=trig_ep, wait_subscribers=1, skip=(4,))
    sim = threading.Thread(target=run_simulated_scanner, args=(cfg, ctx))
    src = FolderSource(folder, tr=0.05, n_volumes=6, settle_s=0.01, missing_after_s=1.0)
    pub = threading.Thread(target=publish_stream, args=(src, bold_ep, ctx), kwargs={"wait_subscribers": 1})
    pub.start()
    sim.start()
    t0 = time.monotonic()
    dec = Decoder(accept=[Trigger, BoldVolume])
    triggers, volumes = [], []
    while (len(triggers) < 6 or len(volumes) < 5) and time.monotonic() - t0 < 120:
        if sub.poll(100):
            topic, parts = split_topic(sub.recv_multipart())
            msg = dec.decode(parts)
            (triggers if topic == TOPIC_TRIGGER else volumes).append(msg)
    sim.join(timeout=60)
    pub.join(timeout=60)
    sub.close()
    ctx.term()
    assert [t.tr_index for t in triggers] == list(range(6))
    times = np.array([t.t_ns for t in triggers]) / 1e9
    # paced at TR / speed: 5 TRs × (2 s / 40) at least (load may only stretch it, so no upper bound)
    assert np.all(np.diff(times) > 0) and times[-1] - times[0] >= 0.24
    assert [v.tr_index for v in volumes] == [0, 1, 2, 3, 5]
    data = np.asarray(nib.load(FUNCTIONAL).dataobj)
    np.testing.assert_array_equal(volumes[-1].data, data[..., 5])
    assert np.allclose(np.reshape(volumes[0].affine, (4, 4)), nib.load(FUNCTIONAL).affine)
    assert [e.kind for e in src.events] == ["missing"]
    assert sorted(p.name for p in folder.iterdir()) == [f"vol_{k:05d}.nii" for k in (0, 1, 2, 3, 5)]
    assert TOPIC_BOLD == b"bold"


def test_scanner_metrics_count_volumes_and_stream_events(tmp_path):
    """`scanner --metrics-port`: volumes published and the export's faults, by kind, on /metrics."""
    import urllib.request

    folder = tmp_path / "export"
    folder.mkdir()
    img = nib.load(FUNCTIONAL)
    for name, k in (("vol_00000.nii", 0), ("vol_00001.nii", 1), ("again_00001.nii", 1)):
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., k]), img.affine), folder / name)
    port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    stop = threading.Event()
    src = FolderSource(folder, tr=0.2, settle_s=0.02, stop=stop)
    sent = []
    streamer = threading.Thread(target=lambda: sent.append(
        publish_stream(src, free_tcp_endpoint(), zmq.Context(), metrics_port=port)))
    streamer.start()

    def scrape() -> dict[str, float]:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return {}
        return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l and l[0] != "#"}

    try:
        t_end = time.monotonic() + 120
        while scrape().get('neuroarcade_scanner_stream_events_total{kind="duplicate"}') != 1:
            assert time.monotonic() < t_end, scrape()
            time.sleep(0.05)
        m = scrape()
        assert m["neuroarcade_scanner_volumes_published_total"] == 2
        assert m["neuroarcade_scanner_tr_index"] == 1  # the highest, though TR 0 was read after TR 1
        assert m['neuroarcade_scanner_stream_events_total{kind="out_of_order"}'] == 1
        assert 0 <= m["neuroarcade_scanner_seconds_since_volume"] < 120
    finally:
        stop.set()
        streamer.join(60)
    assert sent == [2]


def test_simulated_scanner_adds_known_faults_and_writes_their_truth(tmp_path):
    """--faults: every written volume carries the schedule's motion/drift/spikes; the truth TSV (fMRIPrep columns)
    is what a realignment of the written volumes recovers."""
    from encoders.faults import FaultConfig, FaultError, apply_faults, fault_schedule, read_motion_tsv
    from encoders.motion import prepare_reference, realign
    from encoders.phantom import PhantomConfig, phantom_run

    ph = phantom_run(PhantomConfig(shape=(24, 24, 12), voxel_mm=(5.0, 5.0, 6.0), n_volumes=1, jerks=(), spikes=(),
                                   drift=0.0, noise=0.0))
    n, tr = 12, 2.0
    img = nib.Nifti1Image(np.repeat(ph.brain[..., None], n, axis=3), ph.affine)
    img.header["pixdim"][4] = tr
    nib.save(img, tmp_path / "still.nii.gz")
    faults = FaultConfig.parse("realistic,physio=0,seed=7")
    cfg = SimulatedScannerConfig(bold=str(tmp_path / "still.nii.gz"), folder=str(tmp_path / "export"), speed=200.0,
                                 faults=faults)
    written = run_simulated_scanner(cfg)
    assert len(written) == n
    truth_tsv = tmp_path / "export" / "truth_motion.tsv"
    header = truth_tsv.read_text().splitlines()[0].split("\t")
    assert header == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement"]
    sched = fault_schedule(faults, n, tr, ph.brain.shape)
    truth = read_motion_tsv(truth_tsv)
    np.testing.assert_allclose(truth, sched.motion, atol=1e-7)
    vols = [np.asarray(nib.load(p).dataobj) for p in written]
    np.testing.assert_allclose(vols[5], apply_faults(ph.brain, 5, sched, ph.affine), rtol=1e-6)
    ref = prepare_reference(vols[0], ph.affine)
    est = np.stack([realign(v, ref, ph.affine).params for v in vols])
    assert np.abs(truth[:, :3]).max() > 1.0 and np.median(np.abs(est - truth)[:, :3]) < 0.1
    assert np.rad2deg(np.median(np.abs(est - truth)[:, 3:])) < 0.1
    # a FolderSource watching the export ignores the truth file (not a volume)
    src = FolderSource(tmp_path / "export", tr=tr, settle_s=0.0, idle_timeout_s=0.3, n_volumes=n)
    assert [v.tr_index for v in src] == list(range(n)) and not src.events
    # bad fault settings: one clear error naming the setting
    for bad, words in (("motion_mm=-1", "motion_mm"), ("wobble=2", "unknown fault setting"),
                       ("jerks=1.5", "jerks=1.5"), ("chaotic", "unknown preset"), ("max_deg=45", "max_deg")):
        with pytest.raises(FaultError, match=words):
            FaultConfig.parse(bad)
    with pytest.raises(FaultError, match="shape"):  # a volume of another geometry than the schedule's
        apply_faults(np.ones((8, 8, 8), np.float32), 1, fault_schedule(FaultConfig(physio=0.01), n, tr, (24, 24, 12)),
                     ph.affine)
    with pytest.raises(FaultError, match="outside"):
        apply_faults(ph.brain, n, sched, ph.affine)
    nib.save(nib.Nifti1Image(ph.brain, ph.affine), tmp_path / "one.nii.gz")  # a 3-D file is no run to simulate
    with pytest.raises(ValueError, match="not a 4D run"):
        run_simulated_scanner(SimulatedScannerConfig(bold=str(tmp_path / "one.nii.gz"), folder=str(tmp_path / "x"),
                                                     faults=faults))
