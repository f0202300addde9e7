"""The closed loop behind `neuroarcade demo`: emulator + RL agent + tiny VLM with two conditions, processes."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict

import pytest

from agents.spec import AgentSpec
from pipelines.closed_loop import LoopConfig, run_closed_loop, summarize_loop
from services.agent import AgentFailure, AgentSummary, ConditionSummary


@pytest.mark.slow
def test_closed_loop_reports_decisions_and_activations_per_agent_and_condition():
    # 4 s, then as long as it takes for every agent to have 3 actions accepted (a VLM decision sends one
    # per condition): a count, so that a loaded machine slowing the models cannot leave one at 0 decisions
    summary = run_closed_loop(LoopConfig(duration_s=4.0, min_actions=3))
    entries = {(e["agent_id"], e["condition"]): e for e in summary["agents"]}
    assert set(entries) == {("rl-0", ""), ("vlm-0", "action"), ("vlm-0", "reasoning")}, summary["agents"]
    for key, e in entries.items():
        assert "error" not in e, e
        assert e["decisions"] > 0 and e["activations"] > 0, (key, e)
        assert 0 < e["latency_p50_ms"] <= e["latency_p99_ms"]
        assert e["stale_skipped"] >= 0 and e["errors"] == 0
    # two poolings (last_token, mean_image) per VLM condition per decision
    assert entries[("vlm-0", "action")]["activations"] == 2 * entries[("vlm-0", "action")]["decisions"]
    # counts, not a rate: the emulator stepped during the run, and no agent decided on more frames than were
    # published (each decision names one frame; keep-newest agents skip, never repeat, frames)
    assert summary["emulator"]["steps"] > 0
    for key, e in entries.items():
        assert e["decisions"] <= summary["emulator"]["frames_published"], (key, e)


def _summary(agent_id: str, **conditions) -> AgentSummary:
    return AgentSummary(agent_id=agent_id, model="m", role="observer", duration_s=1.0, decisions=3,
                        conditions={c: ConditionSummary(*v) for c, v in conditions.items()}, stale_skipped=2,
                        frames_received=9, rejoins=0, illegal_actions=0, frame_age_p50_ms=1.0, frame_age_max_ms=4.0,
                        stage_mean_ms={"decision": 2.0}, errors_total=1, errors=["frame 3: ValueError: x"])


def test_agent_summaries_are_typed_and_the_loop_summary_reads_them():
    """Agent processes hand back an AgentSummary or an AgentFailure (pickled across spawn); the loop's JSON
    summary and the ``--json`` keys stay as documented."""
    ok = _summary("vlm-0", action=(3, 1.5, 2.5, 6), reasoning=(3, 1.0, 2.0, 6))
    assert pickle.loads(pickle.dumps(ok)) == ok
    assert list(asdict(ok)) == ["agent_id", "model", "role", "duration_s", "decisions", "conditions",
                                "stale_skipped", "frames_received", "rejoins", "illegal_actions", "frame_age_p50_ms",
                                "frame_age_max_ms", "stage_mean_ms", "errors_total", "errors"]
    assert asdict(ok)["conditions"]["action"] == {"decisions": 3, "latency_p50_ms": 1.5, "latency_p99_ms": 2.5,
                                                  "activations": 6}
    specs = [AgentSpec("vlm-0", "vlm"), AgentSpec("rl-0", "rl"), AgentSpec("rl-1", "rl")]
    out = summarize_loop(specs, {"vlm-0": ok, "rl-0": AgentFailure("rl-0", "RuntimeError: boom")}, 2.0, 10,
                         "ALE/Pong-v5", None)
    json.dumps(out)
    assert out["agents"][0] == {"agent_id": "vlm-0", "kind": "vlm", "model": "m", "role": "observer",
                                "condition": "action", "decisions": 3, "latency_p50_ms": 1.5, "latency_p99_ms": 2.5,
                                "activations": 6, "stale_skipped": 2, "frame_age_max_ms": 4.0, "errors": 1}
    assert out["agents"][1]["condition"] == "reasoning"
    failed = {e["agent_id"]: e for e in out["agents"][2:]}
    assert failed["rl-0"]["error"] == "RuntimeError: boom" and failed["rl-0"]["decisions"] == 0
    assert failed["rl-1"]["error"] == "no summary (agent process died)"
    assert out["emulator"] == {"steps": 10, "steps_per_s": 5.0, "frames_published": None}
