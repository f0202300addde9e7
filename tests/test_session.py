"""The product path: a synthetic participant planted on agent features, replayed with agents.

Known answer: BOLD is planted on the tiny VLM's features with well-separated per-ROI strengths;
replaying the held-out run must give per-ROI scores in the planted order. The demo CLI runs the
live path (emulator replay, agent processes, trigger-paced BOLD, encoders) and writes a report.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from services.session import PLANTED, Participant, ParticipantConfig, make_participant, planted_roi_strength, \
    replay_batch
from services.transport import free_tcp_endpoint


@pytest.fixture(scope="session")
def participant(tmp_path_factory) -> Participant:
    return make_participant(tmp_path_factory.mktemp("participant"), ParticipantConfig(runs=3, trs=60),
                            progress=lambda m: None)


def test_participant_is_a_bids_dataset_with_gamelogs_and_weights(participant):
    root = participant.root
    assert (root / "dataset_description.json").exists()
    for run in participant.runs:
        assert run["bold"].exists() and run["gamelog"].exists()
        events = (run["bold"].parent / run["bold"].name.replace("_bold.nii.gz", "_events.tsv")).read_text()
        assert "sourcedata/gamelogs" in events  # the BIDS run points at its gameplay recording
    assert set(participant.weights) == {"rl-0__policy", "vlm-0__action", "vlm-0__reasoning"}
    truth = json.loads((root / "derivatives" / "truth" / "truth.json").read_text())
    assert truth["planted_roi_strengths"]["visual"] == {"action": PLANTED["visual"][0], "reasoning": PLANTED["visual"][1]}


def test_batch_replay_recovers_the_planted_roi_ordering(participant, tmp_path):
    held_out = participant.runs[-1]["run"]
    summary = replay_batch(participant, [held_out], tmp_path / "batch", progress=lambda m: None)
    assert summary["replay_verified"]
    planted = planted_roi_strength()
    rois = sorted(planted)
    for stream in ("vlm-0__action", "vlm-0__reasoning"):
        scores = summary["scores"][stream]
        rho = spearmanr([planted[r] for r in rois], [scores[r] for r in rois]).statistic
        ranked = sorted(rois, key=lambda r: -scores[r])
        assert rho >= 0.7, (stream, scores)
        assert ranked.index("visual") <= 2, ranked  # planted strongest among the top three
        assert ranked.index("temporal") >= len(rois) - 2, ranked  # planted weakest among the bottom two
    assert (tmp_path / "batch" / "report.html").exists()


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
        assert any(math.isfinite(v) for v in summary["scores"][stream].values())
        assert (out / "run" / f"{stream}_scores.tsv").exists() and (out / "run" / f"{stream}_pred.nii.gz").exists()
    html = (out / "run" / "report.html").read_text()
    assert "data:image/png;base64," in html and "vlm-0" in html
    latency = json.loads((out / "run" / "latency.json").read_text())
    assert np.median(latency["vlm-0"]["action"]) > 0


def test_live_with_a_simulated_scanner_scores_trs_and_records_triggers(participant, tmp_path):
    from services.recording import read_recording
    from services.session import LivePlan, run_live

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
