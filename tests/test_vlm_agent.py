"""VLM agent on real Atari frames with the tiny local model: legal choices, batching, windows, recording."""

from __future__ import annotations

import numpy as np
import pytest

from agents.base import FrameRef, FrameWindow, Observation, RateLimiter, Recorder, read_recording
from agents.prompts import action_labels, load_conditions
from agents.tiny import build_tiny
from agents.vlm import VLMAgent, VLMConfig


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    import torch

    torch.set_num_threads(1)
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "vlm", "vlm"))


@pytest.fixture(scope="module")
def tiny_lam(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "lam", "lam"))


def test_mrope_positions_match_the_hub_processor_path(tiny_vlm, tiny_lam, breakout_frames):
    """Our inputs must give the model what a hub processor gives it: M-RoPE over the image grid."""
    import torch

    frames, meanings = breakout_frames
    for model in (tiny_vlm, tiny_lam):
        agent = VLMAgent(VLMConfig(model=model, conditions=["action"]))
        inputs = agent.backend.prepare([frames[0].pixels], agent.prompts(1, meanings))
        pos, _ = agent.backend.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])
        img = inputs["mm_token_type_ids"][0].bool()
        assert int(img.sum()) == 48
        # image tokens get a 2-D (height, width) grid of positions: 8 rows × 6 columns after merging
        assert len(torch.unique(pos[1, 0][img])) == 8 and len(torch.unique(pos[2, 0][img])) == 6
        d = agent.infer(Observation((frames[0],), meanings))
        assert 0 <= d.action < len(meanings)


@pytest.fixture(scope="module")
def breakout_frames() -> tuple[list[FrameRef], tuple[str, ...]]:
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", repeat_action_probability=0.0)
    obs, _ = env.reset(seed=1)
    frames = [FrameRef(0, 0, obs.copy())]
    for t in range(1, 30):
        obs, *_ = env.step(1 if t % 2 else 2)
        frames.append(FrameRef(t, t * 66_666_667, obs.copy()))
    meanings = tuple(env.unwrapped.get_action_meanings())
    env.close()
    return frames, meanings


def test_choices_are_legal_and_probs_normalised(tiny_vlm, breakout_frames):
    frames, meanings = breakout_frames
    agent = VLMAgent(VLMConfig(model=tiny_vlm, conditions=["none", "action", "reasoning"]))
    for f in frames[::7]:
        d = agent.infer(Observation((f,), meanings))
        assert [c.condition for c in d.choices] == ["none", "action", "reasoning"]
        for c in d.choices:
            assert 0 <= c.action < len(meanings)
            assert c.probs.shape == (len(meanings),)
            assert abs(float(c.probs.sum()) - 1.0) < 1e-5
            assert c.action == int(np.argmax(c.probs))
        n_layers = agent.backend.num_layers
        assert {(a.condition, a.pooling) for a in d.activations} == {
            (c, p) for c in ("none", "action", "reasoning") for p in ("last_token", "mean_image")}
        assert all(a.vectors.shape == (n_layers, 128) and a.vectors.dtype == np.float16 for a in d.activations)
        assert d.frame_seqs == [f.seq] and d.frame_t_ns == f.t_ns
        # the conditions differ in prompt text, so their last-token states must differ
        last = {a.condition: a.vectors for a in d.activations if a.pooling == "last_token"}
        assert np.abs(last["none"][-1].astype(np.float32) - last["action"][-1]).max() > 1e-3


def test_batched_conditions_equal_one_forward_per_condition(tiny_vlm, breakout_frames):
    frames, meanings = breakout_frames
    obs = Observation((frames[10],), meanings)
    cfg = dict(model=tiny_vlm, conditions=["action", "reasoning"], activation_dtype="float32")
    batched = VLMAgent(VLMConfig(**cfg)).infer(obs)
    single = VLMAgent(VLMConfig(**cfg, batch_conditions=False)).infer(obs)
    for a, b in zip(batched.activations, single.activations):
        assert (a.condition, a.pooling) == (b.condition, b.pooling)
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-4 * np.abs(b.vectors).max())
    for a, b in zip(batched.choices, single.choices):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_labels_are_single_distinct_tokens(tiny_vlm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    meanings = tuple(f"ACTION{i}" for i in range(18))  # full ALE action space
    labels = action_labels(tok, meanings)
    assert len(set(labels.token_ids)) == 18
    assert all(tok.encode(label, add_special_tokens=False) == [i] for label, i in zip(labels.labels, labels.token_ids))


@pytest.mark.slow
def test_frame_window_passes_k_evenly_spaced_frames(tiny_vlm, breakout_frames):
    frames, meanings = breakout_frames
    agent = FrameWindow(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["action"], layers=[0, 2])), k=4, span_s=1.5)
    for f in frames[:-1]:
        agent.infer(Observation((f,), meanings))
    d = agent.infer(Observation((frames[-1],), meanings))
    # frames are 66.7 ms apart: targets 0, 0.5, 1.0, 1.5 s back → 7.5 frames apart, newest at or before each target
    assert d.frame_seqs == [6, 14, 21, 29]
    assert all(a.layers == [0, 2] and a.vectors.shape == (2, 128) for a in d.activations)
    agent.reset()
    d = agent.infer(Observation((frames[3],), meanings))
    assert d.frame_seqs == [3, 3, 3, 3]  # fresh history: the only frame repeated
    # A slow agent decides on every 10th frame only; the frames it skipped still shape its window.
    agent.reset()
    for newest in (9, 19, 29):
        d = agent.infer(Observation((frames[newest],), meanings, skipped=tuple(frames[newest - 9:newest])))
    assert d.frame_seqs == [6, 14, 21, 29]


def test_rate_limiter_and_recorder_round_trip(tiny_vlm, breakout_frames, tmp_path):
    frames, meanings = breakout_frames
    rec = Recorder(RateLimiter(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["action"])), max_hz=1e-3),
                   tmp_path / "run", chunk=2)
    first = rec.infer(Observation((frames[0],), meanings))
    assert first is not None
    assert rec.infer(Observation((frames[1],), meanings)) is None  # within the period: skipped
    rec.inner.reset()
    second = rec.infer(Observation((frames[2],), meanings))
    rec.close()
    rows = read_recording(tmp_path / "run")
    assert [r["frame_seqs"] for r in rows] == [[0], [2]]
    for row, d in zip(rows, (first, second)):
        assert row["choices"][0]["action"] == d.action
        for got, want in zip(row["activations"], d.activations):
            assert got["pooling"] == want.pooling
            np.testing.assert_array_equal(got["vectors"], want.vectors)


def test_prompt_templates_from_file_and_unknown_names(tiny_vlm, tmp_path):
    (tmp_path / "p.toml").write_text('[conditions]\nthreat = "Name the nearest threat, then act."\n')
    assert load_conditions(tmp_path / "p.toml")["threat"] == "Name the nearest threat, then act."
    agent = VLMAgent(VLMConfig(model=tiny_vlm, conditions=["threat"], prompts_file=str(tmp_path / "p.toml")))
    prompt = agent.prompts(2, ("NOOP", "FIRE"))[0]
    # system → images → condition text, so conditions share the image prefix
    assert prompt.index("<|image_pad|>") < prompt.index("Name the nearest threat")
    assert prompt.count("<|image_pad|>") == 2
    with pytest.raises(ValueError, match="unknown prompt condition"):
        VLMAgent(VLMConfig(model=tiny_vlm, conditions=["nonsense"]))
    with pytest.raises(ValueError, match="out of range"):
        VLMAgent(VLMConfig(model=tiny_vlm, layers=[99]))
