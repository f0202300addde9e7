"""CURVE on the emulator: unknown clients refused, allow-listed clients served; no keys off loopback."""

from __future__ import annotations

import pytest
import zmq

from services.plumbing.client import GameClient
from services.emulator import Emulator, EmulatorConfig
from services.plumbing.security import CurveConfig, SecurityError, generate_keys, is_loopback


def test_loopback_detection():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://127.3.2.1:1") and is_loopback("ipc:///tmp/x")
    assert is_loopback("tcp://localhost:5") and is_loopback("tcp://[::1]:5")
    assert not is_loopback("tcp://*:5555") and not is_loopback("tcp://0.0.0.0:5555")
    assert not is_loopback("tcp://10.1.2.3:5555") and not is_loopback("tcp://eth0:5555")


def test_non_loopback_endpoint_without_keys_refuses_to_start(tmp_path):
    emu = Emulator(EmulatorConfig(frames_endpoint="tcp://0.0.0.0:0", control_endpoint="tcp://127.0.0.1:0",
                                  record_path=str(tmp_path / "r.narec"), max_steps=1))
    with pytest.raises(SecurityError, match="CURVE keys are required"):
        emu.run()


def test_curve_refuses_unknown_clients_and_serves_allowed_ones(tmp_path, start_emulator):
    keys, allow = tmp_path / "keys", tmp_path / "allowed"
    _, server_secret = generate_keys(keys, "server")
    good_public, good_secret = generate_keys(keys, "agent")
    _, stranger_secret = generate_keys(keys, "stranger")
    allow.mkdir()
    (allow / "agent.key").write_bytes(good_public.read_bytes())
    emu = start_emulator(mode="realtime", curve=CurveConfig(secret_key=str(server_secret), allowed_clients=str(allow)))
    server_public = str(keys / "server.key")

    good = GameClient("agent", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
                      control_endpoint=emu.cfg.control_endpoint,
                      curve=CurveConfig(secret_key=str(good_secret), server_public_key=server_public))
    welcome = good.join(timeout_s=10)
    assert welcome.role == "controller"
    assert good.next_frame(3000) is not None  # encrypted frames arrive

    stranger = GameClient("stranger", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
                          control_endpoint=emu.cfg.control_endpoint, hello_timeout_s=0.5,
                          curve=CurveConfig(secret_key=str(stranger_secret), server_public_key=server_public))
    with pytest.raises(TimeoutError):
        stranger.join(timeout_s=3)
    assert stranger.next_frame(500) is None

    # a plaintext client gets nothing either
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.SUB)
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(emu.cfg.frames_endpoint)
    assert not plain.poll(1000)
    plain.close(0)
    good.close()
    stranger.close()
    summary = emu.stop()
    assert "stranger" not in summary.clients  # the ZAP handler refused it before any message got through
