"""The problem is reported: agent and encoding services expose Prometheus metrics and publish a
Status heartbeat (``neuroarcade health --check status`` works for them), counting bad input."""

from __future__ import annotations

import threading
import time
import urllib.request

import zmq

from agents.rl import RLAgent, RLConfig
from protocols import Trigger
from services.agent import AgentService, AgentServiceConfig
from services.plumbing.health import probe
from services.plumbing.transport import TOPIC_ACTIVATION, TOPIC_TRIGGER, Channel, free_tcp_endpoint, make_socket


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l and not l.startswith("#")}


def _wait(cond, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_agent_service_metrics_and_status(start_emulator):
    emu = start_emulator()
    act_ep = free_tcp_endpoint()
    service = AgentService(RLAgent(RLConfig()), AgentServiceConfig(
        agent_id="rl-0", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
        control_endpoint=emu.cfg.control_endpoint, activations_endpoint=act_ep, metrics_port=0, status_s=0.2))
    box = {}
    th = threading.Thread(target=lambda: box.update(s=service.run()), daemon=True)
    th.start()
    try:
        _wait(lambda: service.decisions >= 10 and service.metrics_port, 60, "decisions")
        status = probe(act_ep, "status", service="agent", timeout_s=5)
        assert status["service"] == "agent" and status["steps"] >= 10
        m = _scrape(service.metrics_port)
        assert m["neuroarcade_agent_decisions_total"] >= 10
        assert m['neuroarcade_agent_activations_published_total{condition="-"}'] >= 10
        assert m["neuroarcade_agent_frames_received_total"] >= m["neuroarcade_agent_decisions_total"]
        assert m["neuroarcade_agent_joined"] == 1 and m["neuroarcade_agent_mailbox_depth"] in (0, 1)
        assert 0 < m['neuroarcade_agent_decision_latency_p50_ms{condition="-"}'] < 1000
    finally:
        service.stop()
        th.join(30)
        emu.stop()
    assert box["s"].decisions >= 10


def test_encoding_service_metrics_and_status(tmp_path):
    from encoders.fit import FitConfig, fit_encoding
    from encoders.synth import SynthConfig, generate
    from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service

    s = generate(SynthConfig(voxel_mm=16, n_runs=2, n_trs=30, space_dim=8, seed=2))
    res = fit_encoding(s.bold, {"a": s.features["action"]}, FitConfig(score=False, progress=False), mask=s.mask,
                       affine=s.affine, tr=2.0, roi_labels=s.atlas[s.mask], roi_names=s.roi_names)
    ctx = zmq.Context.instance()
    in_ep, pred_ep = free_tcp_endpoint(), free_tcp_endpoint()
    pub = Channel(make_socket(ctx, zmq.PUB))
    pub.sock.bind(in_ep)
    cfg = EncodingServiceConfig(weights=str(res.weights.save(tmp_path / "w.safetensors")), bold=[in_ep],
                                predictions=pred_ep, metrics_port=0, status_s=0.2,
                                core=CoreConfig(tr_s=0.1, grace_s=0.05))
    stop, ready, box = threading.Event(), threading.Event(), {}
    th = threading.Thread(target=lambda: box.update(r=run_encoding_service(cfg, stop=stop, ctx=ctx, ready=ready)),
                          daemon=True)
    th.start()
    try:
        assert ready.wait(30)
        status = probe(pred_ep, "status", service="encoder", timeout_s=5)
        assert status["service"] == "encoder"
        for k in range(3):
            pub.sock.send_multipart([TOPIC_ACTIVATION, b"\xc1garbage"])
            pub.send(Trigger(tr_index=k, t_ns=time.monotonic_ns()), topic=TOPIC_TRIGGER)
            time.sleep(0.05)
        _wait(lambda: _scrape(cfg.metrics_port).get("neuroarcade_encoder_triggers_total", 0) == 3, 10, "triggers")
        m = _scrape(cfg.metrics_port)
        assert m["neuroarcade_encoder_messages_received_total"] == 3
        assert m['neuroarcade_encoder_messages_rejected_total{code="bad_header"}'] == 3
        _wait(lambda: _scrape(cfg.metrics_port)["neuroarcade_encoder_trs_predicted_total"] >= 2, 10, "TRs closed")
    finally:
        stop.set()
        th.join(30)
        pub.sock.close(0)
    assert box["r"].rejected_messages == 3
