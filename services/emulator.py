"""The emulator service: steps an ALE game, publishes frames, takes actions, records the session.

Sockets (PROTOCOL.md): a PUB socket fans frames out to any number of subscribers (each drops at
its own high-water mark, so a slow one never stalls the loop or the others); a ROUTER socket
takes Hello / Heartbeat / Action / Trigger / Bye from DEALER clients and answers Welcome,
Heartbeat and Error. One client is the controller (its actions are applied); the rest are
observers (their actions are logged). Everything is timed on this process's monotonic clock.

Modes:
- ``realtime``: steps at ``fps`` (60 / frameskip) holding the controller's last action;
  ``fps=0`` runs unthrottled (benchmarks).
- ``lockstep``: publishes a frame and waits for the controller's action on it; after
  ``step_timeout_s`` the ``on_timeout`` policy applies (repeat last action, noop, or keep
  waiting). The pending frame is re-published every ``resend_s`` so late joiners get it.
- ``replay``: re-runs a recording's actions at its recorded pace (``speed`` × real time, 0 =
  as fast as possible), checking every frame hash; clients only observe.
"""

from __future__ import annotations

import logging
import os
from collections import deque
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from protocols import (
    TRIGGER_MAX_AGE_S, Action, Bye, Error, ErrorCode, Frame, Heartbeat, Hello, ProtocolError, Status, Trigger,
    Welcome,
)

from services.plumbing.game import (
    FRAME_HASH, GameEnv, GameSettings, check_replay_compatible, new_session_id, replay_headless, settings_from_header,
)
from services.plumbing.security import CurveConfig, ServerSecurity
from services.plumbing.recording import ActionLog, End, Recording, RecordingWriter, Reset, Step, TriggerMark, read_recording
from services.plumbing.transport import (
    DEFAULT_CONTROL, DEFAULT_FRAMES, TOPIC_FRAME, TOPIC_HEARTBEAT, TOPIC_TRIGGER, Channel, Counters, make_socket,
)

log = logging.getLogger("neuroarcade.emulator")

MODES = ("realtime", "lockstep", "replay")
TIMEOUT_POLICIES = ("repeat", "noop", "wait")
# Messages handled per poll wake-up: a flood can delay a step by at most this much work.
MAX_MESSAGES_PER_WAKE = 256
# Unpaced stepping looks at the control socket at most this often: a check per step would cost a
# few percent of an unthrottled run, and an action applies ≤ 1 ms later there (a few steps at most).
UNPACED_CONTROL_CHECK_NS = 1_000_000
# Plain ints: combining pyzmq's enum flags runs Python enum code on every unthrottled step.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# Per-client latency samples kept for percentiles (bounded: sessions can run for hours).
STATS_WINDOW = 10_000


@dataclass
class EmulatorConfig:
    """Settings of one emulator session."""

    game: GameSettings = field(default_factory=GameSettings)
    """Game, seed, frameskip, sticky actions (ignored in replay: taken from the recording)."""
    mode: str = "realtime"
    """``realtime``, ``lockstep`` or ``replay``."""
    frames_endpoint: str = DEFAULT_FRAMES
    """PUB endpoint frames are published on (bind)."""
    control_endpoint: str = DEFAULT_CONTROL
    """ROUTER endpoint clients send Hello/Action/Heartbeat/Trigger to (bind)."""
    fps: float | None = None
    """Steps per second in realtime mode; None = 60 / frameskip; 0 = unthrottled."""
    controller: str = ""
    """Client id reserved as controller; '' = first client that asks for the role."""
    step_timeout_s: float = 5.0
    """Lockstep: how long to wait for the controller's action before ``on_timeout`` applies."""
    on_timeout: str = "repeat"
    """Lockstep timeout policy: ``repeat`` the last action, ``noop`` (action 0), or ``wait``."""
    resend_s: float = 0.25
    """Lockstep: re-publish the pending frame this often while waiting."""
    wait_for_controller_s: float | None = None
    """Lockstep: how long to wait for a controller before the first frame (None = forever)."""
    wait_for_clients: int = 0
    """Before the first frame, wait until this many clients said Hello (e.g. the agents of a replay)."""
    wait_for_clients_s: float = 120.0
    """How long to wait for them before starting anyway."""
    replay_path: str = ""
    """Replay mode: the recording to play back."""
    speed: float = 1.0
    """Replay pace: 1 = recorded pace, 2 = twice as fast, 0 = as fast as possible."""
    record_path: str = ""
    """Where to record the session ('' = runs/<session_id>.narec)."""
    max_steps: int | None = None
    """Stop after this many steps (None = no limit)."""
    duration_s: float | None = None
    """Stop after this many seconds from the first frame (None = no limit)."""
    max_episodes: int | None = None
    """Stop after this many finished episodes."""
    heartbeat_s: float = 1.0
    """Clients must beat this often; a client silent for 3 beats is dropped (frees the controller)."""
    status_s: float = 1.0
    """Publish a Status message this often."""
    hwm: int = 64
    """High-water mark of the frame PUB socket (frames a slow subscriber may lag before drops)."""
    meta: dict[str, str] = field(default_factory=dict)
    """Labels stored in the recording header (subject, session, task, run …)."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE keys; required when an endpoint is not loopback."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (None = off; 0 = any free port)."""
    pooled_gray: bool = True
    """Publish ``Frame.pooled_gray`` (what RL agents observe, as in training); False saves two ALE
    grayscale reads per step where no RL agent watches (RL agents then fall back, with a warning)."""


@dataclass
class _Client:
    client_id: str
    role: str
    last_seen_ns: int
    actions: int = 0
    rt_ns: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    """Frame publication → action receipt, on the emulator clock (recent window)."""
    staleness: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    """Frames published after the one acted on, when the action arrived (recent window)."""


@dataclass
class EmulatorSummary:
    session_id: str
    mode: str
    steps: int
    episodes: int
    frames_published: int
    record_path: str
    counters: Counters
    reason: str
    duration_s: float
    hash_mismatches: int = 0
    first_mismatch_seq: int | None = None
    clients: dict[str, dict] = field(default_factory=dict)


class Emulator:
    """One session of the emulator service. ``run()`` blocks until the session ends."""

    def __init__(self, config: EmulatorConfig, ctx: zmq.Context | None = None):
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {config.mode!r}")
        if config.on_timeout not in TIMEOUT_POLICIES:
            raise ValueError(f"on_timeout must be one of {TIMEOUT_POLICIES}, not {config.on_timeout!r}")
        self.cfg = config
        self.source: Recording | None = None
        settings = config.game
        if config.mode == "replay":
            if not config.replay_path:
                raise ValueError("replay mode needs replay_path")
            self.source = read_recording(config.replay_path)
            settings = settings_from_header(self.source.header)
        self.game = GameEnv(settings, self.source.header.frame_hash_algo if self.source else FRAME_HASH,
                            pooled_gray=config.pooled_gray)
        if self.source is not None:
            check_replay_compatible(self.source, self.game)
        self.session_id = new_session_id()
        self.ctx = ctx or zmq.Context.instance()
        self.counters = Counters()
        self.clients: dict[bytes, _Client] = {}
        self.controller: bytes | None = None
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        """Set once the sockets are bound (tests and embedding code wait on it)."""
        self.seq = -1
        self.steps = 0
        self.frames_published = 0
        self._pending_logs: list[ActionLog] = []
        self._controller_action: tuple[int, int] | None = None  # (frame_seq, action) of the newest
        self._held_action = 0
        self._applied_frame_seq = -1  # realtime: frame_seq of the controller action applied last
        self._triggers = 0
        self._last_frame: Frame | None = None
        self._frame_times = np.zeros(4096, dtype=np.int64)  # emulator t_ns of recent frames, by seq
        self._mismatches = 0
        self._first_mismatch: int | None = None
        self._last_control_check = 0  # monotonic ns of the last unpaced look at the control socket

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> EmulatorSummary:
        cfg = self.cfg
        pub = make_socket(self.ctx, zmq.PUB, hwm=cfg.hwm)
        router = make_socket(self.ctx, zmq.ROUTER, hwm=1000)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        security = ServerSecurity(self.ctx, cfg.curve)
        try:
            security.bind(pub, cfg.frames_endpoint)
            security.bind(router, cfg.control_endpoint)
        except Exception:
            pub.close(0)
            router.close(0)
            security.close()
            raise
        self.frames = Channel(pub, counters=self.counters)
        self.control = Channel(router, counters=self.counters)
        record_path = cfg.record_path or str(Path("runs") / f"{self.session_id}.narec")
        header = self.game.header(cfg.mode, self.session_id,
                                  source_recording=str(cfg.replay_path) if self.source else "", meta=cfg.meta)
        self.writer = RecordingWriter(record_path, header)
        self.poller = zmq.Poller()
        self.poller.register(router, zmq.POLLIN)
        self.t_start = time.monotonic_ns()
        self._next_status = self.t_start
        if cfg.metrics_port is not None:
            from services.plumbing.metrics import serve_metrics

            self.metrics_server, _ = serve_metrics("emulator", self.snapshot, cfg.metrics_port)
            self.metrics_port = self.metrics_server.server_port
        self.ready.set()
        reason = "stopped"
        try:
            self._wait_for_clients(cfg.wait_for_clients, cfg.wait_for_clients_s)
            self.t_start = time.monotonic_ns()  # re-stamped at the first frame (see _publish)
            if cfg.mode == "lockstep" and not self._wait_for_controller():
                reason = "no controller"
            else:
                reason = {"realtime": self._run_realtime, "lockstep": self._run_lockstep,
                          "replay": self._run_replay}[cfg.mode]()
        finally:
            t_end = time.monotonic_ns()  # the session's end; closing sockets and files is not part of it
            self.writer.write(End(t_ns=t_end, reason=reason, steps=self.steps))
            self.writer.close()
            self._publish_status()
            pub.close()
            router.close()
            security.close()
            self.game.close()
            if getattr(self, "metrics_server", None) is not None:
                self.metrics_server.shutdown()
        return EmulatorSummary(
            session_id=self.session_id, mode=cfg.mode, steps=self.steps, episodes=self.game.episode + 1,
            frames_published=self.frames_published, record_path=record_path, counters=self.counters,
            reason=reason, duration_s=(t_end - self.t_start) / 1e9,
            hash_mismatches=self._mismatches, first_mismatch_seq=self._first_mismatch,
            clients={c.client_id: _client_stats(c) for c in self.clients.values()},
        )

    def snapshot(self) -> dict:
        """Counters and gauges for metrics (read from another thread: copies only)."""
        c = self.counters
        clients = list(self.clients.values())
        stats = {cl.client_id: _client_stats(cl) for cl in clients}
        return {
            "counters": {
                "messages_received": c.received, "messages_sent": c.sent,
                "messages_rejected": dict(c.rejected_by_code), "steps": self.steps,
                "frames_published": self.frames_published, "triggers": self._triggers,
                "client_actions": {k: v["actions"] for k, v in stats.items()},
            },
            "gauges": {
                "clients": len(clients), "frame_seq": self.seq,
                "round_trip_p50_ms": {k: v["rt_p50_ms"] for k, v in stats.items()},
                "round_trip_p99_ms": {k: v["rt_p99_ms"] for k, v in stats.items()},
                "staleness_frames_mean": {k: v["staleness_mean"] for k, v in stats.items()},
            },
            "labels": {"messages_rejected": "code", "client_actions": "client", "round_trip_p50_ms": "client",
                       "round_trip_p99_ms": "client", "staleness_frames_mean": "client"},
        }

    def _should_stop(self) -> str | None:
        cfg = self.cfg
        if self.stop_event.is_set():
            return "stopped"
        if cfg.max_steps is not None and self.steps >= cfg.max_steps:
            return "max_steps"
        if cfg.duration_s is not None and time.monotonic_ns() - self.t_start >= cfg.duration_s * 1e9:
            return "duration"
        if cfg.max_episodes is not None and self.game.episode >= cfg.max_episodes:
            return "max_episodes"
        return None

    # --- the three modes -------------------------------------------------------------------

    def _run_realtime(self) -> str:
        fps = self.cfg.fps if self.cfg.fps is not None else 60.0 / self.game.settings.frameskip
        period_ns = int(1e9 / fps) if fps > 0 else 0
        self._reset_and_publish()
        next_tick = time.monotonic_ns() + period_ns
        while (reason := self._should_stop()) is None:
            self._serve_until(next_tick)
            action, who = self._held_action, "hold"
            fresh = self._controller_action
            if fresh is not None and fresh[0] != self._applied_frame_seq:
                action, who = fresh[1], self._controller_name()
                self._applied_frame_seq = fresh[0]
            self._step_and_publish(action, who)
            next_tick += period_ns
            now = time.monotonic_ns()
            if now > next_tick + period_ns:  # fell behind (GC, load): re-anchor, never burst
                next_tick = now
        return reason

    def _run_lockstep(self) -> str:
        cfg = self.cfg
        self._reset_and_publish()
        while (reason := self._should_stop()) is None:
            waited_from = time.monotonic_ns()
            last_send = waited_from
            action, who = None, ""
            while action is None and not self.stop_event.is_set():
                now = time.monotonic_ns()
                deadline = min(last_send + int(cfg.resend_s * 1e9), waited_from + int(cfg.step_timeout_s * 1e9))
                self._serve_until(deadline, until_action_for=self.seq)
                ca = self._controller_action
                if ca is not None and ca[0] == self.seq:
                    action, who = ca[1], self._controller_name()
                    break
                now = time.monotonic_ns()
                if now - waited_from >= cfg.step_timeout_s * 1e9 and cfg.on_timeout != "wait":
                    action = self._held_action if cfg.on_timeout == "repeat" else 0
                    who = "timeout"
                    break
                if now - last_send >= cfg.resend_s * 1e9 and self._last_frame is not None:
                    self.frames.send(self._last_frame, topic=TOPIC_FRAME)
                    last_send = now
            if action is None:
                return "stopped"
            self._step_and_publish(action, who)
        return reason

    def _run_replay(self) -> str:
        """Re-run the recording's actions, re-emitting its scanner triggers at the same game time.

        Triggers go out on the frames PUB (topic ``trigger``) and into this session's recording, so
        downstream (scanner follower, encoder) sees the replay exactly as the original session.
        """
        assert self.source is not None
        src = self.source
        speed = self.cfg.speed
        events: list[tuple[int, int, str, object]] = []  # (t_ns, order, kind, record)
        events += [(r.t_ns, 1, "reset", r) for r in src.resets]
        events += [(s.t_ns, 1, "step", s) for s in src.steps]
        events += [(t.t_ns, 0, "trigger", t) for t in src.triggers]  # a trigger precedes a frame at the same time
        events.sort(key=lambda e: (e[0], e[1], getattr(e[3], "seq", 0)))
        if not any(kind != "trigger" for _, _, kind, _ in events):
            return "empty recording"
        t0_rec = events[0][0]
        t0 = time.monotonic_ns()
        for t_rec, _, kind, rec in events:
            if (reason := self._should_stop()) is not None:
                return reason
            self._serve_until(t0 + int((t_rec - t0_rec) / speed) if speed > 0 else time.monotonic_ns())
            if kind == "trigger":
                self._emit_trigger(rec.tr_index, source="replay")
                continue
            h = self._reset_and_publish() if kind == "reset" else self._step_and_publish(rec.action, "recorded")
            if h != rec.frame_hash:
                self._mismatches += 1
                if self._first_mismatch is None:
                    self._first_mismatch = rec.seq
                    log.error("replay diverged at seq %d: %s != recorded %s", rec.seq, h, rec.frame_hash)
        return "end of recording" if src.complete else "end of truncated recording"

    def _emit_trigger(self, tr_index: int, source: str, t_ns: int | None = None) -> None:
        now = time.monotonic_ns() if t_ns is None else t_ns
        self._triggers += 1
        self.writer.write(TriggerMark(tr_index=tr_index, t_ns=now, source=source))
        try:
            self.frames.send(Trigger(tr_index=tr_index, t_ns=now, source=source), topic=TOPIC_TRIGGER,
                             flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # --- stepping --------------------------------------------------------------------------

    def _reset_and_publish(self) -> str:
        pixels, seed = self.game.reset()
        self.seq += 1
        h = self.game.hash(pixels)
        t_ns = time.monotonic_ns()
        self.writer.write(Reset(seq=self.seq, episode=self.game.episode, seed=seed, t_ns=t_ns, frame_hash=h))
        self._publish(pixels, h, action=-1, who="", reward=0.0, terminated=False, truncated=False, t_ns=t_ns,
                      wall_ns=time.time_ns())
        return h

    def _step_and_publish(self, action: int, who: str) -> str:
        pixels, reward, terminated, truncated = self.game.step(action)
        self._held_action = action
        self.seq += 1
        self.steps += 1
        h = self.game.hash(pixels)
        t_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        logs, self._pending_logs = self._pending_logs, []
        self.writer.write(Step(
            seq=self.seq, episode=self.game.episode, step=self.game.step_in_episode, action=action,
            controller=who, t_ns=t_ns, wall_ns=wall_ns, frame_hash=h, reward=reward,
            terminated=terminated, truncated=truncated, actions=logs,
        ))
        self._publish(pixels, h, action=action, who=who, reward=reward, terminated=terminated,
                      truncated=truncated, t_ns=t_ns, wall_ns=wall_ns)
        if terminated or truncated:
            self._reset_and_publish()
        return h

    def _publish(self, pixels: np.ndarray, h: str, *, action: int, who: str, reward: float,
                 terminated: bool, truncated: bool, t_ns: int, wall_ns: int) -> None:
        frame = Frame(
            session_id=self.session_id, seq=self.seq, episode=self.game.episode, step=self.game.step_in_episode,
            action=action, controller=who, reward=reward, terminated=terminated, truncated=truncated,
            t_ns=t_ns, wall_ns=wall_ns, pixels=pixels, frame_hash=h, pooled_gray=self.game.pooled_gray,
        )
        self.frames.send(frame, topic=TOPIC_FRAME)
        if self.frames_published == 0:  # durations count from the first frame, not from loading the ROM
            self.t_start = t_ns
        self._frame_times[self.seq % len(self._frame_times)] = t_ns
        self._last_frame = frame
        self.frames_published += 1

    # --- control socket --------------------------------------------------------------------

    def _serve_until(self, deadline_ns: int, until_action_for: int | None = None) -> None:
        """Handle control messages until the deadline (or the awaited action arrives)."""
        while True:
            now = time.monotonic_ns()
            if now >= self._next_status:
                self._publish_status()
                self._expire_clients(now)
            timeout_ms = max(0, (deadline_ns - now)) / 1e6
            if timeout_ms == 0:  # unpaced (fps=0, fast replay, behind schedule): a cheap check, no poll
                if now - self._last_control_check < UNPACED_CONTROL_CHECK_NS:
                    return
                self._last_control_check = now
                if not self.control.sock.getsockopt(_EVENTS) & _POLLIN:
                    return
            elif not self.poller.poll(timeout_ms):
                if time.monotonic_ns() >= deadline_ns:
                    return
                continue
            for _ in range(MAX_MESSAGES_PER_WAKE):
                try:
                    parts = self.control.recv_parts(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(parts)
            if until_action_for is not None and self._controller_action is not None \
                    and self._controller_action[0] == until_action_for:
                return
            if time.monotonic_ns() >= deadline_ns:
                return

    def _handle(self, parts: list) -> None:
        identity = parts[0].bytes
        try:
            msg = self.control.decoder.decode(parts[1:])
        except ProtocolError as err:
            self.counters.reject(err)
            log.debug("rejected from %r: %s", identity, err)
            self._reply_error(identity, err)
            return
        self.counters.received += 1
        now = time.monotonic_ns()
        client = self.clients.get(identity)
        if client is not None:
            client.last_seen_ns = now
        if isinstance(msg, Hello):
            self._on_hello(identity, msg, now)
        elif isinstance(msg, Heartbeat):
            # member=False tells a client dropped while it was frozen (or a probe) that it is not joined
            self._reply(identity, Heartbeat(sender="emulator", seq=msg.seq, t_ns=now, member=client is not None))
        elif isinstance(msg, Action):
            self._on_action(identity, client, msg, now)
        elif isinstance(msg, Trigger):
            # host_clock: stamped on this host where the pulse arrived (dashboard, serial reader): kept if plausible
            stamped = msg.host_clock and now - int(TRIGGER_MAX_AGE_S * 1e9) <= msg.t_ns <= now
            self._emit_trigger(msg.tr_index, source=msg.source or (client.client_id if client else ""),
                               t_ns=msg.t_ns if stamped else now)
        elif isinstance(msg, Bye):
            self._drop(identity)
        else:
            self._reject(identity, ProtocolError(ErrorCode.NOT_ALLOWED,
                                                 f"{type(msg).__name__} is not accepted by the emulator"))

    def _on_hello(self, identity: bytes, msg: Hello, now: int) -> None:
        role = "observer"
        reserved = self.cfg.controller
        if msg.role == "controller" and self.cfg.mode != "replay" and reserved in ("", msg.client_id):
            current = self.clients.get(self.controller) if self.controller is not None else None
            if current is None or current.client_id == msg.client_id:
                role = "controller"
        # a client re-saying Hello under a new identity (it restarted) replaces its old entry
        for ident, c in list(self.clients.items()):
            if c.client_id == msg.client_id and ident != identity:
                self._drop(ident)
        self.clients[identity] = _Client(msg.client_id, role, now)
        if role == "controller":
            self.controller = identity
            self._controller_action = None
        g = self.game
        fps = self.cfg.fps if self.cfg.fps is not None else 60.0 / g.settings.frameskip
        self._reply(identity, Welcome(
            session_id=self.session_id, client_id=msg.client_id, role=role, mode=self.cfg.mode,
            game=g.settings.game, action_meanings=g.action_meanings,
            frame_shape=list(g.env.observation_space.shape), frameskip=g.settings.frameskip,
            repeat_action_probability=g.settings.repeat_action_probability, step_hz=float(fps),
            heartbeat_s=self.cfg.heartbeat_s, last_seq=self.seq, t_ns=now, frame_hash_algo=g.frame_hash_algo,
        ))
        log.info("client %s joined as %s", msg.client_id, role)

    def _on_action(self, identity: bytes, client: _Client | None, msg: Action, now: int) -> None:
        if client is None:
            self._reject(identity, ProtocolError(ErrorCode.NOT_ALLOWED, "send Hello before actions", "action"))
            return
        if not 0 <= msg.action < self.game.n_actions:
            self._reject(identity, ProtocolError(
                ErrorCode.ILLEGAL_ACTION, f"action {msg.action} outside 0..{self.game.n_actions - 1}", "action"))
            return
        if msg.frame_seq > self.seq or msg.frame_seq < 0:
            self._reject(identity, ProtocolError(
                ErrorCode.BAD_HEADER, f"frame_seq {msg.frame_seq} was never published (newest {self.seq})", "action"))
            return
        client.actions += 1
        client.staleness.append(self.seq - msg.frame_seq)
        t_frame = self._frame_t_ns(msg.frame_seq)
        if t_frame is not None:
            client.rt_ns.append(now - t_frame)
        self._pending_logs.append(ActionLog(agent_id=client.client_id, role=client.role, frame_seq=msg.frame_seq,
                                            action=msg.action, t_recv_ns=now, condition=msg.condition))
        if identity == self.controller:
            if self._controller_action is None or msg.frame_seq >= self._controller_action[0]:
                self._controller_action = (msg.frame_seq, msg.action)

    def _frame_t_ns(self, seq: int) -> int | None:
        if 0 <= self.seq - seq < len(self._frame_times):
            return int(self._frame_times[seq % len(self._frame_times)])
        return None

    def _controller_name(self) -> str:
        c = self.clients.get(self.controller) if self.controller is not None else None
        return c.client_id if c else "hold"

    def _wait_for_controller(self) -> bool:
        limit = self.cfg.wait_for_controller_s
        t_end = time.monotonic_ns() + int(limit * 1e9) if limit is not None else None
        while self.controller is None and not self.stop_event.is_set():
            if t_end is not None and time.monotonic_ns() >= t_end:
                return False
            self._serve_until(time.monotonic_ns() + 100_000_000)
        return self.controller is not None

    def _wait_for_clients(self, n: int, limit_s: float) -> None:
        t_end = time.monotonic_ns() + int(limit_s * 1e9)
        while len(self.clients) < n and not self.stop_event.is_set() and time.monotonic_ns() < t_end:
            self._serve_until(time.monotonic_ns() + 50_000_000)
        if len(self.clients) < n:
            log.warning("starting with %d of %d clients", len(self.clients), n)

    def _expire_clients(self, now: int) -> None:
        limit = int(3 * self.cfg.heartbeat_s * 1e9)
        for ident, c in list(self.clients.items()):
            if now - c.last_seen_ns > limit:
                log.warning("client %s silent for %.1f s: dropped", c.client_id, (now - c.last_seen_ns) / 1e9)
                self._drop(ident)

    def _drop(self, identity: bytes) -> None:
        self.clients.pop(identity, None)
        if identity == self.controller:
            self.controller = None
            self._controller_action = None

    def _reply(self, identity: bytes, msg) -> None:
        try:
            self.control.send(msg, identity=identity, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone or its queue full: replies are best effort
            pass

    def _reply_error(self, identity: bytes, err: ProtocolError) -> None:
        self._reply(identity, Error(code=err.code, detail=err.detail[:500], ref_kind=err.ref_kind))

    def _reject(self, identity: bytes, err: ProtocolError) -> None:
        self.counters.reject(err)
        self._reply_error(identity, err)

    def _publish_status(self) -> None:
        now = time.monotonic_ns()
        self._next_status = now + int(self.cfg.status_s * 1e9)
        c = self.counters
        status = Status(
            service="emulator", session_id=self.session_id, t_ns=now, seq=self.seq, steps=self.steps,
            received=c.received, sent=c.sent, rejected=c.rejected, rejected_by_code=dict(c.rejected_by_code),
            clients={cl.client_id: cl.role for cl in self.clients.values()}, triggers=self._triggers,
        )
        try:
            self.frames.send(status, topic=TOPIC_HEARTBEAT, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def _client_stats(c: _Client) -> dict:
    rt = np.array(c.rt_ns, dtype=np.float64) / 1e6
    st = np.array(c.staleness, dtype=np.float64)
    return {
        "role": c.role, "actions": c.actions,
        "rt_p50_ms": float(np.percentile(rt, 50)) if rt.size else None,
        "rt_p99_ms": float(np.percentile(rt, 99)) if rt.size else None,
        "staleness_mean": float(st.mean()) if st.size else None,
    }


# --- headless work (no sockets) -----------------------------------------------------------


class BuiltinController:
    """Chooses actions without sockets: ``random`` (seeded, each action held a few steps, as a
    player would) or ``cycle`` (scripted: every legal action in turn, each held ``hold`` steps)."""

    def __init__(self, kind: str, n_actions: int, seed: int = 0, hold: int = 4):
        if kind not in ("random", "cycle"):
            raise ValueError(f"controller must be 'random' or 'cycle', not {kind!r}")
        self.kind, self.n, self.hold = kind, n_actions, max(1, hold)
        self.rng = np.random.default_rng(seed)
        self.t = 0
        self.current = 0

    def __call__(self) -> int:
        if self.t % self.hold == 0:
            self.current = int(self.rng.integers(self.n)) if self.kind == "random" else (self.t // self.hold) % self.n
        self.t += 1
        return self.current


def record_headless(settings: GameSettings, steps: int, out: str | os.PathLike, *, controller: str = "random",
                    controller_seed: int = 0, tr_s: float | None = None, meta: dict[str, str] | None = None,
                    progress=None) -> Recording:
    """Play ``steps`` steps with a built-in controller and record them (no sockets, no pacing).

    ``tr_s``: also write scanner triggers every ``tr_s`` seconds of game time (60 Hz clock), so
    synthetic sessions align to TRs as a scanned one would. Frame ``t_ns`` is then game time
    (step × frameskip / 60 s), the pace at which a person would have seen the frames.
    """
    game = GameEnv(settings)
    ctl = BuiltinController(controller, game.n_actions, seed=controller_seed)
    t_ns = 0
    header = game.header("headless", meta=meta)
    header.start_t_ns = 0
    next_tr, tr_index = 0, 0
    seq = -1
    with RecordingWriter(out, header) as w:
        def triggers_until(t: int) -> None:
            nonlocal next_tr, tr_index
            while tr_s is not None and next_tr <= t:
                w.write(TriggerMark(tr_index=tr_index, t_ns=next_tr, source="synthetic"))
                tr_index += 1
                next_tr += int(tr_s * 1e9)

        pixels, seed = game.reset()
        seq += 1
        triggers_until(t_ns)
        w.write(Reset(seq=seq, episode=game.episode, seed=seed, t_ns=t_ns, frame_hash=game.hash(pixels)))
        for i in range(steps):
            a = ctl()
            pixels, reward, term, trunc = game.step(a)
            seq += 1
            t_ns = (i + 1) * settings.frameskip * 1_000_000_000 // 60  # exact game time, no drift
            triggers_until(t_ns)
            w.write(Step(seq=seq, episode=game.episode, step=game.step_in_episode, action=a, controller="builtin",
                         t_ns=t_ns, wall_ns=time.time_ns(), frame_hash=game.hash(pixels), reward=reward,
                         terminated=term, truncated=trunc))
            if term or trunc:
                pixels, seed = game.reset()
                seq += 1
                w.write(Reset(seq=seq, episode=game.episode, seed=seed, t_ns=t_ns, frame_hash=game.hash(pixels)))
            if progress is not None:
                progress(i + 1)
        w.write(End(t_ns=t_ns, reason="max_steps", steps=steps))
    game.close()
    return read_recording(out)


@dataclass
class VerifyResult:
    ok: bool
    frames_checked: int
    first_mismatch_seq: int | None
    detail: str
    truncated: bool


def verify_replay(path: str | os.PathLike, progress=None) -> VerifyResult:
    """Re-run a recording headless and compare every frame hash (bit-exactness)."""
    rec = read_recording(path)
    total = len(rec.resets) + len(rec.steps)
    n = 0
    for n, (r, _, h, _) in enumerate(replay_headless(rec), 1):
        if h != r.frame_hash:
            kind = "step" if isinstance(r, Step) else "reset"
            return VerifyResult(False, n, r.seq, f"{kind} at seq {r.seq}: hash {h} != recorded {r.frame_hash}",
                                rec.truncated)
        if progress is not None:
            progress(n, total)
    return VerifyResult(True, n, None, f"{n} frames bit-exact", rec.truncated)


def install_signal_handlers(emulator: Emulator) -> None:
    """SIGINT/SIGTERM end the session cleanly (recording closed with an End record)."""
    def _handler(signum, _frame):
        emulator.stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)
