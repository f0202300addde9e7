"""Agent service against the real emulator on loopback: real sockets, real ALE, real tiny models."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from agents.base import AddedLatency
from agents.rl import CheckpointError, RLAgent, RLConfig, nature_cnn
from agents.tiny import build_tiny
from agents.vlm import VLMAgent, VLMConfig, pool_hidden
from protocols import Activation, Decoder, Frame
from services.agent import AgentService, AgentServiceConfig
from services.recording import read_recording
from services.transport import TOPIC_ACTIVATION, TOPIC_FRAME, free_tcp_endpoint, split_topic

FRAME_PERIOD_S = 4 / 60  # realtime Pong-v5: 15 frames/s


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    import torch

    torch.set_num_threads(1)
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "vlm", "vlm"))


class Running:
    """An AgentService in a thread; ``finish()`` stops it and returns its summary (or raises its error)."""

    def __init__(self, agent, emu, agent_id: str, role: str = "observer", activations: str | None = None, **kw):
        self.service = AgentService(agent, AgentServiceConfig(
            agent_id=agent_id, role=role, frames_endpoint=emu.cfg.frames_endpoint,
            control_endpoint=emu.cfg.control_endpoint, activations_endpoint=activations, **kw))
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result["summary"] = self.service.run()
        except BaseException as err:  # handed to the test thread
            self.result["error"] = err

    def finish(self, timeout: float = 30) -> dict:
        self.service.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent service did not stop"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["summary"]


def _subscriber(ctx, endpoint: str, topic: bytes):
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def _wait(cond, timeout_s: float, what: str):
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_published_activations_equal_the_model_run_directly(start_emulator, tiny_vlm):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    emu = start_emulator()
    ctx = zmq.Context.instance()
    act_ep = free_tcp_endpoint()
    frames_sub = _subscriber(ctx, emu.cfg.frames_endpoint, TOPIC_FRAME)
    acts_sub = _subscriber(ctx, act_ep, TOPIC_ACTIVATION)
    conditions = ["action", "reasoning"]
    agent = VLMAgent(VLMConfig(model=tiny_vlm, conditions=conditions, activation_dtype="float32"))
    running = Running(agent, emu, "vlm-0", activations=act_ep)
    frames: dict[int, np.ndarray] = {}
    activations: list[Activation] = []
    dec_f, dec_a = Decoder([Frame]), Decoder([Activation])
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end and len(activations) < 16:
        for sock, dec, sink in ((frames_sub, dec_f, None), (acts_sub, dec_a, activations)):
            while sock.poll(10):
                msg = dec.decode(split_topic(sock.recv_multipart(copy=False))[1])
                if sink is None:
                    frames[msg.seq] = np.array(msg.pixels)
                else:
                    sink.append(msg)
    summary = running.finish()
    frames_sub.close(0)
    acts_sub.close(0)
    assert summary["decisions"] > 0 and summary["illegal_actions"] == 0

    # The same model, run directly with transformers on the same frame and prompt, one condition at a time.
    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    ip = AutoImageProcessor.from_pretrained(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    meanings = tuple(emu.emu.game.action_meanings)
    prompts = dict(zip(conditions, agent.prompts(1, meanings)))
    compared = {c: 0 for c in conditions}
    for msg in activations:
        seq = msg.frame_seqs[-1]
        if seq not in frames:
            continue
        vis = ip(images=[frames[seq]], return_tensors="pt")
        n_img = int(vis["image_grid_thw"][0].prod()) // ip.merge_size ** 2
        text = prompts[msg.condition].replace("<|image_pad|>", "<|image_pad|>" * n_img)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        ids["mm_token_type_ids"] = (ids["input_ids"] == model.config.image_token_id).long()  # as the hub processor
        with torch.inference_mode():
            out = model(**ids, **vis, output_hidden_states=True)
        hidden = [h.numpy() for h in out.hidden_states]
        mask = (ids["input_ids"] == model.config.image_token_id).numpy()
        want = pool_hidden(hidden, mask, list(msg.layers), (msg.pooling,))[msg.pooling][0]
        assert msg.vectors.shape == want.shape == (3, 128)
        np.testing.assert_allclose(msg.vectors, want, rtol=0, atol=1e-4 * np.abs(want).max())
        assert msg.agent_id == "vlm-0" and msg.model == tiny_vlm and msg.layers == [0, 1, 2]
        compared[msg.condition] += 1
    assert min(compared.values()) >= 2, f"too few activations matched to frames: {compared}"


def test_actions_are_always_legal(start_emulator, tiny_vlm, tmp_path):
    emu = start_emulator(game="ALE/Breakout-v5")  # 4 actions, not Pong's 6
    rl = Running(RLAgent(RLConfig(game="ALE/Breakout-v5")), emu, "rl-0", role="controller")
    vlm = Running(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["none", "action"])), emu, "vlm-0")
    _wait(lambda: vlm.service.decisions >= 10 and rl.service.decisions >= 10, 60, "decisions")
    s_rl, s_vlm = rl.finish(), vlm.finish()
    summary = emu.stop()
    assert s_rl["illegal_actions"] == s_vlm["illegal_actions"] == 0
    assert "illegal_action" not in summary.counters.rejected_by_code
    logged = [a for step in read_recording(summary.record_path).steps for a in step.actions]
    by_agent = {a.agent_id for a in logged}
    assert by_agent == {"rl-0", "vlm-0"}
    assert {a.condition for a in logged if a.agent_id == "vlm-0"} == {"none", "action"}
    assert all(0 <= a.action < 4 for a in logged)
    assert len(logged) >= 20


def test_ten_times_too_slow_agent_skips_stale_frames_and_slows_nobody(start_emulator, tiny_vlm):
    emu = start_emulator()
    fast = Running(RLAgent(RLConfig(game="ALE/Pong-v5")), emu, "rl-0", role="controller")
    slow_agent = AddedLatency(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["action"])), 10 * FRAME_PERIOD_S)
    slow = Running(slow_agent, emu, "vlm-slow")
    _wait(lambda: slow.service.decisions >= 1 and fast.service.decisions >= 1, 60, "both agents deciding")
    steps0, fast0, slow0, t0 = emu.emu.steps, fast.service.decisions, slow.service.decisions, time.monotonic()
    time.sleep(8)
    run_s = time.monotonic() - t0
    steps, fast_n, slow_n = emu.emu.steps - steps0, fast.service.decisions - fast0, slow.service.decisions - slow0
    s_fast, s_slow = fast.finish(), slow.finish()
    # the emulator keeps its 15 Hz and the fast agent decides on (nearly) every frame
    assert steps >= 0.9 * run_s / FRAME_PERIOD_S, f"emulator slowed: {steps} steps in {run_s:.1f} s"
    assert fast_n >= 0.8 * steps, f"fast agent slowed: {fast_n} decisions for {steps} frames"
    # the slow agent acts about once per 10 frames, always on a fresh frame, never on a backlog
    assert slow_n <= run_s / (10 * FRAME_PERIOD_S) + 1
    seqs = slow.service.decided_seqs
    assert all(b - a >= 7 for a, b in zip(seqs, seqs[1:])), f"slow agent worked through old frames: {seqs}"
    # frame age when its decision started: at most about one frame period (a backlog would grow by 0.6 s per decision)
    assert s_slow["frame_age_max_ms"] < 3 * FRAME_PERIOD_S * 1e3, s_slow["frame_age_max_ms"]
    assert s_slow["stale_skipped"] >= 5 * s_slow["decisions"]
    assert s_fast["frame_age_p50_ms"] < FRAME_PERIOD_S * 1e3


def test_rejoins_when_the_emulator_restarts(start_emulator):
    first = start_emulator()
    endpoints = dict(frames_endpoint=first.cfg.frames_endpoint, control_endpoint=first.cfg.control_endpoint)
    rl = Running(RLAgent(RLConfig()), first, "rl-0", role="controller")
    _wait(lambda: rl.service.decisions >= 5, 30, "decisions on the first session")
    s1 = first.stop()
    second = start_emulator(**endpoints)
    n = rl.service.decisions
    _wait(lambda: rl.service.decisions >= n + 5, 30, "decisions on the restarted emulator")
    summary = rl.finish()
    s2 = second.stop()
    assert s1.session_id != s2.session_id
    assert summary["rejoins"] >= 1
    logged = [a for step in read_recording(s2.record_path).steps for a in step.actions]
    assert any(a.agent_id == "rl-0" for a in logged)


def test_checkpoint_for_another_game_stops_the_service(start_emulator, tmp_path):
    import torch

    torch.save(nature_cnn(4, "ppo").state_dict(), tmp_path / "breakout.cleanrl_model")  # Breakout: 4 actions
    emu = start_emulator()  # Pong: 6 actions
    rl = Running(RLAgent(RLConfig(checkpoint=str(tmp_path / "breakout.cleanrl_model"))), emu, "rl-0")
    rl.thread.join(30)
    assert not rl.thread.is_alive()
    with pytest.raises(CheckpointError, match="another game or action set: it has 4 actions, the game has 6"):
        rl.finish()
