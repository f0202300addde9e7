"""`neuroarcade health`: the probe the containers' readiness/liveness checks run, against real services."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import zmq
from typer.testing import CliRunner

from neuroarcade.cli import app
from services.plumbing.health import HealthError, probe
from services.plumbing.security import CurveConfig, generate_keys
from services.plumbing.transport import free_tcp_endpoint


def run_cli(*args: str):
    return CliRunner().invoke(app, ["health", *args])


def test_probes_answer_for_a_running_emulator(start_emulator):
    emu = start_emulator(mode="realtime", status_s=0.2)
    beat = probe(emu.cfg.control_endpoint, "heartbeat", timeout_s=5)
    assert beat["sender"] == "emulator"
    status = probe(emu.cfg.frames_endpoint, "status", service="emulator", timeout_s=5)
    assert status["service"] == "emulator" and status["session_id"] == emu.emu.session_id
    assert probe(emu.cfg.frames_endpoint, "handshake", timeout_s=5)["handshake"] == "ok"
    assert probe(emu.cfg.control_endpoint, "handshake", socket_kind="dealer", timeout_s=5)["handshake"] == "ok"
    with pytest.raises(HealthError, match="no Status from encoder"):
        probe(emu.cfg.frames_endpoint, "status", service="encoder", timeout_s=1.0)
    result = run_cli("--endpoint", emu.cfg.control_endpoint, "--check", "heartbeat", "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert '"healthy": true' in result.output
    summary = emu.stop()
    assert summary.counters.rejected == 0  # the probes speak the protocol correctly
    # once it is gone, the same probes fail
    assert run_cli("--endpoint", emu.cfg.control_endpoint, "--check", "heartbeat", "--timeout", "0.5").exit_code == 1
    with pytest.raises(HealthError):
        probe(emu.cfg.frames_endpoint, "handshake", timeout_s=0.5)


def test_nothing_bound_or_wrong_socket_type_is_unhealthy():
    result = run_cli("--endpoint", free_tcp_endpoint(), "--timeout", "0.3")
    assert result.exit_code == 1 and "no ZeroMQ handshake" in result.output
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    ep = free_tcp_endpoint()
    router.bind(ep)
    try:
        with pytest.raises(HealthError):  # a SUB cannot talk to a ROUTER: ZMTP refuses the socket-type pair
            probe(ep, "handshake", socket_kind="sub", timeout_s=1.0)
        assert probe(ep, "handshake", socket_kind="dealer", timeout_s=2.0)["handshake"] == "ok"
        with pytest.raises(HealthError, match="no heartbeat echo"):  # a ROUTER that never answers
            probe(ep, "heartbeat", timeout_s=0.5)
    finally:
        router.close(0)
    assert run_cli("--endpoint", ep, "--check", "sometimes").exit_code == 2


def test_a_publisher_without_status_passes_handshake_but_not_status():
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    ep = free_tcp_endpoint()
    pub.bind(ep)
    try:
        assert probe(ep, "handshake", timeout_s=2.0)["handshake"] == "ok"
        with pytest.raises(HealthError, match="no Status"):
            probe(ep, "status", timeout_s=0.5)
    finally:
        pub.close(0)


def test_curve_probe_needs_the_right_keys(start_emulator, tmp_path):
    keys, allow = tmp_path / "keys", tmp_path / "public"
    _, server_secret = generate_keys(keys, "emulator")
    probe_public, probe_secret = generate_keys(keys, "health")
    _, stranger_secret = generate_keys(keys, "stranger")
    allow.mkdir()
    (allow / "health.key").write_bytes(probe_public.read_bytes())
    emu = start_emulator(mode="realtime", curve=CurveConfig(secret_key=str(server_secret), allowed_clients=str(allow)))
    server_public = str(keys / "emulator.key")
    ok = run_cli("--endpoint", emu.cfg.control_endpoint, "--check", "heartbeat", "--timeout", "5",
                 "--curve-secret", str(probe_secret), "--curve-server", server_public)
    assert ok.exit_code == 0, ok.output
    assert probe(emu.cfg.frames_endpoint, "handshake", secret_key=str(probe_secret), server_key=server_public,
                 timeout_s=5)["handshake"] == "ok"
    with pytest.raises(HealthError, match="authentication failed|no ZeroMQ handshake"):
        probe(emu.cfg.frames_endpoint, "handshake", secret_key=str(stranger_secret), server_key=server_public,
              timeout_s=2)
    with pytest.raises(HealthError):  # plaintext against a CURVE server
        probe(emu.cfg.control_endpoint, "heartbeat", timeout_s=1)
    emu.stop()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        ok = self.headers.get("x-neuroarcade-token") == "s3cret"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_http_probe_sends_the_dashboard_token():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/state"
    try:
        assert probe(url, "http", token="s3cret")["http_status"] == 200
        with pytest.raises(HealthError, match="HTTP 401"):
            probe(url, "http", token="wrong")
        assert run_cli("--endpoint", url, "--check", "http", "--token", "s3cret").exit_code == 0
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(HealthError, match="no HTTP answer"):
        probe(url, "http", timeout_s=1)
