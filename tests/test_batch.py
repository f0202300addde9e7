"""Batch extraction on Ray: same bytes as the sequential path, bit-exact replay enforced, resumable after SIGKILL.

Real recordings (services.emulator.record_headless, real ALE), real agents (seeded Nature-CNN, the
locally built tiny VLM), a real local Ray instance (2 CPUs, started once for the module).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agents.spec import AgentSpec
from pipelines.batch import MANIFEST, ExtractConfig, ReplayError, plan_jobs, run_batch, run_job
from services.emulator import record_headless
from services.plumbing.game import GameSettings
from services.plumbing.recording import MAGIC, Step, iter_records, read_recording

pytestmark = pytest.mark.slow  # Ray, the tiny VLM, fits

STEPS = 150  # 10 s of game time at frameskip 4: 6 TRs of 2 s


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("recordings")
    paths = []
    for i in range(4):
        p = d / f"sub-0{i}_run-1.narec"
        record_headless(GameSettings(game="ALE/Pong-v5", seed=i), STEPS, p, controller_seed=i, tr_s=2.0,
                        meta={"subject": f"0{i}"})
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    from agents.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("models") / "tiny-vlm", "vlm"))


@pytest.fixture(scope="module")
def local_ray():
    from pipelines.batch import init_ray

    ray = init_ray(None, num_cpus=2, object_store_mb=80)
    yield ray
    ray.shutdown()


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def test_ray_gives_exactly_the_sequential_features(recordings, tiny_vlm, local_ray, tmp_path):
    agents = [AgentSpec.parse("rl"),
              AgentSpec.parse(f"vlm:{tiny_vlm}", conditions=("action", "reasoning"), layers=(0, 2),
                              poolings=("last_token", "mean_image"))]
    jobs = plan_jobs(recordings[:2], agents, ExtractConfig(stride=6, window=2, window_s=1.0))
    seq = run_batch(jobs, tmp_path / "seq", sequential=True, progress=False)
    par = run_batch(jobs, tmp_path / "ray", progress=False)
    assert not seq.failed and not par.failed, (seq.failed, par.failed)
    assert sorted(seq.computed) == sorted(par.computed) == sorted(j.key for j in jobs)
    a, b = _outputs(tmp_path / "seq"), _outputs(tmp_path / "ray")
    # rl: 1 space; vlm: 2 conditions × 2 poolings × 2 layers; each a .npy and a .json, per recording
    assert len(a) == 2 * (1 + 8) * 2
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between sequential and Ray"

    # what `neuroarcade fit` reads: (n_trs, dim) rows + sidecar provenance
    from encoders.data import load_features

    rec = read_recording(recordings[0])
    run = Path(recordings[0]).name.removesuffix(".narec")
    X, meta = load_features(tmp_path / "ray" / run / "vlm_reasoning_mean_image_l2.npy")
    assert X.shape == (len(rec.triggers), 128) and np.isfinite(X).all() and X.std() > 0
    provenance = (meta["model"], meta["layer"], meta["condition"], meta["pooling"])
    assert provenance == (tiny_vlm, 2, "reasoning", "mean_image")
    assert meta["frames_verified"] == len(rec.steps) + len(rec.resets)
    assert meta["decisions"] == -(-meta["frames_replayed"] // 6)
    X_rl, meta_rl = load_features(tmp_path / "ray" / run / "rl_penultimate_l0.npy")
    assert X_rl.shape == (len(rec.triggers), 512) and meta_rl["tr"] == 2.0
    # different recordings → different features (the rows really come from the frames)
    other = Path(recordings[1]).name.removesuffix(".narec")
    assert not np.array_equal(X_rl, np.load(tmp_path / "ray" / other / "rl_penultimate_l0.npy"))


def test_features_follow_the_live_alignment_rule(recordings, tmp_path):
    """Row t = mean of the decisions whose frame was shown in [trigger t, trigger t+1), as the live encoder does."""
    from agents.base import Observation
    from agents.spec import build_agent
    from pipelines.batch import job_agent, replay_frames

    job = plan_jobs(recordings[:1], [AgentSpec.parse("rl")], ExtractConfig())[0]
    result = run_job(job)
    rec = read_recording(recordings[0])
    agent = build_agent(job_agent(job, rec.header.game))
    triggers = np.array(sorted(t.t_ns for t in rec.triggers))
    by_tr: dict[int, list[np.ndarray]] = {}
    for frame in replay_frames(rec):
        d = agent.infer(Observation((frame,), tuple(rec.header.action_meanings)))
        tr = int(np.searchsorted(triggers, frame.t_ns, side="right")) - 1
        by_tr.setdefault(tr, []).append(d.activations[0].vectors[0].astype(np.float64))
    expected = np.stack([np.mean(by_tr[t], axis=0) for t in range(len(triggers))]).astype(np.float32)
    np.testing.assert_allclose(result.features["rl_penultimate_l0"], expected, rtol=1e-6, atol=1e-6)


def test_a_recording_that_does_not_replay_bit_exactly_fails_its_job_only(recordings, tmp_path):
    bad = tmp_path / "tampered.narec"
    raw = Path(recordings[0]).read_bytes()
    # rewrite one step's recorded frame hash, as a corrupted or foreign recording would have it
    import msgspec
    import struct
    import zlib

    out = bytearray(MAGIC)
    pos, n_steps = len(MAGIC), 0
    enc = msgspec.msgpack.Encoder()
    for rec in iter_records(recordings[0]):
        length, _ = struct.unpack_from("<II", raw, pos)
        payload = raw[pos + 8: pos + 8 + length]
        pos += 8 + length
        if isinstance(rec, Step):
            n_steps += 1
            if n_steps == 50:
                payload = enc.encode(msgspec.structs.replace(rec, frame_hash="0" * 32))
        out += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    bad.write_bytes(bytes(out))
    with pytest.raises(ReplayError, match="diverged"):
        run_job(plan_jobs([str(bad)], [AgentSpec.parse("rl")], ExtractConfig())[0])
    jobs = plan_jobs([str(bad), recordings[1]], [AgentSpec.parse("rl")], ExtractConfig(stride=4))
    summary = run_batch(jobs, tmp_path / "out", sequential=True, progress=False)
    assert list(summary.failed) == ["tampered/rl"] and summary.computed == [f"{Path(recordings[1]).stem}/rl"]
    assert "tampered/rl" not in json.loads((tmp_path / "out" / MANIFEST).read_text())["jobs"]


def test_killed_batch_resumes_without_recomputing_finished_runs(recordings, local_ray, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "neuroarcade.cli", "extract", "--recordings", *recordings, "--agent", "rl",
            "--out", str(out), "--sequential", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["jobs"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"batch ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    finished = json.loads(manifest.read_text())["jobs"]
    assert 1 <= len(finished) < len(recordings), finished
    mtimes = {f: (out / f).stat().st_mtime_ns for entry in finished.values() for f in entry["files"]}

    jobs = plan_jobs(recordings, [AgentSpec.parse("rl")], ExtractConfig())
    resumed = run_batch(jobs, out, progress=False)  # on local Ray this time
    assert sorted(resumed.skipped) == sorted(finished)
    assert sorted(resumed.computed) == sorted(set(j.key for j in jobs) - set(finished))
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes, "a finished run was rewritten"
    assert not [p for p in out.rglob("*.tmp")], "temp files left behind"

    reference = run_batch(jobs, tmp_path / "ref", sequential=True, progress=False)
    assert len(reference.computed) == len(jobs)
    assert _outputs(out) == _outputs(tmp_path / "ref")
    # a third run has nothing left to do
    again = run_batch(jobs, out, sequential=True, progress=False)
    assert again.computed == [] and len(again.skipped) == len(jobs)


def test_changed_settings_or_recording_are_recomputed(recordings, tmp_path):
    jobs = plan_jobs(recordings[:1], [AgentSpec.parse("rl")], ExtractConfig(stride=8))
    assert run_batch(jobs, tmp_path, sequential=True, progress=False).computed
    other = plan_jobs(recordings[:1], [AgentSpec.parse("rl")], ExtractConfig(stride=4))
    assert run_batch(other, tmp_path, sequential=True, progress=False).computed == [jobs[0].key]


def test_agent_specs_are_parsed_or_refused_clearly():
    assert AgentSpec.parse("rl").agent_id == "rl"
    s = AgentSpec.parse("lam=vlm:/models/ui-tars", conditions=("none",))
    assert (s.agent_id, s.kind, s.model, s.conditions) == ("lam", "vlm", "/models/ui-tars", ("none",))
    with pytest.raises(ValueError, match="kind must be"):
        AgentSpec.parse("gpt:x")
    with pytest.raises(ValueError, match="needs a model"):
        AgentSpec.parse("vlm")
    with pytest.raises(ValueError, match="unique"):
        plan_jobs([], [AgentSpec.parse("rl"), AgentSpec.parse("rl:ckpt")], ExtractConfig())


def test_fit_subjects_on_ray_matches_sequential_and_skips_finished(local_ray, tmp_path):
    from encoders.synth import SynthConfig, generate, write_bids
    from encoders.weights import EncodingWeights
    from pipelines.batch import FitJob, run_fit_batch

    bids = tmp_path / "bids"
    for i, sub in enumerate(("01", "02")):
        write_bids(generate(SynthConfig(n_runs=3, n_trs=60, voxel_mm=12.0, seed=i, subject=sub)), bids)
    options = {"delays": [1, 2], "alphas": [1.0, 100.0, 10000.0]}

    def jobs(out):
        return [FitJob(str(bids), sub, None, ("action",), str(out / f"sub-{sub}.safetensors"), options)
                for sub in ("01", "02")]

    seq = run_fit_batch(jobs(tmp_path / "seq"), sequential=True, progress=False)
    par = run_fit_batch(jobs(tmp_path / "ray"), progress=False)
    assert all(isinstance(v, dict) for v in (*seq.values(), *par.values())), (seq, par)
    for sub in ("01", "02"):
        a = EncodingWeights.load(tmp_path / "seq" / f"sub-{sub}.safetensors")
        b = EncodingWeights.load(tmp_path / "ray" / f"sub-{sub}.safetensors")
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.alphas, b.alphas)
        assert np.array_equal(a.cv_r, b.cv_r) and b.provenance["subject"] == sub
        assert seq[sub]["mean_cv_r"] > 0.1  # the planted signal is found
    w1 = EncodingWeights.load(tmp_path / "seq" / "sub-01.safetensors")
    w2 = EncodingWeights.load(tmp_path / "seq" / "sub-02.safetensors")
    assert not np.array_equal(w1.coef, w2.coef)  # each subject got its own data
    mtime = (tmp_path / "ray" / "sub-01.safetensors").stat().st_mtime_ns
    again = run_fit_batch(jobs(tmp_path / "ray"), progress=False)
    assert again == {"01": "skipped", "02": "skipped"}
    assert (tmp_path / "ray" / "sub-01.safetensors").stat().st_mtime_ns == mtime


def test_fit_subjects_command(tmp_path):
    from typer.testing import CliRunner

    from encoders.synth import SynthConfig, generate, write_bids
    from neuroarcade.cli import app

    bids = tmp_path / "bids"
    write_bids(generate(SynthConfig(n_runs=3, n_trs=50, voxel_mm=12.0, subject="07")), bids)
    args = ["fit-subjects", "--bids", str(bids), "--subjects", "sub-07", "--spaces", "action", "--out",
            str(tmp_path / "w"), "--delays", "1", "2", "--alphas", "1", "100", "--sequential", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["07"]["runs"] == 3
    assert (tmp_path / "w" / "sub-07.safetensors").is_file()
    missing = CliRunner().invoke(app, [*args[:4], "08", *args[5:]])
    assert missing.exit_code == 1 and "no BOLD runs" in missing.output


def test_vlm_specs_can_name_a_vllm_server():
    s = AgentSpec.parse("qwen=vlm:Qwen/Qwen2.5-VL-7B-Instruct@http://vllm-vlm:8000", transport="shm")
    assert (s.agent_id, s.model, s.vllm_url, s.vllm_transport) == ("qwen", "Qwen/Qwen2.5-VL-7B-Instruct",
                                                                    "http://vllm-vlm:8000", "shm")
    assert s.backend == "vllm" and AgentSpec.parse("vlm:/m").backend == "transformers"
    assert AgentSpec.parse("vlm:/m", transport="shm").vllm_transport == "rpc"  # irrelevant without a server
    with pytest.raises(ValueError, match="@SERVER is for vlm"):
        AgentSpec.parse("rl:ckpt@http://x:1")
