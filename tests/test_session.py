"""The product path: a synthetic participant planted on agent features, replayed with agents.

Known answer: BOLD is planted on the tiny VLM's action- and reasoning-prompt features with
per-ROI unique-action, unique-reasoning and shared parts (``encoders.plant.PLANT``); replaying
the held-out run must give per-ROI scores in the planted order, above the block-permutation
chance band where strongly planted and inside it where nothing was planted, and the variance
partition must come back with the planted sign of unique action − unique reasoning. The demo
CLI runs the live path (emulator replay, agent processes, trigger-paced BOLD, encoders) and
writes a report.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from encoders.plant import PLANT, PartitionRow, Recovery, read_rows
from pipelines.session import replay_batch
from services.plumbing.transport import free_tcp_endpoint

# The first test builds the participant (the session-scoped `participant` fixture of conftest.py, shared with
# test_dashboard.py; about 70 s of CPU: four runs recorded, features extracted, weights
# and a variance partition fitted); on a machine shared with a training job that is many minutes of wall time.
pytestmark = pytest.mark.timeout(900)


def test_participant_is_a_bids_dataset_with_gamelogs_and_weights(participant):
    root = participant.root
    assert (root / "dataset_description.json").exists()
    for run in participant.runs:
        assert run["bold"].exists() and run["gamelog"].exists()
        events = (run["bold"].parent / run["bold"].name.replace("_bold.nii.gz", "_events.tsv")).read_text()
        assert "sourcedata/gamelogs" in events  # the BIDS run points at its gameplay recording
    assert set(participant.weights) == {"rl-0__policy", "vlm-0__action", "vlm-0__reasoning"}
    truth = json.loads((root / "derivatives" / "truth" / "truth.json").read_text())
    visual = next(p for p in PLANT if p.roi == "visual")
    assert truth["planted_roi_strengths"]["visual"] == {"unique_action": visual.unique_action,
                                                        "unique_reasoning": visual.unique_reasoning,
                                                        "shared": visual.shared}
    pattern = participant.planted_pattern()
    assert [r.roi for r in pattern.rois] == ["all"] + [p.roi for p in PLANT]
    assert pattern.held_out_run == len(participant.runs)


def test_prompt_conditions_carry_distinct_information(participant):
    # The unique parts are planted on the least correlated canonical pair of the two conditions' top PCs:
    # the other condition predicts c² of such a part, so c < 0.3 keeps over 90 % of it unique. With the
    # tiny VLM at its default init (attention uniform) that c was 0.99 and the same-unit r 0.997 (one
    # vector up to noise); below 0.9 a hidden unit shares at most 81 % of its variance across conditions.
    overlap = participant.planted_pattern().overlap
    assert overlap.canonical[0] > 0.9, overlap  # there is a signal both carry: the shared part
    assert overlap.canonical[-1] < 0.3, overlap
    assert overlap.same_unit_r < 0.9 and overlap.shared_fraction < 0.8, overlap


def test_variance_partition_recovers_the_planted_pattern(participant):
    rows = {r.roi: r for r in read_rows(participant.partition, PartitionRow)}
    for plant in PLANT:
        got = rows[plant.roi]
        if plant.unique_action != plant.unique_reasoning:  # action- or reasoning-dominant ROIs
            assert np.sign(got.unique_action - got.unique_reasoning) == \
                np.sign(plant.unique_action - plant.unique_reasoning), got
            assert got.planted_unique_action == pytest.approx(plant.unique_action, abs=0.05)
        elif plant.shared > 0:  # the shared ROI: both conditions explain the same variance
            assert got.shared > max(got.unique_action, got.unique_reasoning) + 0.1, got
        else:  # no signal: nothing to partition
            assert max(got.unique_action, got.unique_reasoning, got.shared) < 0.03, got


def test_batch_replay_recovers_the_planted_roi_ordering(participant, tmp_path):
    held_out = participant.runs[-1]["run"]
    summary = replay_batch(participant, [held_out], tmp_path / "batch", progress=lambda m: None)
    assert summary["replay_verified"]
    recovery = read_rows(tmp_path / "batch" / "recovery.tsv", Recovery)
    assert [(r["agent"], r["condition"], r["roi"]) for r in summary["recovery"]] == \
        [(r.agent, r.condition, r.roi) for r in recovery]
    for stream in ("vlm-0__action", "vlm-0__reasoning"):
        rows = [r for r in recovery if r.stream == stream and r.roi != "all"]
        assert {r.roi for r in rows} == {p.roi for p in PLANT}
        rho = spearmanr([r.planted_fraction for r in rows], [r.r for r in rows]).statistic
        assert rho >= 0.7, (stream, rows)
        for r in rows:
            assert r.n_trs == 60 and r.null_lo < 0 < r.null_hi, r
            if r.planted_fraction >= 0.45:
                # the most strongly planted ROIs of this stream: above chance, and near what a perfect
                # model scores. Not every ROI: Breakout's tiny-VLM features are not stationary across
                # runs (a canonical variate can sit mostly in one run), so a model fitted on three runs
                # recovers the weaker unique parts of the fourth only partly (measured: unique action
                # 0.35 → r 0.22 with p 0.05; Pong's features gave |r − planted r| < 0.25 everywhere).
                assert r.p < 0.05, r
                assert abs(r.r - r.planted_r) < 0.4, r
    for r in recovery:
        if r.roi == "temporal":  # nothing planted there: every stream's score lies in the chance band
            assert r.null_lo <= r.r <= r.null_hi, r
    assert summary["planted"]["overlap"]["canonical"][-1] < 0.3
    html = (tmp_path / "batch" / "report.html").read_text()
    assert "id='known-answer'" in html and "unique action planted" in html


def test_demo_json_runs_the_live_loop_and_writes_a_report(participant, tmp_path):
    port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "neuroarcade.cli", "demo", "--json", "--seconds", "12",
                           "--participant", str(participant.root), "--out", str(out), "--dashboard-port", str(port)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    by_stream = {(a["agent_id"], a["condition"]): a for a in summary["agents"]}
    for key in (("rl-0", ""), ("vlm-0", "action"), ("vlm-0", "reasoning")):
        assert by_stream[key]["decisions"] > 0 and by_stream[key]["activations"] > 0, by_stream[key]
    assert summary["replay_verified"] is True
    for stream in ("rl-0__policy", "vlm-0__action", "vlm-0__reasoning"):
        enc = summary["encoders"][stream]
        assert enc["trs_scored"] >= 4 and enc["errors"] == {}, enc
        rows = _roi_mean_rows(out / "run" / f"{stream}_scores.tsv")
        assert set(summary["scores"][stream]) == set(rows), (stream, summary["scores"][stream], rows)
        n_trs = {n for _, n in rows.values()}
        assert n_trs == {enc["trs_scored"]}, (stream, rows, enc)
        offline = _offline_roi_r(out / "run", stream, participant, summary["run"], enc["trs_scored"])
        assert set(offline) == set(rows), (stream, sorted(offline), sorted(rows))
        for roi, want in offline.items():
            live = summary["scores"][stream][roi]
            assert math.isfinite(want) and live is not None, (stream, roi, want, live)  # a real, defined score
            assert live == pytest.approx(want, abs=1e-3), (stream, roi, live, want)
            assert rows[roi][0] == pytest.approx(want, abs=1e-3), (stream, roi, rows[roi], want)
        assert (out / "run" / f"{stream}_scores.tsv").exists() and (out / "run" / f"{stream}_pred.nii.gz").exists()
    html = (out / "run" / "report.html").read_text()
    assert "data:image/png;base64," in html and "vlm-0" in html and "id='known-answer'" in html
    recovered = {(r["agent"], r["condition"], r["roi"]) for r in summary["recovery"]}
    assert {("vlm-0", "action", "visual"), ("vlm-0", "reasoning", "temporal"), ("rl-0", "", "all")} <= recovered
    latency = json.loads((out / "run" / "latency.json").read_text())
    assert np.median(latency["vlm-0"]["action"]) > 0


def _roi_mean_rows(path) -> dict[str, tuple[float, int]]:
    """ROI → (r, n_trs) of the ``roi_mean`` rows of an encoding service's scores table."""
    import csv

    with open(path) as f:
        return {row["roi"]: (float(row["r"]), int(row["n_trs"]))
                for row in csv.DictReader(f, delimiter="\t") if row["kind"] == "roi_mean"}


def _offline_roi_r(run_dir, stream: str, participant, run: str, n_trs: int) -> dict[str, float]:
    """The live ROI score recomputed from files: Pearson r over the scored TRs (0..n_trs-1: every volume
    reaches the encoder in order) of the ROI mean of the predicted NIfTI vs the ROI mean of the replayed
    run's measured BOLD (raw values, as the service receives them), ROIs from the run's atlas copy;
    'all' is every voxel the weights predict (the prediction is zero outside that mask)."""
    import nibabel as nib

    from encoders.weights import EncodingWeights

    bold = next(r["bold"] for r in participant.runs if r["run"] == run)
    pred_img, meas_img = nib.load(str(run_dir / f"{stream}_pred.nii.gz")), nib.load(str(bold))
    assert pred_img.ndim == 4 and pred_img.shape[3] >= n_trs and meas_img.shape[3] >= n_trs, \
        (pred_img.shape, meas_img.shape, n_trs)
    pred = np.asarray(pred_img.dataobj[..., :n_trs], dtype=np.float64)
    meas = np.asarray(meas_img.dataobj[..., :n_trs], dtype=np.float64)
    mask = EncodingWeights.load(participant.weights[stream]).mask
    atlas = np.asarray(nib.load(str(run_dir / "atlas.nii.gz")).dataobj).astype(int)
    names = {int(i): n for i, n in (line.split("\t") for line in
                                    (run_dir / "atlas_labels.tsv").read_text().splitlines()[1:] if line)}
    rois = {"all": mask} | {names[k]: mask & (atlas == k) for k in sorted(set(np.unique(atlas[mask])) - {0})}
    return {roi: float(np.corrcoef(pred[sel].mean(0), meas[sel].mean(0))[0, 1]) for roi, sel in rois.items()}


def test_live_with_a_simulated_scanner_scores_trs_and_records_triggers(participant, tmp_path):
    from services.plumbing.recording import read_recording
    from pipelines.session import LivePlan, run_live

    port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    plan = LivePlan(participant, tmp_path / "export", tmp_path / "live", duration_s=14.0,
                    simulate=participant.runs[-1]["bold"], dashboard_port=port, on_dashboard=lambda url: None)
    summary = run_live(plan, progress=lambda m: None)
    rec = read_recording(tmp_path / "live" / "session.narec")
    assert len(rec.triggers) >= 5  # forwarded from the scanner, recorded on the emulator clock
    assert {a["agent_id"] for a in summary["agents"] if a["decisions"] > 0} == {"rl-0", "vlm-0"}
    for stream, enc in summary["encoders"].items():
        assert enc["trs_predicted"] >= 3 and enc["trs_scored"] >= 3, (stream, enc)
    assert (tmp_path / "live" / "report.html").exists()
