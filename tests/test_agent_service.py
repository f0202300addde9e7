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
from services.agent import AgentService, AgentServiceConfig, AgentSummary
from services.plumbing.recording import read_recording
from services.plumbing.transport import TOPIC_ACTIVATION, TOPIC_FRAME, free_tcp_endpoint, split_topic

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

    def finish(self, timeout: float = 30) -> AgentSummary:
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


@pytest.mark.slow
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
    t_end = time.monotonic() + 180
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
    assert summary.decisions > 0 and summary.illegal_actions == 0

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


@pytest.mark.slow
def test_actions_are_always_legal(start_emulator, tiny_vlm, tmp_path):
    emu = start_emulator(game="ALE/Breakout-v5")  # 4 actions, not Pong's 6
    rl = Running(RLAgent(RLConfig(game="ALE/Breakout-v5")), emu, "rl-0", role="controller")
    vlm = Running(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["none", "action"])), emu, "vlm-0")
    _wait(lambda: vlm.service.decisions >= 10 and rl.service.decisions >= 10, 180, "decisions")
    s_rl, s_vlm = rl.finish(), vlm.finish()
    summary = emu.stop()
    assert s_rl.illegal_actions == s_vlm.illegal_actions == 0
    assert "illegal_action" not in summary.counters.rejected_by_code
    logged = [a for step in read_recording(summary.record_path).steps for a in step.actions]
    by_agent = {a.agent_id for a in logged}
    assert by_agent == {"rl-0", "vlm-0"}
    assert {a.condition for a in logged if a.agent_id == "vlm-0"} == {"none", "action"}
    assert all(0 <= a.action < 4 for a in logged)
    assert len(logged) >= 20


@pytest.mark.slow
def test_ten_times_too_slow_agent_skips_stale_frames_and_slows_nobody(start_emulator, tiny_vlm):
    """Counts and orderings on the emulator's clock (its recording), no wall-clock rate: load only slows
    everything down together, it cannot make a backlog look fresh or a stalled peer look busy."""
    emu = start_emulator()
    fast = Running(RLAgent(RLConfig(game="ALE/Pong-v5")), emu, "rl-0", role="controller")
    added_s = 10 * FRAME_PERIOD_S
    slow_agent = AddedLatency(VLMAgent(VLMConfig(model=tiny_vlm, conditions=["action"])), added_s)
    slow = Running(slow_agent, emu, "vlm-slow")
    _wait(lambda: slow.service.decisions >= 1 and fast.service.decisions >= 1, 120, "both agents deciding")
    slow0, t0 = slow.service.decisions, time.monotonic()
    _wait(lambda: slow.service.decisions >= slow0 + 6, 120, "six more slow decisions")
    run_s = time.monotonic() - t0
    slow_n = slow.service.decisions - slow0
    s_fast, s_slow = fast.finish(), slow.finish()
    summary = emu.stop()
    rec = read_recording(summary.record_path)
    t_pub = {st.seq: st.t_ns for st in rec.steps} | {r.seq: r.t_ns for r in rec.resets}
    acted = {"rl-0": set(), "vlm-slow": set()}
    for st in rec.steps:
        for a in st.actions:
            acted.setdefault(a.agent_id, set()).add(a.frame_seq)
    slow_seqs = sorted(acted["vlm-slow"])
    assert len(slow_seqs) >= 6
    # each slow decision sleeps added_s first: it cannot decide more often than that (load only lowers it)
    assert slow_n <= run_s / added_s + 1
    # never a backlog: consecutive slow decisions are on frames published at least half its latency apart
    # on the emulator's clock (working through queued frames would make them one frame period apart)
    for a, b in zip(slow_seqs, slow_seqs[1:]):
        assert t_pub[b] - t_pub[a] >= 0.5 * added_s * 1e9, f"slow agent worked through old frames: {a} -> {b}"
    assert s_slow.stale_skipped >= s_slow.decisions  # frames replaced unseen while it was busy
    # nobody slowed: while the slow agent sat on each decision, the emulator kept stepping and the
    # controller kept acting on the frames in between
    for a, b in zip(slow_seqs, slow_seqs[1:]):
        assert b - a >= 2, f"the emulator waited for the slow observer: {a} -> {b}"
        assert any(a < q <= b for q in acted["rl-0"]), f"the controller stopped acting between frames {a} and {b}"
    first, last = slow_seqs[0], slow_seqs[-1]
    in_window = [q for q in acted["rl-0"] if first <= q <= last]
    assert len(in_window) >= 0.5 * (last - first + 1), f"controller acted on {len(in_window)} of {last - first + 1}"
    assert s_fast.decisions > s_slow.decisions


@pytest.mark.slow
def test_rejoins_when_the_emulator_restarts(start_emulator):
    first = start_emulator()
    endpoints = dict(frames_endpoint=first.cfg.frames_endpoint, control_endpoint=first.cfg.control_endpoint)
    rl = Running(RLAgent(RLConfig()), first, "rl-0", role="controller")
    _wait(lambda: rl.service.decisions >= 5, 120, "decisions on the first session")
    s1 = first.stop()
    second = start_emulator(**endpoints)
    n = rl.service.decisions
    _wait(lambda: rl.service.decisions >= n + 5, 120, "decisions on the restarted emulator")
    summary = rl.finish()
    s2 = second.stop()
    assert s1.session_id != s2.session_id
    assert summary.rejoins >= 1
    logged = [a for step in read_recording(s2.record_path).steps for a in step.actions]
    assert any(a.agent_id == "rl-0" for a in logged)


@pytest.mark.slow
def test_checkpoint_for_another_game_stops_the_service(start_emulator, tmp_path):
    import torch

    torch.save(nature_cnn(4, "ppo").state_dict(), tmp_path / "breakout.cleanrl_model")  # Breakout: 4 actions
    emu = start_emulator()  # Pong: 6 actions
    rl = Running(RLAgent(RLConfig(checkpoint=str(tmp_path / "breakout.cleanrl_model"))), emu, "rl-0")
    rl.thread.join(30)
    assert not rl.thread.is_alive()
    with pytest.raises(CheckpointError, match="another game or action set: it has 4 actions, the game has 6"):
        rl.finish()


class _Scripted:
    """A model-free agent: action 0 on every frame, or a model error on every frame when ``fail``."""

    name = "scripted"
    conditions = [""]

    def __init__(self, fail: bool = False):
        self.fail = fail

    def infer(self, obs):
        from agents.base import Choice, Decision

        if self.fail:
            raise RuntimeError("model broke")
        return Decision([Choice("", 0, np.ones(1, np.float32))], [], [obs.newest.seq], obs.newest.t_ns)

    def reset(self) -> None:
        pass


def test_per_decision_stats_stay_bounded_over_a_long_run():
    """Hours of decisions keep a window of samples, as the emulator does; counts and the max cover the run."""
    from services.agent import ERROR_SAMPLES, STATS_WINDOW, _Pending
    from services.plumbing.client import GameClient

    def feed(service: AgentService, n: int, first_age_s: float = 0.0) -> None:
        now = time.monotonic_ns()
        for seq in range(n):
            t_ns = now - int(first_age_s * 1e9) if seq == 0 else time.monotonic_ns()
            frame = Frame(session_id="s", seq=seq, episode=0, step=seq, action=0, controller="", reward=0.0,
                          terminated=False, truncated=False, t_ns=t_ns, wall_ns=0,
                          pixels=np.zeros((2, 2, 3), np.uint8))
            service._step(_Pending(frame, ("NOOP",), time.monotonic_ns()), lambda: None)

    n = STATS_WINDOW + 500
    ok = AgentService(_Scripted(), AgentServiceConfig("scripted", activations_endpoint=None))
    feed(ok, n, first_age_s=5.0)  # the oldest frame is decided first, then leaves the window
    assert ok.decisions == ok.stats[""].decisions == n
    assert len(ok.decided_seqs) == len(ok.frame_ages_ns) == len(ok.stats[""].latencies_ns) == STATS_WINDOW
    assert ok.decided_seqs[-1] == n - 1 and max(ok.frame_ages_ns) < 5e9

    failing = AgentService(_Scripted(fail=True), AgentServiceConfig("failing", activations_endpoint=None))
    feed(failing, ERROR_SAMPLES + 50)
    assert failing.errors_total == ERROR_SAMPLES + 50 and len(failing.errors) == ERROR_SAMPLES

    client = GameClient("scripted", frames_endpoint=free_tcp_endpoint(), control_endpoint=free_tcp_endpoint())
    try:
        summary, bad = ok.summary(client, 1.0), failing.summary(client, 1.0)
        metrics = ok.snapshot()
    finally:
        client.close()
    assert summary.decisions == summary.conditions[""].decisions == n
    assert 0 < summary.conditions[""].latency_p50_ms <= summary.conditions[""].latency_p99_ms
    assert summary.frame_age_max_ms >= 5000  # the whole run's maximum, not the window's
    assert bad.errors_total == ERROR_SAMPLES + 50 and len(bad.errors) == 5
    assert metrics["counters"]["decisions"] == n and metrics["gauges"]["decision_latency_p99_ms"]["-"] > 0
