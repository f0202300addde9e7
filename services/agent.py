"""Agent service: runs any :class:`agents.base.Agent` against the emulator, closed loop.

Per loop: take the newest frame (GameClient keeps-newest, so a slow agent skips stale frames
instead of working through a backlog), decide, send one Action per prompt condition naming the
frame it acted on, and publish one Activation per (condition, pooling) on our own PUB socket.
GameClient sends heartbeats and rejoins by itself when the emulator restarts; the agent's frame
history is reset when the session changes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import zmq

from agents.base import Agent, Decision, FatalAgentError, FrameRef, Observation
from protocols import Action, Activation, Frame, Status
from services.plumbing.client import GameClient
from services.plumbing.security import CurveConfig, ServerSecurity, check_bind
from services.plumbing.transport import (
    DEFAULT_ACTIVATIONS, DEFAULT_CONTROL, DEFAULT_FRAMES, TOPIC_ACTION, TOPIC_ACTIVATION, TOPIC_HEARTBEAT, Channel, make_socket,
)

log = logging.getLogger("neuroarcade.agent")

# Per-decision samples kept for percentiles, as the emulator keeps its clients' (bounded: an agent
# can run for hours at 15 decisions/s); counts and maxima cover the whole run.
STATS_WINDOW = 10_000
# Error messages kept as samples (a model failing on every frame must not grow memory); all are counted.
ERROR_SAMPLES = 100


@dataclass
class AgentServiceConfig:
    """Where an agent service connects and how long it runs."""

    agent_id: str
    """Unique client name, e.g. ``vlm-0``; goes into Hello, Action and Activation."""
    role: str = "observer"
    """``controller`` drives the game; ``observer`` only logs its actions."""
    frames_endpoint: str = DEFAULT_FRAMES
    control_endpoint: str = DEFAULT_CONTROL
    activations_endpoint: str | None = DEFAULT_ACTIVATIONS
    """Endpoint our PUB socket binds for Activation messages; None publishes nothing."""
    duration_s: float | None = None
    """Stop after this many seconds (None: until stopped)."""
    max_decisions: int | None = None
    """Stop after this many decisions (None: no limit)."""
    join_timeout_s: float = 30.0
    """How long to wait for the first Welcome."""
    frame_timeout_ms: int = 200
    """Poll interval for frames (the stop flag is checked this often)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (None = off; 0 = any free port)."""
    status_s: float = 1.0
    """Publish a Status (topic ``heartbeat``) on the activation PUB this often."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE keys: our key pair, the emulator's public key (as client) and the allow-list of
    subscribers to our activation PUB (as server). Required when any endpoint is off loopback."""


@dataclass
class ConditionSummary:
    """One prompt condition's share of an agent service run (``""`` for an agent without conditions)."""

    decisions: int
    """Actions decided (and sent) for this condition."""
    latency_p50_ms: float
    """Median frame received → decided, over the last ``STATS_WINDOW`` decisions."""
    latency_p99_ms: float
    """99th percentile of the same."""
    activations: int
    """Activation messages published for this condition (one per pooling and decision)."""


@dataclass
class AgentSummary:
    """What :meth:`AgentService.run` returns; ``dataclasses.asdict`` gives the ``--json`` summary."""

    agent_id: str
    """Client name the service joined as."""
    model: str
    """The agent's model name (``Agent.name``)."""
    role: str
    """``controller`` or ``observer`` (as the emulator granted it)."""
    duration_s: float
    """Seconds from start to stop, joining included."""
    decisions: int
    """Frames decided on (all conditions together count once)."""
    conditions: dict[str, ConditionSummary]
    """Per prompt condition: decisions, latency and activations."""
    stale_skipped: int
    """Frames replaced unseen by a newer one (client and mailbox together)."""
    frames_received: int
    """Frames the GameClient received."""
    rejoins: int
    """Times the client joined again after the emulator restarted or fell silent."""
    illegal_actions: int
    """Actions outside the game's action set (never sent)."""
    frame_age_p50_ms: float
    """Median decision start minus the frame's emulator time stamp (same host only; recent window)."""
    frame_age_max_ms: float
    """The largest frame age of the whole run."""
    stage_mean_ms: dict[str, float]
    """Mean milliseconds per decision of each timed stage (``decision``, ``preprocess``, ``model`` …)."""
    errors_total: int
    """Model errors and emulator Error replies, all counted."""
    errors: list[str]
    """The first few error messages (the service's, then the client's)."""


@dataclass
class AgentFailure:
    """An agent service that returned no summary: its process failed to build the agent, died or raised."""

    agent_id: str
    """Client name of the failed agent."""
    error: str
    """What went wrong (``"<ExceptionType>: <message>"``)."""


@dataclass
class _ConditionStats:
    decisions: int = 0
    activations: int = 0
    latencies_ns: deque[int] = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    """Frame received → decided, the last ``STATS_WINDOW`` decisions."""


def _pct(values: Sequence[int], q: float) -> float:
    return float(np.percentile(np.asarray(values) / 1e6, q)) if len(values) else 0.0


def frame_ref(f: Frame) -> FrameRef:
    """What an agent sees of a wire Frame."""
    return FrameRef(f.seq, f.t_ns, f.pixels, f.pooled_gray, f.step)


@dataclass
class _Pending:
    frame: Frame
    meanings: tuple[str, ...]
    received_ns: int
    skipped: tuple[FrameRef, ...] = ()


class _Mailbox:
    """Holds only the newest frame: a newer one replaces an untaken one (counted as stale).

    Replaced frames are remembered (the last ``keep``) and handed over with the next frame as
    history, never as input: frame windows and frame stacks stay exact for a slow agent.
    """

    def __init__(self, keep: int = 64) -> None:
        self._cond = threading.Condition()
        self._item: _Pending | None = None
        self._skipped: deque[Frame] = deque(maxlen=keep)
        self.replaced = 0

    def put(self, item: _Pending) -> None:
        with self._cond:
            if self._item is not None:
                self.replaced += 1
                self._skipped.append(self._item.frame)
            self._item = item
            self._cond.notify()

    def depth(self) -> int:
        """Frames waiting (0 or 1: the mailbox holds one)."""
        return int(self._item is not None)

    def take(self, timeout_s: float) -> _Pending | None:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            if item is not None:
                now = item.frame
                item.skipped = tuple(frame_ref(f) for f in self._skipped
                                     if f.session_id == now.session_id and f.seq < now.seq)
                self._skipped.clear()
            return item


class AgentService:
    """One agent connected to one emulator; ``run()`` blocks and returns an :class:`AgentSummary`.

    Two threads: the I/O thread owns the GameClient (frames, actions, heartbeats, rejoins) and
    reads frames continuously into a one-slot mailbox, so no backlog can build up in ZMQ or
    kernel buffers while the model is busy; the decision thread takes the newest frame, runs
    the agent, publishes activations and hands the actions back to the I/O thread (a queue plus
    an inproc wake-up socket, since ZMQ sockets are single-threaded).
    """

    def __init__(self, agent: Agent, cfg: AgentServiceConfig, ctx: zmq.Context | None = None):
        self.agent = agent
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        """Set once joined and the activation socket is bound."""
        self.stats = {c: _ConditionStats() for c in agent.conditions}
        self.frame_ages_ns: deque[int] = deque(maxlen=STATS_WINDOW)
        """Time from the frame's emulator time stamp to the decision starting on it (same host only; recent window)."""
        self.frame_age_max_ns = 0
        """The largest frame age of the whole run."""
        self.decided_seqs: deque[int] = deque(maxlen=STATS_WINDOW)
        """Sequence numbers of the frames decided on (recent window)."""
        self.decisions = 0
        self.illegal = 0
        self.errors: list[str] = []
        """The first ``ERROR_SAMPLES`` error messages; ``errors_total`` counts them all."""
        self.errors_total = 0
        self._errors_lock = threading.Lock()  # both threads report errors
        self.fatal: BaseException | None = None
        self.stage_ms: dict[str, float] = {}
        self._mailbox = _Mailbox()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://agent-wake-{id(self)}"
        self._client: GameClient | None = None
        self.metrics_port: int | None = None
        """Port the metrics server listens on (set once running with ``metrics_port``)."""
        self._security: ServerSecurity | None = None
        """CURVE for the activation PUB (set in ``run`` when we publish)."""

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> AgentSummary:
        cfg = self.cfg
        if cfg.activations_endpoint:  # refuse an exposed PUB without keys before joining the game
            check_bind(cfg.activations_endpoint, cfg.curve)
            self._security = ServerSecurity(self.ctx, cfg.curve)
        client = GameClient(cfg.agent_id, role=cfg.role, frames_endpoint=cfg.frames_endpoint,
                            control_endpoint=cfg.control_endpoint, model=self.agent.name,
                            conditions=[c for c in self.agent.conditions if c], ctx=self.ctx, curve=cfg.curve)
        wake_rx = self.ctx.socket(zmq.PAIR)
        wake_rx.bind(self._wake_addr)
        decider = threading.Thread(target=self._decision_loop, name=f"{cfg.agent_id}-decide", daemon=True)
        t_start = time.monotonic()
        self._client = client
        metrics_server = None
        try:
            if cfg.metrics_port is not None:
                from services.plumbing.metrics import serve_metrics

                metrics_server, _ = serve_metrics("agent", self.snapshot, cfg.metrics_port)
                self.metrics_port = metrics_server.server_port
            client.join(timeout_s=cfg.join_timeout_s)
            decider.start()  # sets ``ready`` once the activation socket is bound
            self._io_loop(client, wake_rx, t_start)
        finally:
            self.stop_event.set()
            if decider.is_alive():
                decider.join()
            self._send_actions(client)
            client.close()
            wake_rx.close(linger=0)
            if self._security is not None:
                self._security.close()
            if metrics_server is not None:
                metrics_server.shutdown()
        if self.fatal is not None:
            raise self.fatal
        return self.summary(client, time.monotonic() - t_start)

    # --- I/O thread ----------------------------------------------------------------------------

    def _io_loop(self, client: GameClient, wake_rx: zmq.Socket, t_start: float) -> None:
        cfg = self.cfg
        poller = zmq.Poller()
        poller.register(client.sub, zmq.POLLIN)
        poller.register(wake_rx, zmq.POLLIN)
        last_put: tuple[str, int] = ("", -1)
        while not self.stop_event.is_set():
            if cfg.duration_s is not None and time.monotonic() - t_start >= cfg.duration_s:
                break
            if cfg.max_decisions is not None and self.decisions >= cfg.max_decisions:
                break
            events = dict(poller.poll(cfg.frame_timeout_ms))
            if wake_rx in events:
                while wake_rx.poll(0):
                    wake_rx.recv()
                self._send_actions(client)
            # Also called without frame events: it sends heartbeats and notices a silent emulator.
            frame = client.next_frame(timeout_ms=0)
            if frame is None or client.welcome is None or frame.session_id != client.welcome.session_id:
                continue  # nothing new, or a rejoin is still under way
            if frame.session_id == last_put[0] and frame.seq <= last_put[1]:
                continue  # a lockstep re-publication of a frame already taken: decide once per frame
            last_put = (frame.session_id, frame.seq)
            self._mailbox.put(_Pending(frame, tuple(client.welcome.action_meanings), time.monotonic_ns()))

    def _send_actions(self, client: GameClient) -> None:
        while True:
            try:
                frame, choice, latency_ns = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                client.act(frame, choice.action, probs=[float(p) for p in choice.probs],
                           condition=choice.condition, latency_ns=latency_ns)
            except zmq.Again:
                self._error(f"frame {frame.seq}: action not sent (emulator unreachable)")

    # --- decision thread -----------------------------------------------------------------------

    def _decision_loop(self) -> None:
        pub = None
        wake_tx = self.ctx.socket(zmq.PAIR)
        wake_tx.connect(self._wake_addr)
        try:
            if self.cfg.activations_endpoint:
                pub = Channel(make_socket(self.ctx, zmq.PUB))
                self._security.bind(pub.sock, self.cfg.activations_endpoint)
            self.ready.set()
            session = None
            next_status = time.monotonic()
            while not self.stop_event.is_set():
                if pub is not None and time.monotonic() >= next_status:
                    next_status = time.monotonic() + self.cfg.status_s
                    self._publish_status(pub, session or "")
                item = self._mailbox.take(timeout_s=0.1)
                if item is None:
                    continue
                if session is not None and item.frame.session_id != session:
                    self.agent.reset()  # emulator restarted: frame history belongs to the old session
                session = item.frame.session_id
                decision = self._step(item, lambda: wake_tx.send(b"", flags=zmq.NOBLOCK))
                if decision is not None and pub is not None:
                    self._publish(pub, decision)
        except BaseException as err:  # FatalAgentError, or the activation endpoint cannot be bound
            self.fatal = err
            self.stop_event.set()
        finally:
            wake_tx.close(linger=0)
            if pub is not None:
                pub.sock.close(linger=200)

    def _step(self, item: _Pending, wake: Callable[[], None]) -> Decision | None:
        """Decide on one frame and queue its actions (``wake`` tells the I/O thread to send them)."""
        frame, meanings = item.frame, item.meanings
        started_ns = time.monotonic_ns()
        obs = Observation((frame_ref(frame),), meanings, item.received_ns,
                          skipped=item.skipped)
        try:
            decision = self.agent.infer(obs)
        except FatalAgentError:
            raise
        except Exception as err:  # a bad frame or model error is counted, never kills the service
            if self._error(f"frame {frame.seq}: {type(err).__name__}: {str(err)[:300]}") <= 3:
                # the first few with a traceback; then only counted
                log.exception("%s: decision failed on frame %d", self.cfg.agent_id, frame.seq)
            return None
        if decision is None:
            return None
        latency_ns = time.monotonic_ns() - item.received_ns
        decision.timings_ms["decision"] = latency_ns / 1e6  # frame received → decided
        self.decisions += 1
        self.decided_seqs.append(frame.seq)
        self.frame_ages_ns.append(started_ns - frame.t_ns)
        self.frame_age_max_ns = max(self.frame_age_max_ns, started_ns - frame.t_ns)
        for k, v in decision.timings_ms.items():
            self.stage_ms[k] = self.stage_ms.get(k, 0.0) + v
        for choice in decision.choices:
            st = self.stats.setdefault(choice.condition, _ConditionStats())
            if not 0 <= choice.action < len(meanings):
                self.illegal += 1  # never sent: the emulator would reject it
                continue
            self._outbox.put((frame, choice, latency_ns))
            st.decisions += 1
            st.latencies_ns.append(latency_ns)
        wake()  # actions leave before the activations are encoded and published
        return decision

    def _error(self, message: str) -> int:
        """Count an error, keep its message while fewer than ``ERROR_SAMPLES`` are kept; returns the count."""
        with self._errors_lock:
            self.errors_total += 1
            if len(self.errors) < ERROR_SAMPLES:
                self.errors.append(message)
            return self.errors_total

    def _publish(self, pub: Channel, decision: Decision) -> None:
        t_ns = time.monotonic_ns()
        # the decisions themselves, for sinks (dashboard): the emulator gets them on its control socket
        for c in decision.choices:
            try:
                pub.send(Action(agent_id=self.cfg.agent_id, frame_seq=decision.frame_seqs[-1], action=int(c.action),
                                probs=[float(p) for p in c.probs], condition=c.condition, t_sent_ns=t_ns,
                                latency_ns=int(decision.timings_ms.get("decision", 0.0) * 1e6)),
                         topic=TOPIC_ACTION, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        for a in decision.activations:
            msg = Activation(agent_id=self.cfg.agent_id, model=self.agent.name, condition=a.condition,
                             layers=list(a.layers), pooling=a.pooling, frame_seqs=list(decision.frame_seqs),
                             t_ns=t_ns, vectors=np.ascontiguousarray(a.vectors), frame_t_ns=decision.frame_t_ns)
            try:
                pub.send(msg, topic=TOPIC_ACTIVATION, flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            self.stats.setdefault(a.condition, _ConditionStats()).activations += 1

    def _publish_status(self, pub: Channel, session: str) -> None:
        """Liveness + counters on our PUB (topic ``heartbeat``), as the emulator does on its own."""
        client = self._client
        st = client.stats if client is not None else None
        status = Status(service="agent", session_id=session, t_ns=time.monotonic_ns(),
                        seq=self.decided_seqs[-1] if self.decided_seqs else -1, steps=self.decisions,
                        received=st.frames_received if st else 0, sent=st.actions_sent if st else 0,
                        rejected=client.rejected if client is not None else 0,
                        clients={self.cfg.agent_id: client.role if client is not None else self.cfg.role})
        try:
            pub.send(status, topic=TOPIC_HEARTBEAT, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def snapshot(self) -> dict:
        """Counters and gauges for Prometheus: the document ``serve_metrics`` renders (hence a dict, not a
        summary); read from the metrics thread, so copies of plain numbers."""
        client = self._client
        st = client.stats if client is not None else None
        stats = list(self.stats.items())  # the decision thread may add a condition meanwhile
        recent = {c: list(s.latencies_ns)[-1000:] for c, s in stats}  # list(): a copy the decision thread cannot move
        ages = list(self.frame_ages_ns)[-1000:]
        return {
            "counters": {
                "frames_received": st.frames_received if st else 0,
                "frames_skipped": (st.frames_skipped if st else 0) + self._mailbox.replaced,
                "frames_rejected": client.rejected if client is not None else 0,
                "decisions": self.decisions, "actions_sent": st.actions_sent if st else 0,
                "activations_published": {c or "-": s.activations for c, s in stats},
                "illegal_actions": self.illegal, "errors": self.errors_total + (st.errors_total if st else 0),
                "rejoins": st.rejoins if st else 0,
            },
            "gauges": {
                "decision_latency_p50_ms": {c or "-": _pct(v, 50) for c, v in recent.items()},
                "decision_latency_p99_ms": {c or "-": _pct(v, 99) for c, v in recent.items()},
                "frame_age_p50_ms": _pct(ages, 50), "frame_age_max_ms": max(ages) / 1e6 if ages else 0.0,
                "mailbox_depth": self._mailbox.depth(), "outbox_depth": self._outbox.qsize(),
                "joined": 1 if client is not None and client.welcome is not None else 0,
            },
            "labels": {"activations_published": "condition", "decision_latency_p50_ms": "condition",
                       "decision_latency_p99_ms": "condition"},
        }

    def summary(self, client: GameClient, duration_s: float) -> AgentSummary:
        per = {cond: ConditionSummary(decisions=st.decisions, latency_p50_ms=_pct(st.latencies_ns, 50),
                                      latency_p99_ms=_pct(st.latencies_ns, 99), activations=st.activations)
               for cond, st in self.stats.items()}
        return AgentSummary(
            agent_id=self.cfg.agent_id, model=self.agent.name, role=client.role,
            duration_s=duration_s, decisions=self.decisions, conditions=per,
            stale_skipped=client.stats.frames_skipped + self._mailbox.replaced,
            frames_received=client.stats.frames_received,
            rejoins=client.stats.rejoins, illegal_actions=self.illegal,
            frame_age_p50_ms=_pct(self.frame_ages_ns, 50),
            frame_age_max_ms=self.frame_age_max_ns / 1e6,
            stage_mean_ms={k: v / max(self.decisions, 1) for k, v in self.stage_ms.items()},
            errors_total=self.errors_total + client.stats.errors_total,
            errors=self.errors[:5] + client.stats.errors[:5],
        )


def run_agent_service(agent: Agent, cfg: AgentServiceConfig,
                      stop_event: threading.Event | None = None) -> AgentSummary:
    """Run until duration/max_decisions/stop_event; returns the run's summary."""
    service = AgentService(agent, cfg)
    if stop_event is not None:
        service.stop_event = stop_event
    return service.run()
