"""Recordings: bit-exact replay across games and sticky settings, crash safety, TR alignment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.emulator import record_headless, verify_replay
from services.plumbing.game import GameSettings
from services.plumbing.recording import Step, read_recording, write_bids_events


@pytest.mark.slow
@pytest.mark.parametrize("sticky", [0.0, 0.25])
@pytest.mark.parametrize("game", ["ALE/Pong-v5", "ALE/Breakout-v5", "ALE/SpaceInvaders-v5", "ALE/Enduro-v5"])
def test_record_then_verify_is_bit_exact(tmp_path, game, sticky):
    path = tmp_path / "r.narec"
    rec = record_headless(GameSettings(game=game, seed=3, repeat_action_probability=sticky), 400, path)
    assert rec.complete and len(rec.steps) == 400
    assert len({s.frame_hash for s in rec.steps}) > 10  # frames really change
    result = verify_replay(path)
    assert result.ok, result.detail
    assert result.frames_checked == len(rec.steps) + len(rec.resets)


def test_verify_reports_first_mismatching_step(tmp_path):
    path = tmp_path / "r.narec"
    rec = record_headless(GameSettings(game="ALE/Breakout-v5", seed=1, repeat_action_probability=0.0), 200, path)
    # Rewrite the file with one action changed at step 120: the replay must diverge there or later.
    from services.plumbing.recording import RecordingWriter, iter_records

    tampered = tmp_path / "t.narec"
    records = list(iter_records(path))
    with RecordingWriter(tampered, records[0]) as w:
        for r in records[1:]:
            if isinstance(r, Step) and r.seq == 120:
                r.action = (r.action + 1) % len(rec.header.action_meanings)
                r.frame_hash = "0" * 32
            w.write(r)
    result = verify_replay(tampered)
    assert not result.ok and result.first_mismatch_seq == 120


@pytest.mark.slow
def test_replay_cli_exit_codes(tmp_path):
    path = tmp_path / "r.narec"
    record_headless(GameSettings(game="ALE/Pong-v5", repeat_action_probability=0.25), 100, path)
    cli = [sys.executable, "-m", "neuroarcade.cli", "replay", str(path), "--verify"]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "bit-exact" in ok.stdout
    garbage = tmp_path / "g.narec"
    garbage.write_bytes(b"not a recording")
    bad = subprocess.run([sys.executable, "-m", "neuroarcade.cli", "replay", str(garbage), "--verify"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a neuroarcade recording" in bad.stderr


@pytest.mark.slow
def test_sigkill_leaves_a_readable_recording_that_replays(tmp_path):
    path = tmp_path / "killed.narec"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroarcade.cli", "emulator", "--game", "ALE/Breakout-v5", "--mode", "realtime",
         "--fps", "0", "--sticky", "0.25", "--record", str(path), "--frames", "tcp://127.0.0.1:0",
         "--control", "tcp://127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 60_000):
            time.sleep(0.05)
        assert path.exists(), "emulator never wrote its recording"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    rec = read_recording(path)
    assert rec.end is None, "a killed writer cannot have written its End record"
    assert len(rec.steps) > 100
    result = verify_replay(path)
    assert result.ok, result.detail
    assert result.frames_checked == len(rec.steps) + len(rec.resets)


def test_torn_tail_is_ignored(tmp_path):
    path = tmp_path / "r.narec"
    rec = record_headless(GameSettings(game="ALE/Pong-v5"), 50, path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # cut the End record mid-way
    torn = read_recording(path)
    assert torn.truncated and torn.end is None and len(torn.steps) == len(rec.steps)
    assert verify_replay(path).ok


def test_triggers_map_frames_to_trs_and_bids_events(tmp_path):
    path = tmp_path / "sub-01_task-pong_run-1_gamelog.narec"
    rec = record_headless(GameSettings(game="ALE/Pong-v5"), 150, path, tr_s=2.0)
    per_tr = rec.frames_per_tr()
    # 150 steps at 15 Hz = 10 s: triggers at 0, 2, …, 10 s. TR 0 holds the reset frame and steps
    # 1-29; a frame shown exactly at a trigger belongs to the TR that trigger starts.
    assert len(rec.triggers) == 6
    assert [len(x) for x in per_tr] == [30, 30, 30, 30, 30, 1]
    assert per_tr[1][0] == 30 and per_tr[1][-1] == 59
    events = tmp_path / "sub-01_task-pong_run-1_events.tsv"
    write_bids_events(rec, events)
    header, row = events.read_text().splitlines()
    assert header.split("\t") == ["onset", "duration", "trial_type", "stim_file", "game"]
    assert row.split("\t")[3] == path.name


@pytest.mark.slow
def test_game_step_makes_the_frames_of_gymnasium_step():
    """GameEnv.step drives the ALE directly; it must produce what the registered env produces."""
    import gymnasium as gym
    import numpy as np

    from services.plumbing.game import GameEnv, frame_hash

    settings = GameSettings(game="ALE/Breakout-v5", seed=5, repeat_action_probability=0.25)
    ours = GameEnv(settings)
    ours.reset()
    ref = gym.make(settings.game, frameskip=settings.frameskip, obs_type="rgb",
                   repeat_action_probability=settings.repeat_action_probability)
    ref.reset(seed=settings.seed)
    rng = np.random.default_rng(0)
    for _ in range(600):
        a = int(rng.integers(ours.n_actions))
        pixels, reward, term, trunc = ours.step(a)
        ref_pixels, ref_reward, ref_term, ref_trunc, _ = ref.step(a)
        assert frame_hash(pixels) == frame_hash(ref_pixels)
        assert (reward, term, trunc) == (float(ref_reward), ref_term, ref_trunc)
        if term or trunc:
            ours.reset()
            ref.reset()
    ref.close()
    ours.close()


@pytest.mark.slow
def test_recordings_hashed_with_xxh3_still_verify(tmp_path):
    """Frame hashes are xxh64 since the header names its algorithm; earlier files say nothing
    (xxh3_128 by default) and must keep verifying, diverging ones keep failing."""
    from services.plumbing.game import GameEnv, settings_from_header
    from services.plumbing.recording import Header, Reset, RecordingWriter, iter_records

    path = tmp_path / "new.narec"
    rec = record_headless(GameSettings(game="ALE/Pong-v5", seed=2, repeat_action_probability=0.25), 150, path)
    assert rec.header.frame_hash_algo == "xxh64" and len(rec.steps[0].frame_hash) == 16

    def rewrite_as_xxh3(out, corrupt_seq=None):
        records = list(iter_records(path))
        header = records[0]
        fields = {f: getattr(header, f) for f in header.__struct_fields__ if f != "frame_hash_algo"}
        game = GameEnv(settings_from_header(header), "xxh3_128")
        with RecordingWriter(out, Header(**fields)) as w:  # default algo, as older files decode
            for r in records[1:]:
                if isinstance(r, (Reset, Step)):
                    pixels = game.reset()[0] if isinstance(r, Reset) else game.step(r.action)[0]
                    r.frame_hash = "0" * 32 if r.seq == corrupt_seq else game.hash(pixels)
                w.write(r)
        game.close()

    rewrite_as_xxh3(tmp_path / "old.narec")
    old = read_recording(tmp_path / "old.narec")
    assert old.header.frame_hash_algo == "xxh3_128" and len(old.steps[0].frame_hash) == 32
    result = verify_replay(tmp_path / "old.narec")
    assert result.ok, result.detail
    rewrite_as_xxh3(tmp_path / "bad.narec", corrupt_seq=77)
    result = verify_replay(tmp_path / "bad.narec")
    assert not result.ok and result.first_mismatch_seq == 77


def test_unknown_frame_hash_is_a_clear_error():
    from services.plumbing.game import GameEnv

    with pytest.raises(ValueError, match="unknown frame hash 'md5'"):
        GameEnv(GameSettings(), "md5")
