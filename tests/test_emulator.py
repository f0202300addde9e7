"""The emulator service over real ZeroMQ sockets on loopback, with our own GameClient."""

from __future__ import annotations

import time

import zmq

from protocols import Status
from services.client import GameClient
from services.emulator import record_headless
from services.game import GameSettings, frame_hash
from services.recording import read_recording
from services.transport import TOPIC_HEARTBEAT, Channel, make_socket, split_topic


def _client(emu, cid, role="controller"):
    c = GameClient(cid, role=role, frames_endpoint=emu.cfg.frames_endpoint,
                   control_endpoint=emu.cfg.control_endpoint)
    c.join(timeout_s=10)
    return c


def test_lockstep_applies_controller_actions_and_logs_observers(start_emulator):
    emu = start_emulator(mode="lockstep", game="ALE/Breakout-v5")
    ctl = _client(emu, "ctl")
    obs = _client(emu, "obs", role="controller")  # slot taken: demoted to observer
    assert ctl.role == "controller" and obs.role == "observer"
    assert ctl.welcome.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    sent, seen = {}, []
    while len(seen) < 40:
        f = ctl.next_frame(2000)
        assert f is not None, "lockstep stalled"
        if seen and f.seq == seen[-1].seq:
            continue  # re-published pending frame
        seen.append(f)
        if f.seq in sent:
            continue
        assert frame_hash(f.pixels) == f.frame_hash
        if f.seq - 1 in sent and f.action != -1:
            assert f.action == sent[f.seq - 1] and f.controller == "ctl"
        a = (f.seq * 7) % 4
        sent[f.seq] = a
        ctl.act(f, a)
        of = obs.next_frame(0)
        if of is not None:
            obs.act(of, 0)
    assert [f.seq for f in seen] == list(range(seen[0].seq, seen[0].seq + 40))
    summary = emu.stop()
    rec = read_recording(summary.record_path)
    assert rec.complete and summary.counters.rejected == 0
    applied = {s.seq - 1: s.action for s in rec.steps}
    for seq, a in sent.items():
        if seq in applied:
            assert applied[seq] == a
    logged = [log for s in rec.steps for log in s.actions]
    assert {l.agent_id for l in logged} >= {"ctl"}
    assert all(l.role == "observer" for l in logged if l.agent_id == "obs")
    assert summary.clients["ctl"]["actions"] >= 39 and summary.clients["ctl"]["rt_p50_ms"] is not None


def test_lockstep_timeout_policy_repeats_last_action(start_emulator):
    emu = start_emulator(mode="lockstep", step_timeout_s=0.05, on_timeout="repeat")
    ctl = _client(emu, "ctl")
    f = ctl.next_frame(2000)
    ctl.act(f, 2)
    got = []
    t_end = time.monotonic() + 5
    while len(got) < 5 and time.monotonic() < t_end:  # never answer again: steps continue on timeout
        g = ctl.next_frame(500)
        if g is not None and g.seq > f.seq:
            got.append(g)
    assert len(got) == 5
    summary = emu.stop()
    rec = read_recording(summary.record_path)
    assert rec.steps[0].action == 2 and rec.steps[0].controller == "ctl"
    assert all(s.action == 2 and s.controller == "timeout" for s in rec.steps[1:5])


def test_realtime_runs_at_the_game_rate_and_holds_the_last_action(start_emulator):
    emu = start_emulator(mode="realtime")  # Pong, frameskip 4 -> 15 Hz
    ctl = _client(emu, "ctl")
    first = ctl.next_frame(2000)
    ctl.act(first, 2)
    frames = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        f = ctl.next_frame(200)
        if f is not None:
            frames.append(f)
    summary = emu.stop()
    rate = (frames[-1].t_ns - frames[0].t_ns) / 1e9
    rate = (len(frames) - 1) / rate
    assert 12 < rate < 18, rate
    later = [f for f in frames if f.seq > first.seq + 2]
    assert later and all(f.action == 2 for f in later)  # held without new actions
    rec = read_recording(summary.record_path)
    assert any(s.controller == "hold" for s in rec.steps)


def test_replay_serves_bit_identical_frames(start_emulator, tmp_path):
    src = tmp_path / "src.narec"
    rec = record_headless(GameSettings(game="ALE/SpaceInvaders-v5", repeat_action_probability=0.25), 60, src)
    emu = start_emulator(mode="replay", replay_path=str(src), speed=0.0, wait_for_controller_s=None)
    # speed 0 may finish before we subscribe: replay at recorded pace instead is checked below
    summary = emu.stop() if not emu.thread.is_alive() else None
    emu2 = start_emulator(mode="replay", replay_path=str(src), speed=4.0)
    watcher = _client(emu2, "watcher", role="controller")
    assert watcher.role == "observer"  # nobody controls a replay
    hashes = {}
    t_end = time.monotonic() + 15
    while time.monotonic() < t_end and emu2.thread.is_alive():
        f = watcher.next_frame(200)
        if f is not None:
            hashes[f.seq] = f.frame_hash
            assert frame_hash(f.pixels) == f.frame_hash
    emu2.thread.join(10)
    recorded = {seq: h for seq, _, h in rec.frames()}
    assert len(hashes) > 20
    assert all(recorded[s] == h for s, h in hashes.items())
    assert emu2.summary.hash_mismatches == 0 and emu2.summary.reason == "end of recording"
    del summary


def test_status_reports_counters_and_clients(start_emulator):
    emu = start_emulator(mode="realtime", status_s=0.1)
    ctx = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
    sub.connect(emu.cfg.frames_endpoint)
    ch = Channel(sub)
    _client(emu, "ctl")
    status = None
    t_end = time.monotonic() + 5
    while time.monotonic() < t_end:
        if sub.poll(200):
            _, body = split_topic(ch.recv_parts())
            msg = ch.decode(body)
            if isinstance(msg, Status) and msg.clients:
                status = msg
                break
    sub.close(0)
    emu.stop()
    assert status is not None and status.clients == {"ctl": "controller"} and status.service == "emulator"


def test_client_rejoins_after_emulator_restart(start_emulator):
    from services.transport import free_tcp_endpoint

    fe, ce = free_tcp_endpoint(), free_tcp_endpoint()
    emu1 = start_emulator(mode="realtime", frames_endpoint=fe, control_endpoint=ce, heartbeat_s=0.2)
    c = _client(emu1, "agent", role="controller")
    s1 = c.welcome.session_id
    assert c.next_frame(2000) is not None
    emu1.stop()
    emu2 = start_emulator(mode="realtime", frames_endpoint=fe, control_endpoint=ce, heartbeat_s=0.2)
    t0 = time.monotonic()
    f = None
    while time.monotonic() - t0 < 10:
        f = c.next_frame(200)
        if f is not None and c.welcome is not None and c.welcome.session_id != s1:
            break
    assert f is not None and f.session_id == emu2.emu.session_id
    assert c.welcome.session_id == emu2.emu.session_id and c.role == "controller"
    assert time.monotonic() - t0 < 5
    c.close()
    emu2.stop()


def test_prometheus_metrics_expose_counters(start_emulator):
    import urllib.request

    emu = start_emulator(mode="realtime", metrics_port=0)
    ctl = _client(emu, "ctl")
    f = ctl.next_frame(2000)
    ctl.act(f, 1)
    ctl.control.sock.send(b"garbage")
    time.sleep(0.5)
    body = urllib.request.urlopen(f"http://127.0.0.1:{emu.emu.metrics_port}/metrics", timeout=5).read().decode()
    emu.stop()
    lines = {l.split(" ")[0]: float(l.split(" ")[1]) for l in body.splitlines() if l and not l.startswith("#")}
    assert lines["neuroarcade_emulator_steps_total"] > 0
    assert lines['neuroarcade_emulator_messages_rejected_total{code="bad_header"}'] == 1
    assert lines['neuroarcade_emulator_client_actions_total{client="ctl"}'] >= 1
    assert lines["neuroarcade_emulator_clients"] == 1


def test_replay_re_emits_scanner_triggers_at_the_same_game_time(start_emulator, tmp_path):
    from protocols import Trigger
    from services.transport import TOPIC_TRIGGER

    src = tmp_path / "scan.narec"
    rec = record_headless(GameSettings(game="ALE/Pong-v5"), 150, src, tr_s=2.0)
    emu = start_emulator(mode="replay", replay_path=str(src), speed=10.0, wait_for_clients=1)
    ctx = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    sub.connect(emu.cfg.frames_endpoint)
    ch = Channel(sub)
    time.sleep(0.3)  # subscription in place before the replay starts
    watcher = _client(emu, "watcher", role="observer")
    got = []
    while emu.thread.is_alive() or sub.poll(0):
        if sub.poll(200):
            _, body = split_topic(ch.recv_parts())
            msg = ch.decode(body)
            if isinstance(msg, Trigger):
                got.append(msg.tr_index)
    sub.close(0)
    watcher.close()
    assert got == [t.tr_index for t in rec.triggers]
    replayed = read_recording(emu.summary.record_path)
    assert replayed.frames_per_tr() == rec.frames_per_tr()  # the same frames fall in the same TRs
