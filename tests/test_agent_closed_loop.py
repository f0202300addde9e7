"""The closed loop behind `neuroarcade demo`: emulator + RL agent + tiny VLM with two conditions, processes."""

from __future__ import annotations

import pytest

from pipelines.closed_loop import LoopConfig, run_closed_loop


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
