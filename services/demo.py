"""The built-in demo loop: emulator + a scripted controller + an observer, all on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .client import GameClient
from .emulator import BuiltinController, Emulator, EmulatorConfig, verify_replay
from .game import GameSettings
from .transport import free_tcp_endpoint


def _play(client: GameClient, stop: threading.Event, seed: int) -> None:
    welcome = client.join(timeout_s=10)
    choose = BuiltinController("random", len(welcome.action_meanings), seed=seed)
    last = -1
    while not stop.is_set():
        frame = client.next_frame(200)
        if frame is None or frame.seq == last:
            continue
        last = frame.seq
        client.act(frame, choose())
    client.close()


def run_builtin_demo(game: str, seconds: float, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"demo-{time.strftime('%Y%m%dT%H%M%S')}.narec"
    cfg = EmulatorConfig(game=GameSettings(game=game), mode="realtime", frames_endpoint=free_tcp_endpoint(),
                         control_endpoint=free_tcp_endpoint(), record_path=str(record), duration_s=seconds)
    emu = Emulator(cfg)
    stop = threading.Event()
    clients = [GameClient(cid, role=role, frames_endpoint=cfg.frames_endpoint, control_endpoint=cfg.control_endpoint)
               for cid, role in (("scripted-controller", "controller"), ("random-observer", "observer"))]
    threads = [threading.Thread(target=_play, args=(c, stop, i), daemon=True) for i, c in enumerate(clients)]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=emu.run()), daemon=True)
    runner.start()
    emu.ready.wait(10)
    for t in threads:
        t.start()
    runner.join()
    stop.set()
    for t in threads:
        t.join(5)
    s = result["summary"]
    verified = verify_replay(record)
    clients_out = dict(s.clients)
    for c in clients:
        clients_out.setdefault(c.client_id, {"role": c.role, "actions": 0, "rt_p50_ms": None, "rt_p99_ms": None})
        clients_out[c.client_id]["frames_skipped"] = c.stats.frames_skipped
    return {
        "game": game, "seconds": seconds, "steps": s.steps, "episodes": s.episodes, "rejected": s.counters.rejected,
        "recording": str(record), "replay_verified": verified.ok, "clients": clients_out,
    }
