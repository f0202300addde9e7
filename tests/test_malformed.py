"""10,000 malformed messages at the emulator's control socket: it keeps serving and counts them all."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from services.plumbing.client import GameClient


def _malformed(rng: np.random.Generator, i: int) -> list[bytes]:
    frame_hdr = {"v": 1, "kind": "frame", "session_id": "x", "seq": 1, "episode": 0, "step": 0, "action": 0,
                 "controller": "", "reward": 0.0, "terminated": False, "truncated": False, "t_ns": 0, "wall_ns": 0,
                 "pixels": {"dtype": "uint8", "shape": [210, 160, 3], "buf": 0}}
    kind = i % 10
    if kind == 0:  # random bytes
        return [rng.bytes(int(rng.integers(1, 200)))]
    if kind == 1:  # wrong version
        return [msgpack.packb({"v": int(rng.integers(2, 1000)), "kind": "action", "agent_id": "f", "frame_seq": 0,
                               "action": 0})]
    if kind == 2:  # unknown kind
        return [msgpack.packb({"v": 1, "kind": f"k{rng.integers(1e9)}"})]
    if kind == 3:  # truncated payload
        return [msgpack.packb(frame_hdr), rng.bytes(int(rng.integers(0, 100799)))]
    if kind == 4:  # oversized shape
        return [msgpack.packb({**frame_hdr, "pixels": {"dtype": "uint8", "shape": [1 << 30, 1 << 30], "buf": 0}}),
                b"\x00" * 16]
    if kind == 5:  # wrong field types
        return [msgpack.packb({"v": 1, "kind": "action", "agent_id": 7, "frame_seq": "a", "action": None})]
    if kind == 6:  # header not a map
        return [msgpack.packb([1, "action", 3])]
    if kind == 7:  # well-formed frame, but frames are not accepted on the control socket
        return [msgpack.packb(frame_hdr), b"\x00" * 100800]
    if kind == 8:  # action from a client that never said hello
        return [msgpack.packb({"v": 1, "kind": "action", "agent_id": "stranger", "frame_seq": 0, "action": 0})]
    return [b""]  # empty frame


@pytest.mark.slow
def test_ten_thousand_malformed_messages_are_all_rejected_and_counted(start_emulator):
    emu = start_emulator(mode="lockstep", step_timeout_s=30)
    ctl = GameClient("good", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
                     control_endpoint=emu.cfg.control_endpoint)
    ctl.join(timeout_s=10)
    done, finished = threading.Event(), threading.Event()

    def flood():
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 100)  # error replies beyond this are dropped by the emulator, not queued
        s.connect(emu.cfg.control_endpoint)
        rng = np.random.default_rng(0)
        for i in range(10_000):
            s.send_multipart(_malformed(rng, i))
        done.set()
        finished.wait(60)  # stay connected: a closing peer's unread messages may be discarded
        s.close(linger=0)

    flooder = threading.Thread(target=flood)
    flooder.start()
    steps = 0
    last = -1
    t_end = time.monotonic() + 120
    while (not done.is_set() or steps < 50) and time.monotonic() < t_end:
        f = ctl.next_frame(1000)
        if f is None or f.seq == last:
            continue
        last = f.seq
        ctl.act(f, 1)
        steps += 1
    deadline = time.monotonic() + 30
    while emu.emu.counters.rejected < 10_000 and time.monotonic() < deadline:
        f = ctl.next_frame(100)  # keep playing while the backlog drains
        if f is not None and f.seq != last:
            last = f.seq
            ctl.act(f, 1)
    finished.set()
    flooder.join()
    summary = emu.stop()
    assert steps >= 50, "the well-behaved controller was starved"
    assert summary.counters.rejected == 10_000, summary.counters.rejected_by_code
    assert set(summary.counters.rejected_by_code) == {"bad_header", "bad_version", "unknown_kind", "bad_payload",
                                                       "not_allowed"}
    assert ctl.stats.errors == []
