"""Transport benchmark: our protocol vs raw pyzmq, our emulator vs a raw ALE loop, same run.

1. Round trip frame → client → action, 210×160×3 frame, two processes, PUB→SUB then
   DEALER→ROUTER (the emulator's topology). Ours: typed Frame encoded with the codec, decoded and
   validated by the client, typed Action back, decoded and validated by the server. Floor: the
   same sockets carrying the same bytes with no encoding or validation. The two are interleaved
   in blocks so drift on a shared machine hits both alike.
2. Publish rate: the emulator service unthrottled (realtime, fps=0, recording on, one
   subscriber) vs a bare ALE loop of frameskip × act() + getScreenRGB() on the same game.

Prints a table, then one JSON line: rt_p50_ratio, rt_p99_ratio, publish_ratio and the raw figures.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import tempfile
import time

import numpy as np
import zmq

RAW_TOPIC = b"raw"


def _client(frames_ep: str, control_ep: str, n_total: int) -> None:
    from protocols import Action, Decoder, Frame
    from services.transport import Channel, make_socket

    ctx = zmq.Context()
    sub = make_socket(ctx, zmq.SUB, hwm=1000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(frames_ep)
    dealer = make_socket(ctx, zmq.DEALER, hwm=1000)
    dealer.connect(control_ep)
    out = Channel(dealer)
    dec = Decoder([Frame])
    raw_reply = b"\x01"
    dealer.send(b"ready")
    done = 0
    while done < n_total:
        topic, *parts = sub.recv_multipart(copy=False)
        if topic.bytes == b"ping":  # slow-joiner handshake, not timed
            dealer.send(b"pong")
            continue
        done += 1
        if topic.bytes == RAW_TOPIC:
            dealer.send(raw_reply)
        else:
            frame = dec.decode(parts)
            out.send(Action(agent_id="bench", frame_seq=frame.seq, action=1))
    ctx.destroy(linger=1000)


def round_trip(frames: int, block: int = 250) -> dict:
    from protocols import Action, Decoder
    from services.transport import TOPIC_FRAME, Channel, free_tcp_endpoint, make_socket

    frames_ep, control_ep = free_tcp_endpoint(), free_tcp_endpoint()
    ctx = zmq.Context()
    pub = make_socket(ctx, zmq.PUB, hwm=1000)
    pub.bind(frames_ep)
    router = make_socket(ctx, zmq.ROUTER, hwm=1000)
    router.bind(control_ep)
    warm = 200
    n_total = 2 * (frames + warm)
    proc = mp.get_context("spawn").Process(target=_client, args=(frames_ep, control_ep, n_total), daemon=True)
    proc.start()
    router.recv_multipart()  # client connected its DEALER
    # slow joiner: publish until the SUB is connected
    while True:
        pub.send_multipart([b"ping"])
        if router.poll(0):
            break
        time.sleep(0.01)
        if not proc.is_alive():
            raise RuntimeError("benchmark client died")
    pixels = np.random.default_rng(0).integers(0, 256, (210, 160, 3), dtype=np.uint8)
    chan = Channel(pub)
    dec = Decoder([Action])
    ours_ns, raw_ns = [], []
    raw_header = chan.encoder.encode(_frame(0, pixels))[0]
    seq = 0
    time.sleep(0.2)  # discard the pongs of the handshake
    while router.poll(0):
        router.recv_multipart()
    done_ours = done_raw = 0
    while done_ours < frames + warm or done_raw < frames + warm:
        for _ in range(block):
            if done_raw >= frames + warm:
                break
            t0 = time.perf_counter_ns()
            pub.send_multipart([RAW_TOPIC, raw_header, pixels], copy=False)
            router.recv_multipart(copy=False)
            raw_ns.append(time.perf_counter_ns() - t0)
            done_raw += 1
        for _ in range(block):
            if done_ours >= frames + warm:
                break
            seq += 1
            t0 = time.perf_counter_ns()
            chan.send(_frame(seq, pixels), topic=TOPIC_FRAME)
            parts = router.recv_multipart(copy=False)
            action = dec.decode(parts[1:])
            ours_ns.append(time.perf_counter_ns() - t0)
            assert action.frame_seq == seq
            done_ours += 1
    proc.join(10)
    ctx.destroy(linger=0)
    ours = np.array(ours_ns[warm:]) / 1e3
    raw = np.array(raw_ns[warm:]) / 1e3
    return {
        "rt_ours_p50_us": float(np.percentile(ours, 50)), "rt_ours_p99_us": float(np.percentile(ours, 99)),
        "rt_raw_p50_us": float(np.percentile(raw, 50)), "rt_raw_p99_us": float(np.percentile(raw, 99)),
    }


def _frame(seq: int, pixels: np.ndarray):
    from protocols import Frame

    now = time.monotonic_ns()
    return Frame(session_id="bench", seq=seq, episode=0, step=seq, action=0, controller="bench", reward=0.0,
                 terminated=False, truncated=False, t_ns=now, wall_ns=time.time_ns(), pixels=pixels,
                 frame_hash="0" * 32)


def _subscriber(frames_ep: str, stop_after_s: float) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"frame")
    sub.connect(frames_ep)
    t_end = time.monotonic() + stop_after_s
    while time.monotonic() < t_end:
        if sub.poll(100):
            sub.recv_multipart(copy=False)
    ctx.destroy(linger=0)


def publish_rate(game: str, seconds: float) -> dict:
    from services.emulator import Emulator, EmulatorConfig
    from services.game import GameEnv, GameSettings
    from services.transport import free_tcp_endpoint

    settings = GameSettings(game=game, repeat_action_probability=0.0)
    # floor: bare ALE, same game and frameskip, random actions, reset on game over
    env = GameEnv(settings)
    env.reset()
    ale = env.unwrapped.ale
    actions = env.unwrapped._action_set
    rng = np.random.default_rng(0)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = actions[int(rng.integers(len(actions)))]
        for _ in range(settings.frameskip):
            ale.act(a)
        ale.getScreenRGB()
        if ale.game_over():
            ale.reset_game()
        n += 1
    raw_rate = n / (time.perf_counter() - t0)
    env.close()

    with tempfile.TemporaryDirectory() as tmp:
        frames_ep = free_tcp_endpoint()
        sub = mp.get_context("spawn").Process(target=_subscriber, args=(frames_ep, seconds + 10), daemon=True)
        cfg = EmulatorConfig(game=settings, mode="realtime", fps=0, frames_endpoint=frames_ep,
                             control_endpoint=free_tcp_endpoint(), record_path=f"{tmp}/bench.narec",
                             duration_s=seconds)
        emu = Emulator(cfg)
        sub.start()
        time.sleep(1.0)  # let the subscriber process start before timing
        summary = emu.run()
        sub.terminate()
    ours_rate = summary.steps / summary.duration_s
    return {"publish_raw_steps_per_s": raw_rate, "publish_ours_steps_per_s": ours_rate}


def main(frames: int = 3000, publish_seconds: float = 3.0, game: str = "ALE/Pong-v5") -> dict:
    from rich.console import Console
    from rich.table import Table

    rt = round_trip(frames)
    pr = publish_rate(game, publish_seconds)
    result = {
        **rt, **pr,
        "rt_p50_ratio": rt["rt_ours_p50_us"] / rt["rt_raw_p50_us"],
        "rt_p99_ratio": rt["rt_ours_p99_us"] / rt["rt_raw_p99_us"],
        "publish_ratio": pr["publish_ours_steps_per_s"] / pr["publish_raw_steps_per_s"],
        "frames": frames, "game": game, "machine": f"{platform.node()} {platform.machine()} "
                                                   f"{mp.cpu_count()} cpus, python {platform.python_version()}",
    }
    table = Table(title="transport: ours vs floor (same run)")
    for col in ("measure", "ours", "floor", "ratio"):
        table.add_column(col)
    table.add_row("round trip p50 (µs)", f"{rt['rt_ours_p50_us']:.1f}", f"{rt['rt_raw_p50_us']:.1f}",
                  f"{result['rt_p50_ratio']:.3f}")
    table.add_row("round trip p99 (µs)", f"{rt['rt_ours_p99_us']:.1f}", f"{rt['rt_raw_p99_us']:.1f}",
                  f"{result['rt_p99_ratio']:.3f}")
    table.add_row(f"publish rate {game} (steps/s)", f"{pr['publish_ours_steps_per_s']:.0f}",
                  f"{pr['publish_raw_steps_per_s']:.0f}", f"{result['publish_ratio']:.3f}")
    Console(stderr=True).print(table)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
