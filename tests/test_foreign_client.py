"""A client written from protocols/PROTOCOL.md alone: plain pyzmq + msgpack, no neuroarcade imports.

It subscribes to frames and controls a lockstep game; the emulator runs as a real subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import xxhash
import zmq

GAME_ACTIONS = 6  # checked against the welcome below


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_client_from_the_spec_controls_a_lockstep_game(tmp_path):
    frames_ep, control_ep = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "neuroarcade.cli", "emulator", "--mode", "lockstep",
                             "--game", "ALE/Pong-v5", "--sticky", "0", "--frames", frames_ep, "--control", control_ep,
                             "--record", str(tmp_path / "s.narec"), "--max-steps", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"frame")
    sub.connect(frames_ep)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(control_ep)
    try:
        welcome = None
        for _ in range(60):  # step 2: hello until welcome
            dealer.send(msgpack.packb({"v": 1, "kind": "hello", "client_id": "foreign", "role": "controller"}))
            if dealer.poll(500):
                reply = msgpack.unpackb(dealer.recv_multipart()[0])
                if reply["kind"] == "welcome":
                    welcome = reply
                    break
        assert welcome is not None and welcome["role"] == "controller"
        assert len(welcome["action_meanings"]) == GAME_ACTIONS and welcome["frame_shape"] == [210, 160, 3]

        answered, applied = {}, {}
        t_end = time.monotonic() + 60
        while len(answered) < 30 and time.monotonic() < t_end:
            if not sub.poll(1000):
                continue
            topic, header, *bufs = sub.recv_multipart()
            assert topic == b"frame"
            h = msgpack.unpackb(header)
            assert h["v"] == 1 and h["kind"] == "frame"
            ref = h["pixels"]
            pixels = np.frombuffer(bufs[ref["buf"]], dtype=ref["dtype"]).reshape(ref["shape"])
            assert pixels.shape == (210, 160, 3)
            digest = getattr(xxhash, welcome["frame_hash_algo"] + "_hexdigest")  # e.g. xxh64_hexdigest
            assert digest(pixels.tobytes()) == h["frame_hash"]
            applied[h["seq"]] = h["action"]
            if h["seq"] in answered:
                continue
            action = (h["seq"] * 5) % GAME_ACTIONS
            answered[h["seq"]] = action
            dealer.send(msgpack.packb({"v": 1, "kind": "action", "agent_id": "foreign", "frame_seq": h["seq"],
                                       "action": action, "probs": [1.0 / GAME_ACTIONS] * GAME_ACTIONS}))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert len(answered) >= 30
        # each frame after the first shows the action we sent for its predecessor
        for seq, a in applied.items():
            if seq - 1 in answered and a != -1:
                assert a == answered[seq - 1]
        assert '"steps": 30' in out
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(linger=0)
