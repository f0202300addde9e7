"""GameClient: how an agent (or any program) joins an emulator session.

SUB socket for frames (keep-newest: a slow client skips stale frames, it never works through a
backlog), DEALER socket for Hello / Action / Heartbeat / Bye. Rejoins by itself when the
emulator restarts or drops it: a frame from a new session, silence for 3 heartbeats, or a heartbeat
echo saying it is no longer a member (it was frozen past 3 beats) triggers a fresh Hello (the DEALER is reopened, Lazy-Pirate style, so nothing queued for the dead peer lingers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import zmq

from protocols import Action, Bye, Decoder, Error, Frame, Heartbeat, Hello, Status, Welcome

from services.plumbing.security import CurveConfig, secure_connect
from services.plumbing.transport import (
    DEFAULT_CONTROL, DEFAULT_FRAMES, TOPIC_FRAME, Channel, Counters, make_socket, recv_latest, split_topic,
)

log = logging.getLogger("neuroarcade.client")

ERROR_SAMPLES = 100
"""Error replies kept in ``ClientStats.errors`` (the latest; all are counted)."""


@dataclass
class ClientStats:
    frames_received: int = 0
    frames_skipped: int = 0
    """Frames discarded unseen because a newer one had arrived (keep-newest)."""
    actions_sent: int = 0
    rejoins: int = 0
    errors: list[str] = field(default_factory=list)
    """The emulator's latest ``ERROR_SAMPLES`` Error replies (a misbehaving client can draw one per message)."""
    errors_total: int = 0
    """Every Error reply received."""

    def add_error(self, message: str) -> None:
        self.errors_total += 1
        self.errors.append(message)
        del self.errors[:-ERROR_SAMPLES]


class GameClient:
    def __init__(self, client_id: str, *, role: str = "observer", frames_endpoint: str = DEFAULT_FRAMES,
                 control_endpoint: str = DEFAULT_CONTROL, model: str = "", conditions: list[str] | None = None,
                 ctx: zmq.Context | None = None, hello_timeout_s: float = 2.0, curve: CurveConfig | None = None):
        self.client_id = client_id
        self.requested_role = role
        self.role = role
        """Role granted by the emulator (a taken controller slot makes us an observer)."""
        self.frames_endpoint = frames_endpoint
        self.control_endpoint = control_endpoint
        self.model = model
        self.conditions = list(conditions or [])
        self.ctx = ctx or zmq.Context.instance()
        self.hello_timeout_s = hello_timeout_s
        self.curve = curve
        self.stats = ClientStats()
        self.counters = Counters()
        self.welcome: Welcome | None = None
        self._hb_seq = 0
        self._last_heard = time.monotonic()
        self._next_beat = 0.0
        self.sub = make_socket(self.ctx, zmq.SUB, hwm=4)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC_FRAME)
        secure_connect(self.sub, frames_endpoint, curve)
        self._sub_channel = Channel(self.sub, Decoder([Frame]), self.counters)
        self._open_dealer()

    @property
    def rejected(self) -> int:
        """Messages our codec refused, frames and control replies alike (the two channels share ``counters``)."""
        return self.counters.rejected

    # --- session -----------------------------------------------------------------------------

    def _open_dealer(self) -> None:
        self.dealer = make_socket(self.ctx, zmq.DEALER, hwm=64, linger_ms=0)
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a half-open peer
        secure_connect(self.dealer, self.control_endpoint, self.curve)
        self.control = Channel(self.dealer, Decoder([Welcome, Heartbeat, Error]), self.counters)

    def join(self, timeout_s: float = 30.0) -> Welcome:
        """Say Hello until a Welcome comes back (retrying, reopening the socket between tries)."""
        t_end = time.monotonic() + timeout_s
        while True:
            wait_end = min(t_end, time.monotonic() + self.hello_timeout_s)
            # IMMEDIATE: the DEALER is writable only once connected, so wait for that first
            if self.dealer.poll(max(1, int((wait_end - time.monotonic()) * 1000)), zmq.POLLOUT):
                try:
                    self.control.send(Hello(client_id=self.client_id, role=self.requested_role, model=self.model,
                                            conditions=self.conditions, pid=os.getpid()), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            while time.monotonic() < wait_end:
                if self.dealer.poll(max(1, int((wait_end - time.monotonic()) * 1000))):
                    msg = self.control.decode(self.control.recv_parts())
                    if isinstance(msg, Welcome):
                        self.welcome = msg
                        self.role = msg.role
                        self._last_heard = time.monotonic()
                        return msg
            if time.monotonic() >= t_end:
                raise TimeoutError(f"no Welcome from {self.control_endpoint} within {timeout_s} s")
            self.dealer.close(linger=0)
            self._open_dealer()

    def _rejoin(self) -> None:
        """One short rejoin attempt; if the emulator is still away, the next call tries again."""
        if self.welcome is not None:
            self.stats.rejoins += 1
            log.info("%s: emulator session changed or went silent: rejoining", self.client_id)
        self.welcome = None
        self.dealer.close(linger=0)
        self._open_dealer()
        try:
            self.join(timeout_s=self.hello_timeout_s)
        except TimeoutError:
            pass

    # --- frames and actions ------------------------------------------------------------------

    def next_frame(self, timeout_ms: int = 1000) -> Frame | None:
        """The newest frame available within ``timeout_ms`` (older queued ones are skipped)."""
        self._service_control()
        parts, dropped = recv_latest(self.sub, timeout_ms)
        self.stats.frames_skipped += dropped
        if parts is None:
            return None
        _, body = split_topic(parts)
        frame = self._sub_channel.decode(body)
        if not isinstance(frame, Frame):
            return None
        self.stats.frames_received += 1
        self._last_heard = time.monotonic()
        if self.welcome is None or frame.session_id != self.welcome.session_id:
            self._rejoin()
            if self.welcome is None or frame.session_id != self.welcome.session_id:
                return None  # a leftover frame of the previous session: never act on it
        return frame

    def act(self, frame: Frame, action: int, *, probs: list[float] | None = None, condition: str = "",
            latency_ns: int = 0) -> None:
        self.control.send(Action(agent_id=self.client_id, frame_seq=frame.seq, action=int(action),
                                 probs=list(probs or []), condition=condition, t_sent_ns=time.monotonic_ns(),
                                 latency_ns=latency_ns), flags=zmq.NOBLOCK)
        self.stats.actions_sent += 1

    def _service_control(self) -> None:
        """Read replies without blocking; send a heartbeat when due; rejoin after 3 silent beats."""
        dropped = False
        while self.dealer.poll(0):
            msg = self.control.decode(self.control.recv_parts())
            self._last_heard = time.monotonic()
            if isinstance(msg, Heartbeat) and not msg.member:
                dropped = True  # the emulator dropped us (we were frozen past 3 beats): frames still flow
            if isinstance(msg, Error):
                self.stats.add_error(f"{msg.code}: {msg.detail}")
                log.warning("%s: emulator says %s: %s", self.client_id, msg.code, msg.detail)
        beat_s = self.welcome.heartbeat_s if self.welcome else 1.0
        now = time.monotonic()
        if now >= self._next_beat:
            self._hb_seq += 1
            try:
                self.control.send(Heartbeat(sender=self.client_id, seq=self._hb_seq, t_ns=time.monotonic_ns()),
                                  flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            self._next_beat = now + beat_s
        if dropped or now - self._last_heard > 3 * beat_s:
            self._last_heard = now
            self._rejoin()

    def close(self) -> None:
        try:
            self.control.send(Bye(client_id=self.client_id), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.dealer.close(linger=100)
        self.sub.close(linger=0)

    def __enter__(self) -> "GameClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["GameClient", "ClientStats", "Status"]
