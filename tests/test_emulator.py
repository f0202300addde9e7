"""The emulator service over real ZeroMQ sockets on loopback, with our own GameClient."""

from __future__ import annotations

import time

import zmq

from protocols import Status
from services.plumbing.client import GameClient
from services.emulator import record_headless
from services.plumbing.game import GameSettings, frame_hash
from services.plumbing.recording import read_recording
from services.plumbing.transport import TOPIC_HEARTBEAT, Channel, make_socket, split_topic


FRAME_PERIOD_NS = 4 * 1_000_000_000 // 60  # realtime Pong-v5 (frameskip 4): 15 frames/s


def _client(emu, cid, role="controller"):
    c = GameClient(cid, role=role, frames_endpoint=emu.cfg.frames_endpoint,
                   control_endpoint=emu.cfg.control_endpoint)
    c.join(timeout_s=30)
    return c


def _wait(cond, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_lockstep_applies_controller_actions_and_logs_observers(start_emulator):
    emu = start_emulator(mode="lockstep", game="ALE/Breakout-v5")
    ctl = _client(emu, "ctl")
    obs = _client(emu, "obs", role="controller")  # slot taken: demoted to observer
    assert ctl.role == "controller" and obs.role == "observer"
    assert ctl.welcome.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    sent, seen = {}, []
    while len(seen) < 40:
        f = ctl.next_frame(20_000)
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
    f = ctl.next_frame(20_000)
    ctl.act(f, 2)
    got = []
    t_end = time.monotonic() + 60
    while len(got) < 5 and time.monotonic() < t_end:  # never answer again: steps continue on timeout
        g = ctl.next_frame(500)
        if g is not None and g.seq > f.seq:
            got.append(g)
    assert len(got) == 5
    summary = emu.stop()
    rec = read_recording(summary.record_path)
    assert rec.steps[0].action == 2 and rec.steps[0].controller == "ctl"
    assert all(s.action == 2 and s.controller == "timeout" for s in rec.steps[1:5])


def test_realtime_never_outruns_the_game_rate_and_holds_the_last_action(start_emulator):
    emu = start_emulator(mode="realtime")  # Pong, frameskip 4 -> 15 Hz
    ctl = _client(emu, "ctl")
    first = ctl.next_frame(20_000)
    ctl.act(first, 2)
    frames = []
    t_end = time.monotonic() + 60
    # counts, not a time window: load only makes them take longer
    while (len(frames) < 25 or sum(f.action == 2 for f in frames) < 10) and time.monotonic() < t_end:
        f = ctl.next_frame(200)
        if f is not None:
            frames.append(f)
    summary = emu.stop()
    assert len(frames) >= 25, "realtime emulator stalled"
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs))  # in order, none twice
    # Paced on the emulator's own clock: load can make it late, never early. It re-anchors when behind
    # (never bursts), so k frames later is at least k - 2 periods later.
    for a, b in zip(frames, frames[1:]):
        assert b.t_ns > a.t_ns
    for f in frames[1:]:
        assert f.t_ns - frames[0].t_ns >= (f.seq - frames[0].seq - 2) * FRAME_PERIOD_NS, (f.seq, f.t_ns)
    applied = [i for i, f in enumerate(frames) if f.action == 2]
    assert applied, "the action was never applied"
    later = frames[applied[0]:]  # once applied (however late the action arrived), held without new actions
    assert len(later) >= 10 and all(f.action == 2 for f in later)
    rec = read_recording(summary.record_path)
    assert any(s.controller == "hold" for s in rec.steps)


def test_replay_serves_bit_identical_frames(start_emulator, tmp_path):
    src = tmp_path / "src.narec"
    rec = record_headless(GameSettings(game="ALE/SpaceInvaders-v5", repeat_action_probability=0.25), 60, src)
    emu = start_emulator(mode="replay", replay_path=str(src), speed=0.0, wait_for_controller_s=None)
    # speed 0 may finish before we subscribe: replay at recorded pace instead is checked below
    summary = emu.stop() if not emu.thread.is_alive() else None
    emu2 = start_emulator(mode="replay", replay_path=str(src), speed=4.0, wait_for_clients=1)
    watcher = _client(emu2, "watcher", role="controller")
    assert watcher.role == "observer"  # nobody controls a replay
    hashes = {}
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end and (emu2.thread.is_alive() or watcher.sub.poll(0)):
        f = watcher.next_frame(200)
        if f is not None:
            hashes[f.seq] = f.frame_hash
            assert frame_hash(f.pixels) == f.frame_hash
    emu2.thread.join(10)
    recorded = {seq: h for seq, _, h in rec.frames()}
    # every frame the watcher decoded is the recorded one (it keeps the newest, so it may skip some) ...
    assert hashes and all(recorded[s] == h for s, h in hashes.items())
    assert max(hashes) == max(recorded)  # ... up to the last one
    # ... and the emulator re-emitted every recorded frame, each checked against the recording's hash
    assert emu2.emu.frames_published == len(recorded)
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
    t_end = time.monotonic() + 60
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
    from services.plumbing.transport import free_tcp_endpoint

    fe, ce = free_tcp_endpoint(), free_tcp_endpoint()
    emu1 = start_emulator(mode="realtime", frames_endpoint=fe, control_endpoint=ce, heartbeat_s=0.2)
    c = _client(emu1, "agent", role="controller")
    s1 = c.welcome.session_id
    assert c.next_frame(2000) is not None
    emu1.stop()
    emu2 = start_emulator(mode="realtime", frames_endpoint=fe, control_endpoint=ce, heartbeat_s=0.2)
    t0 = time.monotonic()
    f = None
    while time.monotonic() - t0 < 60:
        f = c.next_frame(200)
        if f is not None and c.welcome is not None and c.welcome.session_id != s1:
            break
    assert f is not None and f.session_id == emu2.emu.session_id
    assert c.welcome.session_id == emu2.emu.session_id and c.role == "controller"
    assert c.stats.rejoins >= 1  # by itself: the test never called join again
    c.close()
    emu2.stop()


def test_prometheus_metrics_expose_counters(start_emulator):
    import urllib.request

    emu = start_emulator(mode="realtime", metrics_port=0)
    ctl = _client(emu, "ctl")
    f = ctl.next_frame(20_000)
    ctl.act(f, 1)
    ctl.control.sock.send(b"garbage")

    def scrape() -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{emu.emu.metrics_port}/metrics", timeout=10).read().decode()
        return {l.split(" ")[0]: float(l.split(" ")[1]) for l in body.splitlines() if l and not l.startswith("#")}

    # sent in this order on one DEALER: once the garbage is counted, the action before it was handled too
    _wait(lambda: emu.emu.counters.rejected >= 1 and emu.emu.steps > 0, 60, "the garbage counted, a step made")
    lines = scrape()
    emu.stop()
    assert lines["neuroarcade_emulator_steps_total"] > 0
    assert lines['neuroarcade_emulator_messages_rejected_total{code="bad_header"}'] == 1
    assert lines['neuroarcade_emulator_client_actions_total{client="ctl"}'] >= 1
    assert lines["neuroarcade_emulator_clients"] == 1


def test_replay_re_emits_scanner_triggers_at_the_same_game_time(start_emulator, tmp_path):
    from protocols import Trigger
    from services.plumbing.transport import TOPIC_TRIGGER

    src = tmp_path / "scan.narec"
    rec = record_headless(GameSettings(game="ALE/Pong-v5"), 150, src, tr_s=2.0)
    emu = start_emulator(mode="replay", replay_path=str(src), speed=10.0, wait_for_clients=1, status_s=0.05)
    ctx = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
    sub.connect(emu.cfg.frames_endpoint)
    ch = Channel(sub)
    # Subscriptions reach the PUB in order: a Status (published while the replay waits for its client)
    # arriving means the trigger subscription is in place before the replay starts.
    assert sub.poll(60_000), "no status from the emulator"
    assert split_topic(ch.recv_parts())[0] == TOPIC_HEARTBEAT
    sub.setsockopt(zmq.UNSUBSCRIBE, TOPIC_HEARTBEAT)
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
    want, got_trs = rec.frames_per_tr(), replayed.frames_per_tr()
    assert len(got_trs) == len(want)
    assert got_trs[:-1] == want[:-1]  # the same frames fall in the same TRs
    # The last TR has no next trigger: it is closed one median TR after its own (0.2 s at speed 10), so a
    # stall on a loaded machine can push its frames past that inferred end: in order, a prefix of them.
    assert got_trs[-1] == want[-1][:len(got_trs[-1])]


def test_replay_serve_command_serves_the_whole_recording_bit_exactly(tmp_path, monkeypatch):
    """`neuroarcade replay X --serve` runs a replay session from the recording's own header."""
    import json as _json

    from typer.testing import CliRunner

    from neuroarcade.cli import app
    from services.plumbing.transport import free_tcp_endpoint

    monkeypatch.chdir(tmp_path)  # the replay session's own recording goes under ./runs
    rec = tmp_path / "r.narec"
    assert CliRunner().invoke(app, ["record", "--game", "ALE/Breakout-v5", "--steps", "40", "--out", str(rec)]).exit_code == 0
    res = CliRunner().invoke(app, ["replay", str(rec), "--serve", "--speed", "0", "--frames", free_tcp_endpoint(),
                                   "--control", free_tcp_endpoint()])
    assert res.exit_code == 0, res.output
    summary = _json.loads(res.output.strip().splitlines()[-1])
    assert (summary["mode"], summary["steps"], summary["hash_mismatches"]) == ("replay", 40, 0)
    assert "ALE/Breakout-v5" in res.output  # the game came from the recording, not the command's default
