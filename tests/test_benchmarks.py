"""Every benchmark runs end to end with its smallest options and prints what its readers parse: one
JSON line, last, with the keys the README's figures come from. No speed is asserted here (figures
come from full runs, see README); these only keep the benchmarks from rotting."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def _bench(*argv: str, timeout: float = 900) -> dict:
    """`neuroarcade bench ARGV…` in a fresh process; its last stdout line parsed as JSON."""
    out = subprocess.run([sys.executable, "-m", "neuroarcade.cli", "bench", *argv],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _positive(result: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key


@pytest.mark.slow
def test_bench_transport_prints_its_ratios():
    result = _bench("transport", "--frames", "100", "--publish-seconds", "0.4", "--publish-rounds", "2")
    _positive(result, "rt_p50_ratio", "rt_p99_ratio", "publish_ratio", "publish_no_pooled_gray_ratio", "publish_raw_pyzmq_ratio",
              "rt_ours_p50_us", "rt_raw_p50_us", "publish_ours_steps_per_s", "publish_raw_steps_per_s")
    assert result["publish_rounds"] == 2 and result["frames"] == 100


@pytest.mark.slow
def test_bench_agent_prints_service_and_bare_latency():
    """The tiny VLM through the agent service against the emulator vs its bare forward (README: agent)."""
    result = _bench("agent", "--seconds", "8")  # a block of service decisions and of bare runs past the warm-up
    assert result["bench"] == "agent" and result["backend"] == "transformers" and result["vllm"] is None
    assert result["model"] == "tiny-qwen2.5-vl" and result["conditions"] == ["action"]
    _positive(result, "decisions", "bare_runs", "service_p50_ms", "service_p99_ms", "service_internal_p50_ms",
              "bare_p50_ms", "bare_p99_ms", "overhead_ratio", "overhead_ratio_p99", "activations")
    assert result["service_p50_ms"] <= result["service_p99_ms"] and result["bare_p50_ms"] <= result["bare_p99_ms"]
    assert result["stale_skipped"] >= 0 and result["service_frame_age_p50_ms"] >= 0
    assert set(result["service_stage_mean_ms"]) and result["torch_threads"] == 1


@pytest.mark.slow
def test_bench_encode_prints_predict_and_fit_ratios():
    """Small shapes; the fit against himalaya must agree (max_coef_diff) whatever the size."""
    result = _bench("encode", "--predict-features", "16", "--predict-voxels", "500", "--predict-trs", "5",
                    "--fit-runs", "2", "--fit-trs", "40", "--fit-features", "8", "--fit-voxels", "50",
                    "--repeats", "1")
    _positive(result, "predict_ratio", "fit_ratio", "stream_ms", "bare_ms", "fit_s", "direct_fit_s")
    assert result["max_coef_diff"] < 1e-3, result["max_coef_diff"]
    assert result["predict_features"] == 16 * 4 and result["predict_voxels"] == 500 and result["fit_voxels"] == 50
    assert result["backend"] == "numpy" and result["threads"] == 1


@pytest.mark.slow
def test_bench_e2e_prints_stage_latencies_and_scaling(tmp_path):
    result = _bench("e2e", "--seconds", "4", "--point-seconds", "1", "--agents-curve", "1", "--fps-curve", "30",
                    "--tr-s", "0.5", "--out-dir", str(tmp_path))
    assert result["bench"] == "e2e" and result["fps"] == 15.0
    _positive(result, "rl_e2e_action_p50_ms", "rl_e2e_action_p99_ms", "vlm_e2e_action_p50_ms",
              "vlm_e2e_action_p99_ms", "total_s")
    assert result["rl_staleness_mean"] >= 0
    assert set(result["scaling_agents_p50_ms"]) == {"1"} and set(result["scaling_fps_p50_ms"]) == {"30.0"}
    assert "tr_volume_to_score_p50_ms" in result and "tr_scored" in result
    full = json.loads((tmp_path / result["results_dir"].rsplit("/", 1)[-1] / "e2e.json").read_text())
    assert {"main", "scaling", "startup_s", "total_s"} <= set(full) and len(full["scaling"]) == 2
    assert (tmp_path / result["results_dir"].rsplit("/", 1)[-1] / "e2e.png").is_file()


@pytest.mark.slow
def test_bench_train_prints_its_throughput_ratio():
    result = _bench("train", "--rounds", "1", "--iterations", "1")
    _positive(result, "floor_frames_per_s", "train_rl_frames_per_s", "throughput_ratio")
    assert result["rounds"] == 1 and result["iterations_per_round"] == 1 and len(result["round_ratios"]) == 1
    assert result["game"] == "ALE/Breakout-v5"


@pytest.mark.slow
def test_bench_study_prints_ray_against_sequential():
    """A 2-subject synthetic study from empty caches on local Ray and sequentially: the same scores, the ratio."""
    result = _bench("study", "--subjects", "2", "--trs", "20")
    assert result["bench"] == "study" and result["num_cpus"] == 2 and result["failures"] == 0
    _positive(result, "study_ratio", "ray_s", "sequential_s", "ray_init_s")
    assert set(result["ray_stage_s"]) == set(result["sequential_stage_s"]) == {"extract", "fit", "partition",
                                                                              "score", "group"}
    assert result["same_cells"] and result["max_score_diff"] < 1e-3  # float32 fits, 2 BLAS threads vs 1: rounding
