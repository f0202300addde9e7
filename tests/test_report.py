"""Run report: a small run folder with synthetic numbers and real NIfTI files → report.html."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.report import headline_scores, load_run, write_report

ROIS = {1: "visual", 2: "motor", 3: "prefrontal"}


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(v) for v in r) + "\n" for r in rows))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run_dir(tmp_path)


def make_run_dir(tmp_path: Path) -> Path:
    """Scores of two VLM prompt conditions and an RL baseline, a partition, an atlas, maps, latencies."""
    import nibabel as nib

    run = tmp_path / "run"
    (run / "encoding").mkdir(parents=True)
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-72, -104, -56]  # an MNI-like 8 mm grid so nilearn's template sits under it
    shape = (19, 24, 17)
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk * 8.0 + affine[:3, 3]
    brain = ((xyz / [70, 95, 70]) ** 2).sum(1) < 1
    labels = np.zeros(len(xyz), np.int16)
    labels[brain & (xyz[:, 1] < -50)] = 1
    labels[brain & (np.abs(xyz[:, 1] + 10) < 20) & (xyz[:, 2] > 20)] = 2
    labels[brain & (xyz[:, 1] > 20)] = 3
    nib.save(nib.Nifti1Image(labels.reshape(shape), affine), run / "atlas.nii.gz")
    _write_tsv(run / "atlas_labels.tsv", ["index", "name"], [[k, v] for k, v in ROIS.items()])
    # per-stream tables as the encoding service writes them, one per agent × prompt condition
    # (a roi_mean and a voxel_mean row per ROI: the figures and tables show the roi_mean ones)
    service_cols = ["roi", "n_voxels", "n_trs", "kind", "r", "n_undefined"]
    _write_tsv(run / "encoding" / "vlm-0__action_scores.tsv", service_cols, [
        [roi, n, 120, kind, r, 0] for roi, n, r_roi, r_vox in [
            ("all", 900, 0.412, 0.201), ("visual", 300, 0.731, 0.402), ("motor", 120, 0.254, 0.111),
            ("prefrontal", 200, 0.137, 0.05)] for kind, r in (("roi_mean", r_roi), ("voxel_mean", r_vox))])
    _write_tsv(run / "encoding" / "vlm-0__reasoning_scores.tsv", service_cols, [
        [roi, n, 120, kind, r, 0] for roi, n, r_roi, r_vox in [
            ("all", 900, 0.388, 0.19), ("visual", 300, 0.529, 0.3), ("motor", 120, 0.318, 0.12),
            ("prefrontal", 200, 0.447, 0.21)] for kind, r in (("voxel_mean", r_vox), ("roi_mean", r_roi))])
    # a long table for an RL baseline
    _write_tsv(run / "scores.tsv", ["agent", "condition", "roi", "r", "r2"],
               [["rl-0", "", "visual", 0.356, 0.127], ["rl-0", "", "motor", 0.093, 0.009],
                ["rl-0", "", "prefrontal", -0.021, -0.004]])
    _write_tsv(run / "partition.tsv", ["roi", "unique_action", "unique_reasoning", "shared"],
               [["visual", 0.061, 0.018, 0.103], ["motor", 0.047, 0.009, 0.02], ["prefrontal", 0.012, 0.083, 0.031]])
    rng = np.random.default_rng(0)
    r_map = np.where(labels.reshape(shape) > 0, rng.uniform(-0.2, 0.8, shape), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(r_map, affine), run / "encoding" / "vlm-0__action_cv_r.nii.gz")
    pred = (rng.standard_normal(shape + (30,)) * (labels.reshape(shape) > 0)[..., None]).astype(np.float32)
    nib.save(nib.Nifti1Image(pred, affine), run / "encoding" / "vlm-0__action_pred.nii.gz")
    (run / "latency.json").write_text(json.dumps({
        "vlm-0": {"action": list(rng.gamma(8, 6, 300)), "reasoning": list(rng.gamma(9, 7, 300))},
        "rl-0": {"": list(rng.gamma(4, 0.5, 300))},
        "staleness_ms": {"vlm-0": {"action": list(rng.gamma(3, 10, 300))}}}))
    return run


def test_load_run_reads_every_input(run_dir: Path):
    data = load_run(run_dir)
    streams = {(r["agent"], r["condition"]) for r in data.scores}
    assert streams == {("vlm-0", "action"), ("vlm-0", "reasoning"), ("rl-0", "")}
    assert {r["kind"] for r in data.scores} == {"roi_mean", "voxel_mean", ""}
    visual = [r for r in data.scores if r["agent"] == "vlm-0" and r["condition"] == "action" and r["roi"] == "visual"]
    assert {r["kind"]: r["r"] for r in visual} == {"roi_mean": pytest.approx(0.731), "voxel_mean": pytest.approx(0.402)}
    assert visual[0]["n_voxels"] == 300
    headline = headline_scores(data.scores)  # roi_mean wherever a stream has it, whichever row comes first
    assert {(r["agent"], r["kind"]) for r in headline} == {("vlm-0", "roi_mean"), ("rl-0", "")}
    assert len(headline) == 4 + 4 + 3
    assert [p["roi"] for p in data.partitions] == ["visual", "motor", "prefrontal"]
    assert data.partitions[2]["unique_reasoning"] == pytest.approx(0.083)
    assert data.atlas is not None and data.atlas_names == ROIS
    assert [p.name for p in data.maps_3d] == ["vlm-0__action_cv_r.nii.gz"]
    assert [p.name for p in data.maps_4d] == ["vlm-0__action_pred.nii.gz"]
    assert set(data.latency) == {"vlm-0", "rl-0"} and len(data.latency["vlm-0"]["action"]) == 300
    assert len(data.staleness["vlm-0"]["action"]) == 300


def test_report_html_has_sections_images_and_numbers(run_dir: Path):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text()
    for anchor in ("id='scores'", "id='partition'", "id='maps'", "id='latency'", "id='files'"):
        assert anchor in page
    images = page.split('src="data:image/png;base64,')[1:]
    # ROI bars, partition bars + scatter, 3 atlas paintings + 1 r map + 1 predicted map, latency + staleness
    assert len(images) == 10
    for img in images:
        raw = base64.b64decode(img.split('"', 1)[0])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5_000
    for number in ("0.731", "0.529", "0.447", "0.356", "-0.021", "0.083", "0.061"):
        assert f"<td>{number}</td>" in page, number
    assert "http://" not in page and "https://" not in page  # self-contained
    merged = (run_dir / "report_scores.tsv").read_text().splitlines()
    assert merged[0].split("\t")[:5] == ["agent", "condition", "roi", "r", "kind"]
    assert len(merged) == 1 + 8 + 8 + 3  # every row, both kinds
    assert any(line.startswith("vlm-0\treasoning\tprefrontal\t0.447\troi_mean\t") for line in merged)
    assert any(line.startswith("vlm-0\treasoning\tprefrontal\t0.21\tvoxel_mean\t") for line in merged)
    assert "<td>0.402</td>" not in page  # the ROI table shows the headline kind only
    summary = json.loads((run_dir / "report.json").read_text())
    assert summary["latency_ms"]["rl-0"][""]["n"] == 300
    lat = np.array(json.loads((run_dir / "latency.json").read_text())["vlm-0"]["action"])
    assert summary["latency_ms"]["vlm-0"]["action"]["p50"] == pytest.approx(np.percentile(lat, 50))
    # reading the folder again ignores the report's own outputs
    assert len(load_run(run_dir).scores) == len(merged) - 1


def test_report_command_and_empty_folder(tmp_path: Path):
    from typer.testing import CliRunner

    from neuroarcade.cli import app

    run = tmp_path / "small"
    run.mkdir()
    _write_tsv(run / "scores.tsv", ["agent", "condition", "roi", "r"], [["a", "x", "v1", 0.25], ["a", "x", "v2", 0.5]])
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--title", "T1"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert "<title>T1</title>" in page and "<td>0.500</td>" in page and page.count("data:image/png;base64,") == 1
    assert "No variance partitioning results" in page and "No latency samples" in page
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no scores"):
        write_report(empty)


@pytest.mark.slow  # nilearn brain maps
def test_report_shows_planted_beside_recovered(run_dir: Path):
    from encoders.plant import Recovery, write_rows

    write_rows(run_dir / "recovery.tsv", [
        Recovery("vlm-0", "action", "motor", 0.5, 0.71, 0.69, -0.31, 0.31, 0.001, 60),
        Recovery("vlm-0", "action", "prefrontal", 0.07, 0.3, 0.36, -0.26, 0.42, 0.085, 60),
        Recovery("rl-0", "", "motor", float("nan"), float("nan"), 0.04, -0.16, 0.17, 0.5, 60)])
    _write_tsv(run_dir / "partition.tsv", ["roi", "unique_action", "unique_reasoning", "shared",
                                           "planted_unique_action", "planted_unique_reasoning", "planted_shared"],
               [["motor", 0.3, -0.01, 0.02, 0.48, 0.02, 0.05], ["prefrontal", -0.01, 0.27, 0.13, 0.02, 0.45, 0.05]])
    data = load_run(run_dir)
    assert [r.roi for r in data.recovery] == ["motor", "prefrontal", "motor"]
    assert not any(r["source"] == "recovery.tsv" for r in data.scores)  # its r restates the scores tables
    assert data.partitions[0]["planted_unique_action"] == pytest.approx(0.48)
    page = write_report(run_dir).read_text()
    known = page[page.index("id='known-answer'"):page.index("id='scores'")]
    assert "5-TR blocks" in known and "1000 permutations" in known
    assert "<td>vlm-0 · action</td><td>motor</td><td>0.500</td><td>0.710</td><td>0.690</td>" in known
    assert "<td>rl-0 · policy</td><td>motor</td><td>–</td><td>–</td><td>0.040</td>" in known  # nothing planted
    partition = page[page.index("id='partition'"):page.index("id='maps'")]
    assert "<th>unique action planted</th><th>unique action recovered</th>" in partition
    assert "<td>prefrontal</td><td>0.020</td><td>-0.010</td><td>0.450</td><td>0.270</td>" in partition


def _write_session_qc(folder: Path, stems: list[str]) -> "object":
    """A phantom session (slow ramp + one jerk) through the real live preprocessing (``LivePreprocess``) of small
    weights that keep their reference, its QC files written per stem as the encoding service writes them."""
    from encoders.fit import FitConfig, fit_encoding
    from encoders.phantom import PhantomConfig, phantom_run
    from encoders.preprocess import PreprocessConfig
    from encoders.stream import LivePreprocess
    from encoders.weights import PreprocessRecord

    ph = phantom_run(PhantomConfig(shape=(20, 20, 12), voxel_mm=(8.0, 8.0, 8.0), n_volumes=30, jerks=(18,),
                                   jerk_mm=2.0, jerk_deg=1.0, spikes=(), seed=4))
    mask = ph.brain > 500
    rng = np.random.default_rng(0)
    X = [rng.normal(size=(30, 3)).astype(np.float32) for _ in range(2)]
    Y = [rng.normal(size=(30, int(mask.sum()))).astype(np.float32) for _ in range(2)]
    w = fit_encoding(Y, {"a": X}, FitConfig(score=False, progress=False, delays=[0]), mask=mask, affine=ph.affine,
                     tr=2.0).weights
    w.preprocessing = PreprocessRecord(mode="causal", config=PreprocessConfig(warmup_trs=5, fd_threshold_mm=0.9,
                                                                              dvars_threshold=0).to_dict())
    w.reference = ph.brain
    live = LivePreprocess(w)
    for t, vol in enumerate(ph.volumes):
        live.push(t, vol, 2.0 * t, ph.affine)
    for stem in stems:
        live.write_qc(folder, stem)
    return live


def test_report_shows_motion_excluded_trs_tsnr_and_the_alignment_overlay(tmp_path: Path):
    run = tmp_path / "run"
    (run / "enc").mkdir(parents=True)
    _write_tsv(run / "scores.tsv", ["agent", "condition", "roi", "r"], [["vlm-0", "action", "all", 0.3]])
    live = _write_session_qc(run / "enc", ["vlm-0__action", "vlm-0__reasoning"])  # one session, two encoders
    excluded = [q.tr_index for q in live.trace if q.excluded]
    assert 18 in excluded and live.alignment.converged
    data = load_run(run)
    assert len(data.quality) == 1 and data.quality[0].streams == ["vlm-0__action", "vlm-0__reasoning"]
    assert not any(r["source"].endswith("_tsnr.tsv") for r in data.scores)  # QC tables are not scores tables
    page = write_report(run).read_text()
    quality = page[page.index("id='quality'"):page.index("id='files'")]
    assert quality.count("data:image/png;base64,") == 2  # the motion plot and the alignment overlay
    assert f"{len(excluded)} of 30 TRs excluded" in quality and f"warm-up: {live.counts.warmup}" in quality
    assert f"FD: {live.counts.fd}" in quality and "18" in quality
    assert "<th>tSNR median</th>" in quality and "<td>all</td>" in quality
    assert "registered to the weights' reference" in quality and "vlm-0__action_alignment.png" in quality
    summary = json.loads((run / "report.json").read_text())["quality"][0]
    assert summary["excluded"] == excluded and summary["alignment"]["converged"] is True
    assert summary["overlay"].endswith("vlm-0__action_alignment.png") and summary["preprocess_ms"]["n"] == 30
    assert summary["tsnr"][0]["roi"] == "all" and summary["tsnr"][0]["tsnr_median"] > 20
