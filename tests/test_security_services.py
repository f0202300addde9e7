"""CURVE on every service's sockets: allow-listed peers are served, strangers and plaintext get nothing.

Real sockets on 127.0.0.1 with CURVE forced on by giving keys (loopback may run without them; off
loopback a service refuses to start without them, checked here for each service and each CLI).
For PUB/SUB the binder is the CURVE server: its allow-list names the subscribers it admits.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zmq
from typer.testing import CliRunner

from protocols import Activation, BoldVolume, Decoder, Prediction, Status, Trigger
from services.plumbing.security import CurveConfig, SecurityError, generate_keys, secure_connect
from services.plumbing.transport import (TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_HEARTBEAT, TOPIC_PREDICTION, TOPIC_TRIGGER,
                                Channel, bound_endpoint, free_tcp_endpoint, split_topic)

ANY_PORT = "tcp://127.0.0.1:*"
"""Where the test holds the binding socket: the OS picks the port and we read it back (no race)."""


class Keys:
    """One key pair per party, as `neuroarcade keys generate` writes them; allow-lists made per test."""

    def __init__(self, root: Path):
        self.root = root
        for name in ("emulator", "agent", "encoder", "scanner", "dashboard", "stranger"):
            generate_keys(root / "pairs", name)

    def secret(self, name: str) -> str:
        return str(self.root / "pairs" / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / "pairs" / f"{name}.key")

    def allow(self, *names: str) -> str:
        folder = self.root / ("allow-" + "-".join(names))
        folder.mkdir(exist_ok=True)
        for n in names:
            shutil.copy(self.public(n), folder / f"{n}.key")
        return str(folder)

    def client(self, name: str, server: str) -> CurveConfig:
        return CurveConfig(secret_key=self.secret(name), server_public_key=self.public(server))


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "keys")


def _sub(endpoint: str, curve: CurveConfig | None, *topics: bytes, monitor: list | None = None) -> zmq.Socket:
    """A SUB connected to ``endpoint``; with ``monitor`` (a list), its handshake monitor is appended to it."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for t in topics or (b"",):
        sock.setsockopt(zmq.SUBSCRIBE, t)
    if monitor is not None:
        monitor.append(_monitor(sock))
    if curve is None:
        sock.connect(endpoint)  # plaintext
    else:
        secure_connect(sock, endpoint, curve)
    return sock


def _drain(sock: zmq.Socket, accept: list, seconds: float, until=None) -> list:
    """Decode what arrives for ``seconds`` (or until ``until(messages)``)."""
    chan, got = Channel(sock, Decoder(accept=accept)), []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            _, parts = split_topic(chan.recv_parts())
            msg = chan.decode(parts)
            if msg is not None:
                got.append(msg)
            if until is not None and until(got):
                break
    return got


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _monitor(sock: zmq.Socket) -> zmq.Socket:
    """Watch ``sock``'s handshakes (call before it connects)."""
    return sock.get_monitor_socket(_HANDSHAKE_FAILED)


def _refused(monitor: zmq.Socket, timeout_s: float = 60) -> bool:
    """True once the peer refused a handshake of the monitored socket (CURVE auth or mechanism mismatch)."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000) + 1) and recv_monitor_message(monitor)["event"] & _HANDSHAKE_FAILED:
            return True
    return False


def _close(*socks: zmq.Socket) -> None:
    for s in socks:
        s.close(0)


# --- agent service: activation PUB ------------------------------------------------------------


@pytest.mark.slow
def test_agent_activation_pub_serves_allowed_subscribers_only(keys, start_emulator):
    import torch

    from agents.rl import RLAgent, RLConfig
    from services.agent import AgentService, AgentServiceConfig

    torch.set_num_threads(1)
    emu = start_emulator(mode="realtime", curve=CurveConfig(secret_key=keys.secret("emulator"),
                                                            allowed_clients=keys.allow("agent")))
    act_ep = free_tcp_endpoint()
    service = AgentService(RLAgent(RLConfig()), AgentServiceConfig(
        agent_id="rl-0", frames_endpoint=emu.cfg.frames_endpoint, control_endpoint=emu.cfg.control_endpoint,
        activations_endpoint=act_ep, status_s=0.2,
        curve=CurveConfig(secret_key=keys.secret("agent"), server_public_key=keys.public("emulator"),
                          allowed_clients=keys.allow("encoder"))))
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(summary=service.run()), daemon=True)
    th.start()
    try:
        assert service.ready.wait(60), "agent did not join the CURVE emulator"
        encoder = _sub(act_ep, keys.client("encoder", "agent"), TOPIC_ACTIVATION)
        stranger = _sub(act_ep, keys.client("stranger", "agent"), TOPIC_ACTIVATION, TOPIC_HEARTBEAT)
        wrong_server = _sub(act_ep, keys.client("encoder", "emulator"), TOPIC_ACTIVATION)  # wrong server key
        plain = _sub(act_ep, None, TOPIC_ACTIVATION, TOPIC_HEARTBEAT)
        got = _drain(encoder, [Activation], 60, until=lambda m: len(m) >= 2)
        assert len(got) >= 2 and all(a.agent_id == "rl-0" and a.vectors.size > 0 for a in got)
        for sock in (stranger, wrong_server, plain):
            assert _drain(sock, [Activation, Status], 0.5) == []
        _close(encoder, stranger, wrong_server, plain)
    finally:
        service.stop()
        th.join(20)
    assert not th.is_alive()
    assert box["summary"].frames_received > 0 and box["summary"].decisions > 0  # encrypted frames/actions
    emu.stop()


def test_agent_service_refuses_an_exposed_activation_pub_without_keys():
    from agents.rl import RLAgent, RLConfig
    from services.agent import AgentService, AgentServiceConfig

    service = AgentService(RLAgent(RLConfig()), AgentServiceConfig(
        agent_id="rl-0", frames_endpoint=free_tcp_endpoint(), control_endpoint=free_tcp_endpoint(),
        activations_endpoint="tcp://0.0.0.0:0", join_timeout_s=600))
    t0 = time.monotonic()
    with pytest.raises(SecurityError, match="not loopback: CURVE keys are required"):
        service.run()
    assert time.monotonic() - t0 < 300  # refused up front, not after the 600 s wait for an emulator


# --- encoding service: activation SUB (client) and prediction PUB (server) ----------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    from encoders.fit import FitConfig, fit_encoding
    from encoders.synth import SynthConfig, generate

    s = generate(SynthConfig(voxel_mm=16, n_runs=2, n_trs=30, space_dim=8, seed=1))
    res = fit_encoding(s.bold, {"a": s.features["action"]}, FitConfig(score=False, progress=False), mask=s.mask,
                       affine=s.affine, tr=2.0, roi_labels=s.atlas[s.mask], roi_names=s.roi_names)
    return str(res.weights.save(tmp_path_factory.mktemp("w") / "w.safetensors"))


def test_encoder_takes_input_only_from_publishers_that_admit_it_and_serves_allowed_subscribers(keys, weights):
    from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service
    from services.scanner import TriggerPublisher

    ctx = zmq.Context.instance()
    # two "agent" publishers with the same server key pair: one admits the encoder, one does not
    admits = TriggerPublisher(ctx, ANY_PORT, CurveConfig(secret_key=keys.secret("agent"),
                                                         allowed_clients=keys.allow("encoder")))
    refuses = TriggerPublisher(ctx, ANY_PORT, CurveConfig(secret_key=keys.secret("agent"),
                                                          allowed_clients=keys.allow("dashboard")))
    pred_ep = free_tcp_endpoint()  # the encoder binds it from its config
    admits_ep, refuses_ep = bound_endpoint(admits.sock), bound_endpoint(refuses.sock)
    cfg = EncodingServiceConfig(weights=weights, activations=[admits_ep, refuses_ep], predictions=pred_ep,
                                status_s=0.1, core=CoreConfig(tr_s=0.1, grace_s=0.05),
                                curve=CurveConfig(secret_key=keys.secret("encoder"), server_public_key=keys.public("agent"),
                                                  allowed_clients=keys.allow("dashboard")))
    box, stop, ready = {}, threading.Event(), threading.Event()
    th = threading.Thread(target=lambda: box.update(r=run_encoding_service(cfg, stop=stop, ctx=ctx, ready=ready)),
                          daemon=True)
    th.start()
    try:
        assert ready.wait(60)
        dashboard = _sub(pred_ep, keys.client("dashboard", "encoder"), TOPIC_PREDICTION, TOPIC_HEARTBEAT)
        stranger = _sub(pred_ep, keys.client("stranger", "encoder"), TOPIC_PREDICTION, TOPIC_HEARTBEAT)
        plain = _sub(pred_ep, None, TOPIC_PREDICTION, TOPIC_HEARTBEAT)
        # the encoder subscribes to 3 topics on each publisher; only the one that admits it sees them
        assert admits.wait_for_subscribers(1, 60, topic=TOPIC_TRIGGER)
        assert not refuses.wait_for_subscribers(1, 0.5, topic=TOPIC_TRIGGER)
        for k in range(2):
            admits.send(Trigger(tr_index=k, t_ns=time.monotonic_ns()), TOPIC_TRIGGER)
            refuses.send(Trigger(tr_index=10 + k, t_ns=time.monotonic_ns()), TOPIC_TRIGGER)
        got = _drain(dashboard, [Prediction, Status], 60,
                     until=lambda m: any(isinstance(x, Prediction) for x in m) and any(isinstance(x, Status) for x in m))
        assert any(isinstance(x, Prediction) for x in got) and any(isinstance(x, Status) for x in got)
        assert _drain(stranger, [Prediction, Status], 0.5) == [] and _drain(plain, [Prediction, Status], 0.1) == []
        _close(dashboard, stranger, plain)
    finally:
        stop.set()
        th.join(20)
        admits.close()
        refuses.close()
    r = box["r"]
    assert r.received == 2 and r.trs_predicted == 2  # only the admitting publisher's two triggers arrived


def test_encoding_service_refuses_exposed_endpoints_without_keys(tmp_path):
    from services.encoding import EncodingServiceConfig, run_encoding_service

    missing = str(tmp_path / "not-loaded.safetensors")  # refused before the weights are even read
    with pytest.raises(SecurityError, match="tcp://0.0.0.0:5559 is not loopback"):
        run_encoding_service(EncodingServiceConfig(weights=missing, predictions="tcp://0.0.0.0:5559"))
    with pytest.raises(SecurityError, match="tcp://agent-rl:5557 is not loopback: connecting needs CURVE keys"):
        run_encoding_service(EncodingServiceConfig(weights=missing, activations=["tcp://agent-rl:5557"]))


# --- scanner publisher ---------------------------------------------------------------------------


def test_scanner_publisher_streams_to_allowed_subscribers_only(keys, tmp_path):
    from services.scanner import RecordedSource, TriggerPublisher, publish_stream

    data = np.arange(4 * 4 * 3 * 3, dtype=np.float32).reshape(4, 4, 3, 3)
    bold = tmp_path / "sub-01_task-pong_run-1_bold.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), bold)
    ep = free_tcp_endpoint()
    curve = CurveConfig(secret_key=keys.secret("scanner"), allowed_clients=keys.allow("encoder"))
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(n=publish_stream(RecordedSource(bold, speed=0), ep,
                                                                     wait_subscribers=1, curve=curve)), daemon=True)
    stranger = plain = None
    th.start()
    monitors: list = []
    try:
        stranger = _sub(ep, keys.client("stranger", "scanner"), TOPIC_BOLD, monitor=monitors)
        plain = _sub(ep, None, TOPIC_BOLD, monitor=monitors)
        # both handshakes refused by the publisher (so their subscriptions never reach it): it still waits
        assert all(_refused(m) for m in monitors), "the publisher did not refuse the stranger and the plaintext SUB"
        assert "n" not in box
        encoder = _sub(ep, keys.client("encoder", "scanner"), TOPIC_BOLD)
        got = _drain(encoder, [BoldVolume], 60, until=lambda m: len(m) == 3)
        assert [v.tr_index for v in got] == [0, 1, 2]
        assert np.array_equal(got[2].data, data[..., 2])
        th.join(10)
        assert box["n"] == 3
        assert _drain(stranger, [BoldVolume], 0.3) == [] and _drain(plain, [BoldVolume], 0.1) == []
        _close(encoder)
    finally:
        th.join(10)
        for s in (stranger, plain):
            if s is not None:
                s.disable_monitor()
        _close(*monitors, *(s for s in (stranger, plain) if s is not None))
    with pytest.raises(SecurityError, match="not loopback: CURVE keys are required"):
        TriggerPublisher(zmq.Context.instance(), "tcp://0.0.0.0:0")


# --- one client, several servers: public keys by host name --------------------------------------


def test_server_key_folder_gives_each_host_its_key_and_allow_lists_stay_apart(keys, tmp_path):
    """A SUB with a folder of HOST.key connects to two CURVE servers (different keys, different
    allow-lists, one ZAP handler in this process) and is served by the one that admits it."""
    from services.scanner import TriggerPublisher

    ctx = zmq.Context.instance()
    servers = tmp_path / "servers"
    servers.mkdir()
    shutil.copy(keys.public("agent"), servers / "127.0.0.1.key")
    shutil.copy(keys.public("scanner"), servers / "127.0.0.2.key")
    agent = TriggerPublisher(ctx, ANY_PORT, CurveConfig(secret_key=keys.secret("agent"),
                                                        allowed_clients=keys.allow("encoder")))
    scanner = TriggerPublisher(ctx, "tcp://127.0.0.2:*", CurveConfig(secret_key=keys.secret("scanner"),
                                                                     allowed_clients=keys.allow("dashboard")))
    agent_ep, scanner_ep = bound_endpoint(agent.sock), bound_endpoint(scanner.sock)
    curve = CurveConfig(secret_key=keys.secret("encoder"), server_public_key=str(servers))
    sock = _sub(agent_ep, curve, TOPIC_TRIGGER)
    secure_connect(sock, scanner_ep, curve)
    other = _sub(scanner_ep, CurveConfig(secret_key=keys.secret("dashboard"), server_public_key=str(servers)),
                 TOPIC_TRIGGER)
    try:
        assert agent.wait_for_subscribers(1, 60, TOPIC_TRIGGER) and scanner.wait_for_subscribers(1, 60, TOPIC_TRIGGER)
        agent.send(Trigger(tr_index=1, t_ns=1), TOPIC_TRIGGER)
        scanner.send(Trigger(tr_index=2, t_ns=2), TOPIC_TRIGGER)
        # the scanner admits only the dashboard: the encoder's SUB gets the agent's trigger, never the scanner's
        got = _drain(sock, [Trigger], 30, until=lambda m: m)
        assert [t.tr_index for t in _drain(other, [Trigger], 30, until=lambda m: m)] == [2]
        assert [t.tr_index for t in got + _drain(sock, [Trigger], 0.5)] == [1]
        with pytest.raises(SecurityError, match="expected .*127.0.0.3.key"):
            secure_connect(sock, "tcp://127.0.0.3:5", curve)
    finally:
        _close(sock, other)
        agent.close()
        scanner.close()


# --- dashboard ------------------------------------------------------------------------------------


def test_dashboard_refuses_exposed_endpoints_without_keys_and_subscribes_with_them(keys, tmp_path):
    from services.dashboard import Dashboard, DashboardConfig, LiveState, Subscriber
    from services.scanner import TriggerPublisher

    with pytest.raises(SecurityError, match="tcp://0.0.0.0:5555 is not loopback"):
        Dashboard(DashboardConfig(frames="tcp://0.0.0.0:5555", control=""))
    with pytest.raises(SecurityError, match="tcp://encoder:5559 is not loopback"):
        Dashboard(DashboardConfig(frames="", control="", predictions=["tcp://encoder:5559"]))

    ctx = zmq.Context.instance()
    pub = TriggerPublisher(ctx, ANY_PORT, CurveConfig(secret_key=keys.secret("scanner"),
                                                      allowed_clients=keys.allow("dashboard")))
    ep = bound_endpoint(pub.sock)
    states = {}
    for name in ("dashboard", "stranger"):
        states[name] = LiveState()
        sub = Subscriber(DashboardConfig(frames="", control="", bold=[ep], curve=keys.client(name, "scanner")),
                         states[name], ctx)
        sub.start()
        assert sub.ready.wait(60)
        states[name + "-sub"] = sub
    try:
        assert pub.wait_for_subscribers(1, 60, TOPIC_TRIGGER)
        for k in range(3):
            pub.send(Trigger(tr_index=k, t_ns=time.monotonic_ns()), TOPIC_TRIGGER)
        deadline = time.monotonic() + 60
        while states["dashboard"].snapshot()["scanner"]["tr_index"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states["dashboard"].snapshot()["scanner"]["tr_index"] == 2
        assert states["stranger"].snapshot()["scanner"]["tr_index"] is None
    finally:
        states["dashboard-sub"].stop()
        states["stranger-sub"].stop()
        pub.close()


# --- the CLIs ------------------------------------------------------------------------------------


def _cli(*args: str):
    from neuroarcade.cli import app

    return CliRunner(env={"NEUROARCADE_CONFIG": None}).invoke(app, list(args))


@pytest.mark.parametrize("argv, endpoint", [
    (["agent", "--kind", "rl", "--activations", "tcp://0.0.0.0:5557"], "tcp://0.0.0.0:5557"),
    (["agent", "--kind", "rl", "--activations", "", "--frames", "tcp://0.0.0.0:5555"], "tcp://0.0.0.0:5555"),
    (["encode", "--weights", "w.safetensors", "--predictions", "tcp://0.0.0.0:5559"], "tcp://0.0.0.0:5559"),
    (["encode", "--weights", "w.safetensors", "--activations", "tcp://0.0.0.0:5557"], "tcp://0.0.0.0:5557"),
    (["scanner", "live", "--folder", ".", "--endpoint", "tcp://0.0.0.0:5558"], "tcp://0.0.0.0:5558"),
    (["scanner", "simulated", "b.nii", "--folder", ".", "--trigger-endpoint", "tcp://0.0.0.0:5560"],
     "tcp://0.0.0.0:5560"),
    (["dashboard", "--frames", "tcp://0.0.0.0:5555"], "tcp://0.0.0.0:5555"),
    (["dashboard", "--frames", "", "--predictions", "tcp://0.0.0.0:5559"], "tcp://0.0.0.0:5559"),
])
def test_cli_refuses_exposed_endpoints_without_keys(argv, endpoint):
    result = _cli(*argv)
    assert result.exit_code == 2, result.output
    assert f"error: {endpoint} is not loopback" in result.output and "CURVE keys" in result.output


def test_cli_names_the_missing_key_when_keys_are_incomplete(keys):
    result = _cli("agent", "--kind", "rl", "--activations", "tcp://0.0.0.0:5557", "--curve-secret",
                  keys.secret("agent"), "--curve-server-key", keys.public("emulator"))
    assert result.exit_code == 2 and "allow-list folder of client public keys (--curve-allow)" in result.output
    result = _cli("encode", "--weights", "w.safetensors", "--activations", "tcp://agent-rl:5557", "--predictions", "",
                  "--curve-secret", keys.secret("encoder"), "--curve-server-key", str(keys.root / "pairs"))
    assert result.exit_code == 2 and "no public key for tcp://agent-rl:5557: expected" in result.output
    assert "agent-rl.key" in result.output
