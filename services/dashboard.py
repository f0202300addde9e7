"""Live dashboard: what the closed loop is doing, in a browser, without ever slowing it down.

    emulator PUB (frame, heartbeat) ─┐
    agents' PUBs (activation, action)─┤   SUB sockets, one          newest state     FastAPI + websockets
    scanner PUB (bold, trigger)     ──┼─► subscriber thread ──────► per stream ─────► (uvicorn) ─► browsers
    encoder PUB (prediction)        ──┘   (drains, never blocks)    (bounded)          capped rate

The subscriber thread drains its SUB sockets with NOBLOCK and keeps only the newest state per
stream (the newest frame, the newest decision per agent, the last ``history_trs`` TRs per
prediction stream), so memory is bounded and a slow dashboard or browser only ever loses
messages at its own ZMQ high-water mark: publishers never wait for it. Each browser gets the
newest frame at most ``max_fps`` times a second and a JSON state snapshot ``state_hz`` times a
second; a browser that cannot keep up just skips to the newest.

Keyboard play (``play=True``): the dashboard joins the emulator through ``GameClient`` as client
``human`` asking for the controller role, and answers every new frame with the action the
browser's held keys map to (arrows + space, named as in the game's ``action_meanings``; or a
button box's keys through ``ParticipantInputs.keymap``, ``1=LEFT,2=RIGHT,…``, shown on the page).

Scanner triggers (the scanner room's inputs): in play mode the participant's page sends the sync
box's trigger keypress (``ParticipantInputs.trigger_key``, default ``5``; never a game action) and
the server stamps it on arrival with ``time.monotonic_ns()`` (the emulator's clock on this host); a
serial line (``ParticipantInputs.serial``, pyserial) is read and stamped the same way. Both go to
the emulator as ``Trigger`` messages (``source`` ``keyboard`` / ``serial``, ``host_clock`` true, TR
index counted from 0), through one ``TriggerForwarder`` that drops pulses closer than
``min_trigger_interval_s`` to the previous one (counted).

Scanner quality: the encoders' ``VolumeQuality`` messages (topic ``quality``) give, per measured
volume, the motion parameters, framewise displacement, whether it was excluded and the processing
time; the page draws the motion trace, FD per TR, the excluded count and the time per volume. They
also carry the session's registration to the weights' space (aligned / failed and why / not yet,
translation, rotation, match r) and, once, the alignment overlay PNG: the newest per stream is
served at ``/api/overlay.png?stream=KEY`` and shown in the panel.

Access: on a loopback host the page is open; on any other host a token is required (query
``?token=``, header ``X-Neuroarcade-Token`` or ``Authorization: Bearer``; the page then keeps it
in a cookie). Every ZeroMQ connection is a CURVE client when ``curve`` keys are given; a
non-loopback endpoint without them is refused at construction (``SecurityError``).

Agents' decisions: ``Action`` messages go to the emulator's ROUTER, which the dashboard cannot
see. If an agent also publishes its ``Action`` on its activation PUB under topic ``action``,
the dashboard shows its per-action probabilities and decision latency; otherwise it shows what
``Activation`` carries (staleness, decision rate) and the applied action from ``Frame``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocols import Action, Activation, BoldVolume, Decoder, Frame, Prediction, Status, Trigger, VolumeQuality
from protocols.messages import OVERLAY_MAX_BYTES
from services.plumbing.metrics import snapshot_registry
from services.plumbing.security import CurveConfig, SecurityError, check_connect, secure_connect
from services.plumbing.serial_trigger import SerialTriggerConfig, SerialTriggerError, SerialTriggerReader
from services.plumbing.transport import (
    DEFAULT_CONTROL, DEFAULT_FRAMES, TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_FRAME, TOPIC_HEARTBEAT, TOPIC_PREDICTION,
    TOPIC_QUALITY, TOPIC_TRIGGER, Channel, make_socket, split_topic,
)

log = logging.getLogger("neuroarcade.dashboard")

STATIC_DIR = Path(__file__).with_name("dashboard_static")
TOPIC_ACTION = b"action"
"""Topic under which an agent may publish its own Action messages on its activation PUB."""
TOKEN_COOKIE = "neuroarcade_token"
MAX_STREAMS = 64
"""Agents / prediction streams kept at most (bounded memory against a misbehaving publisher)."""
MAX_DRAIN = 2000
"""Messages handled per socket per wake-up before the other sockets get their turn."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


ALE_ACTIONS = ("NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE",
               "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE")
"""ALE's full action set: the names a key map may use (a game has a subset: its ``action_meanings``)."""
KEY_ALIASES = {"space": " ", "spacebar": " ", "left": "ArrowLeft", "right": "ArrowRight", "up": "ArrowUp",
               "down": "ArrowDown", "enter": "Enter", "return": "Enter"}
"""Names accepted for keys that are awkward to write in ``--keymap``/``--trigger-key`` (browser ``KeyboardEvent.key``)."""


def normalize_key(key: str) -> str:
    """A browser ``KeyboardEvent.key`` as compared here: single characters lower-cased (``T`` with caps lock
    on is still the trigger ``t``), a few names (``space``, ``left``…) mapped to the browser's."""
    if len(key) == 1:
        return key.lower()
    return KEY_ALIASES.get(key.lower(), key)


def parse_keymap(text: str) -> dict[str, str]:
    """``"1=LEFT,2=RIGHT,3=FIRE,4=NOOP"`` → ``{"1": "LEFT", …}`` (ValueError naming the bad item).

    Keys are browser key names (``1``, ``b``, ``ArrowLeft``, ``space``); actions are ALE action names
    (``ALE_ACTIONS``, any case). A key given twice, an empty key or an unknown action is an error."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, action = item.rpartition("=")
        key, action = key.strip(), action.strip().upper()
        if not sep or not key:
            raise ValueError(f"key map item {item!r} is not KEY=ACTION (e.g. 1=LEFT)")
        if action not in ALE_ACTIONS:
            raise ValueError(f"key map item {item!r}: {action!r} is not an ALE action (one of {', '.join(ALE_ACTIONS)})")
        k = normalize_key(key)
        if k in out:
            raise ValueError(f"key map gives key {key!r} twice")
        out[k] = action
    return out


@dataclass
class ParticipantInputs:
    """The scanner room's inputs on the participant's computer: the sync box's trigger and the button box."""

    trigger_key: str = "5"
    """Browser key the sync box types at each TR pulse (``5``; ``t`` is also common); '' = none. Never a game action."""
    keymap: dict[str, str] = field(default_factory=dict)
    """Button box: browser key → ALE action name (``parse_keymap``); empty = arrows/WASD + space."""
    serial: SerialTriggerConfig = field(default_factory=SerialTriggerConfig)
    """A serial line carrying the pulses too (``serial.port`` '' = none)."""
    min_trigger_interval_s: float = 0.1
    """Pulses (keyboard or serial) closer than this to the previous accepted one are dropped and counted."""

    def check(self) -> None:
        """ValueError for an unusable setup: the trigger key in the key map, an unknown action, a bad serial byte."""
        bad = [a for a in self.keymap.values() if a not in ALE_ACTIONS]
        if bad:
            raise ValueError(f"key map names {', '.join(bad)}: not ALE actions")
        if self.trigger_key and normalize_key(self.trigger_key) in {normalize_key(k) for k in self.keymap}:
            raise ValueError(f"the trigger key {self.trigger_key!r} is also in the key map: a trigger is never a "
                             "game action; choose another key for one of them")
        if self.min_trigger_interval_s < 0:
            raise ValueError("min_trigger_interval_s must be >= 0")
        if self.serial.port:
            try:
                self.serial.trigger_byte()
            except SerialTriggerError as e:
                raise ValueError(str(e)) from None


@dataclass
class DashboardConfig:
    """What the dashboard listens to and how it serves browsers."""

    frames: str = DEFAULT_FRAMES
    """Emulator frames PUB (topics ``frame`` and ``heartbeat``); '' = no game stream."""
    control: str = DEFAULT_CONTROL
    """Emulator control ROUTER: asked once per session for game info (Hello/Welcome/Bye), and joined for play."""
    activations: list[str] = field(default_factory=list)
    """Agents' PUB endpoints (``activation``, and ``action`` where agents publish their decisions)."""
    bold: list[str] = field(default_factory=list)
    """Scanner PUB endpoints (``bold`` volumes and ``trigger`` pulses)."""
    predictions: list[str] = field(default_factory=list)
    """Encoder PUB endpoints (``prediction``)."""
    host: str = "127.0.0.1"
    """Interface the web server listens on; anything but loopback requires ``token``."""
    port: int = 8000
    token: str = ""
    """Access token for browsers ('' = none; only allowed on loopback)."""
    play: bool = False
    """Join the emulator as controller ``human`` and play with the browser's keyboard."""
    atlas: str = ""
    """ROI label NIfTI (integers, 0 = none) for the brain map."""
    atlas_labels: str = ""
    """TSV with columns ``index`` and ``name`` naming the atlas labels (as ``neuroarcade fit --atlas-labels``)."""
    weights: str = ""
    """Encoding weights file: its mask and ROI labels give the brain map when no ``atlas`` is given."""
    max_fps: float = 20.0
    """Frames pushed to each browser per second at most."""
    state_hz: float = 5.0
    """State snapshots (agents, predictions, TR clock) pushed per second at most."""
    history_trs: int = 150
    """TRs of predicted/measured time courses kept per stream."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE client keys: our key pair and the servers' public keys (a file, or a folder of
    HOST.key files). Required when any endpoint is off loopback."""
    inputs: ParticipantInputs = field(default_factory=ParticipantInputs)
    """Trigger key (accepted from the page in ``play`` mode), serial trigger line and button-box key map."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(cfg: DashboardConfig) -> None:
    """Refuse to serve a non-loopback interface without a token."""
    if not cfg.token and not is_loopback_host(cfg.host):
        raise ValueError(f"the dashboard listens on {cfg.host}, which is not loopback: give --token "
                         "(browsers then open http://HOST:PORT/?token=...)")


def check_endpoints(cfg: DashboardConfig) -> None:
    """Refuse (``SecurityError``) to connect to a non-loopback endpoint without CURVE keys."""
    for ep in [cfg.frames, cfg.control, *cfg.activations, *cfg.bold, *cfg.predictions]:
        if ep:
            check_connect(ep, cfg.curve)


# --- keyboard → game action -----------------------------------------------------------------------

BROWSER_KEYS = {"ArrowUp": "UP", "ArrowDown": "DOWN", "ArrowLeft": "LEFT", "ArrowRight": "RIGHT", " ": "FIRE",
                "w": "UP", "s": "DOWN", "a": "LEFT", "d": "RIGHT"}
"""Browser ``KeyboardEvent.key`` → logical button."""


def action_for_keys(buttons: set[str], meanings: list[str] | tuple[str, ...]) -> int:
    """Index into ``meanings`` for the held buttons (UP/DOWN/LEFT/RIGHT/FIRE), ALE naming.

    The ALE names combined actions vertical + horizontal + FIRE (``UPLEFTFIRE``). A combination
    the game lacks falls back to fewer buttons, then NOOP. Games without UP/DOWN (Pong-style
    paddles, where RIGHT moves the paddle up) take the up/down arrows as RIGHT/LEFT.
    """
    names = {m: i for i, m in enumerate(meanings)}
    vert = "UP" if "UP" in buttons and "DOWN" not in buttons else "DOWN" if "DOWN" in buttons and "UP" not in buttons else ""
    horiz = ("RIGHT" if "RIGHT" in buttons and "LEFT" not in buttons
             else "LEFT" if "LEFT" in buttons and "RIGHT" not in buttons else "")
    fire = "FIRE" if "FIRE" in buttons else ""
    if vert and not horiz and "UP" not in names and "DOWN" not in names:
        vert, horiz = "", {"UP": "RIGHT", "DOWN": "LEFT"}[vert]
    for candidate in (vert + horiz + fire, vert + horiz, vert + fire, horiz + fire, vert, horiz, fire, "NOOP"):
        if candidate and candidate in names:
            return names[candidate]
    return 0


def action_for_held(keys: list[str], meanings: list[str] | tuple[str, ...], keymap: dict[str, str],
                    trigger_key: str = "") -> tuple[int, str]:
    """Action index for the browser keys held (in the order pressed) and the key that chose it ('' = none).

    With a ``keymap`` (button box) the most recently pressed mapped key wins; its action must be one of
    the game's ``meanings`` (otherwise it counts as NOOP). Without, arrows/WASD/space combine as in
    ``action_for_keys``. The trigger key is never an action."""
    trig = normalize_key(trigger_key) if trigger_key else None
    held = [normalize_key(k) for k in keys if normalize_key(k) != trig]
    if keymap:
        names = {m: i for i, m in enumerate(meanings)}
        for k in reversed(held):
            if k in keymap:
                return (names.get(keymap[k], names.get("NOOP", 0)), k)
        return names.get("NOOP", 0), ""
    browser = {normalize_key(k): b for k, b in BROWSER_KEYS.items()}
    buttons = {browser[k] for k in held if k in browser}
    return action_for_keys(buttons, meanings), "+".join(sorted(buttons))


# --- the newest state of every stream ---------------------------------------------------------------


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class LiveState:
    """Newest state per stream, shared by the subscriber thread (writer) and the web server (readers).

    Everything is bounded: one frame, one decision per agent/condition, ``history_trs`` TRs per
    prediction stream, at most ``MAX_STREAMS`` agents and streams.
    """

    def __init__(self, history_trs: int = 150):
        self.lock = threading.Lock()
        self.history_trs = history_trs
        self.frame_version = 0
        self.frame_header = b""
        self.frame_pixels = b""
        self.frame: dict[str, Any] = {}
        self.version = 0
        self.game: dict[str, Any] = {}
        self.emulator: dict[str, Any] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.streams: dict[str, dict[str, Any]] = {}
        self.scanner: dict[str, Any] = {"triggers": 0, "tr_index": None, "volumes": 0}
        self._trigger_times: list[float] = []
        self.counts: dict[str, int] = {}
        self.play: dict[str, Any] = {"enabled": False}
        self.inputs: dict[str, Any] = {}
        """Trigger key, key map, serial port and the triggers forwarded (set by ``Dashboard``/``TriggerForwarder``)."""
        self.quality: dict[str, dict[str, Any]] = {}
        """Per encoder stream: the last ``history_trs`` volumes' motion, FD, exclusion and processing time, and
        the session's registration to the weights' space."""
        self.overlays: dict[str, bytes] = {}
        """Per encoder stream: the newest alignment overlay PNG it published (``VolumeQuality.overlay_png``)."""
        self.t0 = time.monotonic()
        self._frame_times: list[float] = []

    def _bump(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    # writers (subscriber thread) -------------------------------------------------------------------
    def on_rejected(self) -> None:
        """A malformed message on a subscribed stream (the channel counts it by code too)."""
        with self.lock:
            self._bump("rejected")

    def on_frame(self, f: Frame) -> None:
        px = np.ascontiguousarray(f.pixels, dtype=np.uint8)
        h, w = px.shape[:2]
        c = px.shape[2] if px.ndim == 3 else 1
        now = time.monotonic()
        with self.lock:
            self._bump("frame")
            self.frame_pixels = px.tobytes()
            self.frame_header = struct.pack("<IIHHI", 1, f.seq, h, w, c)
            self._frame_times = [t for t in self._frame_times if now - t < 2.0] + [now]
            self.frame = {"seq": f.seq, "episode": f.episode, "step": f.step, "action": f.action,
                          "controller": f.controller, "reward": f.reward, "session_id": f.session_id,
                          "t_ns": f.t_ns, "received_ns": time.monotonic_ns(), "terminated": f.terminated}
            self.emulator.setdefault("score", 0.0)
            if self.emulator.get("session_id") != f.session_id:
                self.emulator.update(session_id=f.session_id, score=0.0, episode=f.episode)
            if self.emulator.get("episode") != f.episode:
                self.emulator.update(episode=f.episode, score=0.0)
            self.emulator["score"] += f.reward
            self.frame_version += 1

    def on_status(self, s: Status) -> None:
        with self.lock:
            self._bump("status")
            if s.service == "emulator" or "emulator" in s.service:
                self.emulator.update(service=s.service, steps=s.steps, rejected=s.rejected, clients=dict(s.clients),
                                     triggers=s.triggers, status_session=s.session_id)
            self.version += 1

    def on_game_info(self, info: dict[str, Any]) -> None:
        with self.lock:
            self.game = info
            self.version += 1

    def on_activation(self, a: Activation) -> None:
        now_ns = time.monotonic_ns()
        with self.lock:
            self._bump("activation")
            agent = self._agent(a.agent_id)
            if agent is None:
                return
            agent["model"] = a.model
            cond = agent["conditions"].setdefault(a.condition, {})
            times = [t for t in cond.get("_times", []) if now_ns - t < 5e9] + [now_ns]
            cond.update(_times=times, activations=cond.get("activations", 0) + 1, pooling=a.pooling,
                        layers=list(a.layers)[:64], dim=int(a.vectors.shape[-1]) if a.vectors.ndim else 0,
                        frame_seq=max(a.frame_seqs) if a.frame_seqs else None,
                        # same host: agent and emulator share CLOCK_MONOTONIC
                        staleness_ms=(a.t_ns - a.frame_t_ns) / 1e6 if a.frame_t_ns else None,
                        rate_hz=(len(times) - 1) / ((times[-1] - times[0]) / 1e9) if len(times) > 1 else None)
            self.version += 1

    def on_action(self, a: Action) -> None:
        with self.lock:
            self._bump("action")
            agent = self._agent(a.agent_id)
            if agent is None:
                return
            cond = agent["conditions"].setdefault(a.condition, {})
            cond.update(action=a.action, probs=[_finite(p) for p in a.probs[:64]], decided_seq=a.frame_seq,
                        latency_ms=a.latency_ns / 1e6 if a.latency_ns else None,
                        decisions=cond.get("decisions", 0) + 1)
            self.version += 1

    def _agent(self, agent_id: str) -> dict[str, Any] | None:
        if agent_id not in self.agents:
            if len(self.agents) >= MAX_STREAMS:
                self._bump("dropped_stream")
                return None
            self.agents[agent_id] = {"model": "", "conditions": {}}
        return self.agents[agent_id]

    def on_trigger(self, t: Trigger) -> None:
        now = time.monotonic()
        with self.lock:
            self._bump("trigger")
            self._trigger_times = (self._trigger_times + [now])[-16:]
            gaps = np.diff(self._trigger_times)
            self.scanner.update(tr_index=t.tr_index, triggers=self.scanner["triggers"] + 1, last_trigger=now,
                                tr_s=float(np.median(gaps)) if len(gaps) else None, source=t.source)
            self.version += 1

    def on_bold(self, b: BoldVolume) -> None:
        with self.lock:
            self._bump("bold")
            self.scanner.update(volumes=self.scanner["volumes"] + 1, bold_tr=b.tr_index, acq_time_s=b.acq_time_s,
                                run=b.run, bold_shape=list(b.data.shape), bold_source=b.source)
            self.version += 1

    def on_prediction(self, p: Prediction) -> None:
        key = f"{p.agent_id} · {p.condition}" if p.condition else p.agent_id
        with self.lock:
            self._bump("prediction")
            stream = self.streams.get(key)
            if stream is None:
                if len(self.streams) >= MAX_STREAMS:
                    self._bump("dropped_stream")
                    return
                stream = self.streams[key] = {"agent_id": p.agent_id, "condition": p.condition, "trs": OrderedDict()}
            stream["roi_names"] = list(p.roi_names)
            stream["scores"] = [_finite(x) for x in p.roi_scores]
            stream["last_tr"] = p.tr_index
            trs: OrderedDict = stream["trs"]
            trs[p.tr_index] = ([_finite(x) for x in p.roi_predicted], [_finite(x) for x in p.roi_measured])
            trs.move_to_end(p.tr_index)
            while len(trs) > self.history_trs:
                trs.popitem(last=False)
            self.version += 1

    def on_play(self, **info: Any) -> None:
        with self.lock:
            self.play.update(info)
            self.version += 1

    def on_inputs(self, **info: Any) -> None:
        with self.lock:
            self.inputs.update(info)
            self.version += 1

    def on_quality(self, q: VolumeQuality) -> None:
        key = f"{q.agent_id} · {q.condition}" if q.condition else q.agent_id
        with self.lock:
            self._bump("quality")
            stream = self.quality.get(key)
            if stream is None:
                if len(self.quality) >= MAX_STREAMS:
                    self._bump("dropped_stream")
                    return
                stream = self.quality[key] = {"trs": OrderedDict(), "reasons": {}}
            params = [_finite(x) for x in q.params[:6]]
            new = q.tr_index not in stream["trs"]  # a volume re-sent counts its reason once
            stream["trs"][q.tr_index] = (params, _finite(q.fd_mm), bool(q.excluded), _finite(q.process_ms),
                                         _finite(q.preprocess_ms))
            stream["trs"].move_to_end(q.tr_index)
            while len(stream["trs"]) > self.history_trs:
                stream["trs"].popitem(last=False)
            if new and q.excluded and q.reason:
                for r in q.reason.split(";")[:8]:  # "FD 1.20 mm > 0.9 mm; warm-up" → fd, warm-up
                    kind = re.match(r"[^0-9:(×]*", r.strip()).group(0).strip().lower()[:60] or "other"
                    stream["reasons"][kind] = stream["reasons"].get(kind, 0) + 1
            stream.update(excluded_total=q.excluded_total, volumes=q.volumes, last_tr=q.tr_index)
            if q.aligned != -1 or q.registration or "aligned" not in stream:  # the newest registration state
                stream.update(aligned=q.aligned if q.aligned in (-1, 0, 1) else -1, registration=q.registration[:300],
                              align_mm=_finite(q.align_mm), align_deg=_finite(q.align_deg),
                              align_match_r=_finite(q.align_match_r))
            if q.overlay_png:
                if len(q.overlay_png) <= OVERLAY_MAX_BYTES and q.overlay_png[:8] == PNG_MAGIC:
                    self.overlays[key] = bytes(q.overlay_png)
                    stream["overlay"] = stream.get("overlay", 0) + 1  # a version: the page reloads the image
                    stream["overlay_bytes"] = len(q.overlay_png)
                else:
                    self._bump("bad_overlay")
            self.version += 1

    def _quality_snapshot(self) -> dict[str, Any]:
        """Call with the lock held. Per stream: parallel lists over the TRs kept, and summary numbers."""
        out = {}
        for key, s in self.quality.items():
            trs = list(s["trs"].items())
            ms = [v[3] for _, v in trs if v[3] is not None]
            out[key] = {"tr": [t for t, _ in trs], "params": [v[0] for _, v in trs], "fd": [v[1] for _, v in trs],
                        "excluded": [v[2] for _, v in trs], "process_ms": [v[3] for _, v in trs],
                        "preprocess_ms": [v[4] for _, v in trs], "excluded_total": s.get("excluded_total", 0),
                        "volumes": s.get("volumes", 0), "last_tr": s.get("last_tr"), "reasons": dict(s["reasons"]),
                        "process_ms_p50": float(np.median(ms)) if ms else None,
                        "process_ms_max": float(max(ms)) if ms else None,
                        "aligned": s.get("aligned", -1), "registration": s.get("registration", ""),
                        "align_mm": s.get("align_mm"), "align_deg": s.get("align_deg"),
                        "align_match_r": s.get("align_match_r"), "overlay": s.get("overlay", 0),
                        "overlay_bytes": s.get("overlay_bytes", 0)}
        return out

    def overlay(self, key: str) -> bytes | None:
        """The newest alignment overlay PNG of encoder stream ``key`` (None before one came)."""
        with self.lock:
            return self.overlays.get(key)

    # readers (web server) -------------------------------------------------------------------------
    def frame_message(self) -> tuple[int, bytes] | None:
        with self.lock:
            if not self.frame_version:
                return None
            return self.frame_version, self.frame_header + self.frame_pixels

    def _frame_fps(self) -> float | None:
        """Frames per second over the last 2 s of arrivals (None before two); call with the lock held."""
        t = self._frame_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters and gauges for /metrics (services.plumbing.metrics.SnapshotCollector)."""
        with self.lock:
            counts = dict(self.counts)
            tr_index = self.scanner["tr_index"]
            n_agents, n_streams = len(self.agents), len(self.streams)
            fps = self._frame_fps()
        rejected = counts.pop("rejected", 0)
        dropped = counts.pop("dropped_stream", 0)
        return {"counters": {"messages_received": counts, "messages_rejected": rejected,
                             "streams_dropped": dropped},
                "gauges": {"agents": n_agents, "prediction_streams": n_streams,
                           "frame_fps": math.nan if fps is None else fps,
                           "tr_index": math.nan if tr_index is None else tr_index},
                "labels": {"messages_received": "kind"}}

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            scanner = dict(self.scanner)
            last = scanner.pop("last_trigger", None)
            scanner["since_trigger_s"] = now - last if last is not None else None
            agents = {aid: {"model": a["model"], "conditions": {c: {k: v for k, v in d.items() if not k.startswith("_")}
                                                               for c, d in a["conditions"].items()}}
                      for aid, a in self.agents.items()}
            streams = {}
            for key, s in self.streams.items():
                trs = list(s["trs"].items())
                streams[key] = {"agent_id": s["agent_id"], "condition": s["condition"], "roi_names": s["roi_names"],
                                "scores": s["scores"], "last_tr": s["last_tr"], "tr": [t for t, _ in trs],
                                "predicted": [p for _, (p, _) in trs], "measured": [m for _, (_, m) in trs]}
            fps = self._frame_fps()
            frame = dict(self.frame)
            if frame:
                frame["age_ms"] = (time.monotonic_ns() - frame["t_ns"]) / 1e6
            return {"version": self.version, "uptime_s": now - self.t0, "game": self.game, "frame": frame,
                    "frame_fps": fps, "emulator": dict(self.emulator), "agents": agents, "streams": streams,
                    "scanner": scanner, "counts": dict(self.counts), "play": dict(self.play),
                    "inputs": json.loads(json.dumps(self.inputs, default=str)), "quality": self._quality_snapshot()}


# --- the subscriber thread ---------------------------------------------------------------------------


class Subscriber:
    """Owns every SUB socket; drains them without blocking anyone and updates ``LiveState``."""

    def __init__(self, cfg: DashboardConfig, state: LiveState, ctx: zmq.Context):
        self.cfg = cfg
        self.state = state
        self.ctx = ctx
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dashboard-sub", daemon=True)
        self._session_asked: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.ident is not None:  # started (a failed Dashboard.start may stop what never ran)
            self.thread.join(5)

    def _run(self) -> None:
        cfg = self.cfg
        channels: list[Channel] = []
        # frames: tiny HWM, we only want the newest; the rest: room for bursts of small messages
        if cfg.frames:
            s = make_socket(self.ctx, zmq.SUB, hwm=4, linger_ms=0)
            # the emulator re-publishes the triggers it records (keyboard, serial): the TR clock, unless the
            # frames endpoint is also a data endpoint here (live: subscribed there already)
            topics = (TOPIC_FRAME, TOPIC_HEARTBEAT) + (() if cfg.frames in cfg.bold else (TOPIC_TRIGGER,))
            for topic in topics:
                s.setsockopt(zmq.SUBSCRIBE, topic)
            secure_connect(s, cfg.frames, cfg.curve)
            channels.append(Channel(s, Decoder([Frame, Status, Trigger])))
        data_eps = [*cfg.activations, *cfg.bold, *cfg.predictions]
        if data_eps:
            s = make_socket(self.ctx, zmq.SUB, hwm=1000, linger_ms=0)
            for topic in (TOPIC_ACTIVATION, TOPIC_ACTION, TOPIC_BOLD, TOPIC_TRIGGER, TOPIC_PREDICTION, TOPIC_QUALITY,
                          TOPIC_HEARTBEAT):
                s.setsockopt(zmq.SUBSCRIBE, topic)
            for ep in data_eps:
                secure_connect(s, ep, cfg.curve)
            channels.append(Channel(s, Decoder([Activation, Action, BoldVolume, Trigger, Prediction, VolumeQuality,
                                                Status])))
        poller = zmq.Poller()
        for ch in channels:
            poller.register(ch.sock, zmq.POLLIN)
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(100))
                for ch in channels:
                    if ch.sock in events:
                        self._drain(ch)
        finally:
            for ch in channels:
                ch.sock.close(linger=0)

    def _drain(self, ch: Channel) -> None:
        newest_frame: Frame | None = None
        for _ in range(MAX_DRAIN):
            try:
                parts = ch.recv_parts(zmq.NOBLOCK)
            except zmq.Again:
                break
            _, body = split_topic(parts)
            msg = ch.decode(body)
            if msg is None:
                self.state.on_rejected()  # malformed: never raised
            elif isinstance(msg, Frame):
                newest_frame = msg  # only the newest frame of a burst is worth decoding into the page
            else:
                self._dispatch(msg)
        if newest_frame is not None:
            self.state.on_frame(newest_frame)
            if newest_frame.session_id != self._session_asked:
                self._session_asked = newest_frame.session_id
                self._ask_game_info()

    def _dispatch(self, msg: Any) -> None:
        st = self.state
        if isinstance(msg, Activation):
            st.on_activation(msg)
        elif isinstance(msg, Action):
            st.on_action(msg)
        elif isinstance(msg, Prediction):
            st.on_prediction(msg)
        elif isinstance(msg, Trigger):
            st.on_trigger(msg)
        elif isinstance(msg, VolumeQuality):
            st.on_quality(msg)
        elif isinstance(msg, BoldVolume):
            st.on_bold(msg)
        elif isinstance(msg, Status):
            st.on_status(msg)

    def _ask_game_info(self) -> None:
        """One Hello/Welcome/Bye as an observer: the game's name, mode and action names (short timeout)."""
        if not self.cfg.control:
            return
        from protocols import Bye, Hello, Welcome

        dealer = make_socket(self.ctx, zmq.DEALER, linger_ms=100)
        ch = Channel(dealer, Decoder([Welcome]))
        try:
            secure_connect(dealer, self.cfg.control, self.cfg.curve)
            ch.send(Hello(client_id="dashboard", role="observer", model="dashboard"))
            if dealer.poll(1000):
                w = ch.decode(ch.recv_parts())
                if isinstance(w, Welcome):
                    self.state.on_game_info({"game": w.game, "mode": w.mode, "action_meanings": list(w.action_meanings),
                                             "session_id": w.session_id, "step_hz": w.step_hz,
                                             "frameskip": w.frameskip, "sticky": w.repeat_action_probability})
                    ch.send(Bye(client_id="dashboard"))
        except (zmq.ZMQError, SecurityError) as e:
            log.warning("dashboard: could not ask the emulator for game info: %s", e)
        finally:
            dealer.close(linger=100)


# --- keyboard play ----------------------------------------------------------------------------------


class KeyboardPlayer:
    """Joins the emulator as controller ``human``; answers each new frame with the held keys' action."""

    def __init__(self, cfg: DashboardConfig, state: LiveState, ctx: zmq.Context, client_id: str = "human"):
        self.cfg = cfg
        self.state = state
        self.ctx = ctx
        self.client_id = client_id
        self.stop_event = threading.Event()
        self._buttons: set[str] = set()
        self._keys: list[str] = []
        self._lock = threading.Lock()
        self.actions_sent = 0
        self.thread = threading.Thread(target=self._run, name="dashboard-play", daemon=True)

    def set_buttons(self, buttons: set[str]) -> None:
        """Logical buttons held (UP/DOWN/LEFT/RIGHT/FIRE; older pages send these)."""
        with self._lock:
            self._buttons = set(buttons) & {"UP", "DOWN", "LEFT", "RIGHT", "FIRE"}
            self._keys = []

    def set_keys(self, keys: list[str]) -> None:
        """Browser keys held, in the order pressed (the trigger key is dropped: never a game action)."""
        trig = normalize_key(self.cfg.inputs.trigger_key) if self.cfg.inputs.trigger_key else None
        with self._lock:
            self._keys = [k for k in keys if normalize_key(k) != trig]
            self._buttons = set()

    def _action(self, meanings: list[str]) -> tuple[int, str]:
        with self._lock:
            keys, buttons = list(self._keys), set(self._buttons)
        if keys or not buttons:
            return action_for_held(keys, meanings, self.cfg.inputs.keymap, self.cfg.inputs.trigger_key)
        return action_for_keys(buttons, meanings), "+".join(sorted(buttons))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.ident is not None:  # started (a failed Dashboard.start may stop what never ran)
            self.thread.join(5)

    def _run(self) -> None:
        from services.plumbing.client import GameClient

        self.state.on_play(enabled=True, client_id=self.client_id, role="joining", buttons=[], action=None)
        client = GameClient(self.client_id, role="controller", frames_endpoint=self.cfg.frames,
                            control_endpoint=self.cfg.control, model="keyboard", ctx=self.ctx, curve=self.cfg.curve)
        try:
            while not self.stop_event.is_set():
                try:
                    client.join(timeout_s=2.0)
                    break
                except TimeoutError:
                    self.state.on_play(role="no emulator")
            last: tuple[str, int] = ("", -1)
            while not self.stop_event.is_set():
                frame = client.next_frame(timeout_ms=100)
                if frame is None or client.welcome is None:
                    continue
                if frame.session_id == last[0] and frame.seq <= last[1]:
                    continue  # lockstep re-publishes a pending frame: answer it once
                last = (frame.session_id, frame.seq)
                meanings = client.welcome.action_meanings
                action, chosen_by = self._action(meanings)
                try:
                    client.act(frame, action)
                    self.actions_sent += 1
                except zmq.Again:
                    continue
                unplayable = sorted(k for k, a in self.cfg.inputs.keymap.items() if a not in meanings)
                self.state.on_play(role=client.role, buttons=chosen_by, action=action,
                                   action_name=meanings[action], frame_seq=frame.seq, actions_sent=self.actions_sent,
                                   errors=client.stats.errors[-3:], unplayable_keys=unplayable)
        finally:
            client.close()


# --- scanner triggers from the participant's computer -----------------------------------------------


class TriggerForwarder:
    """Keyboard and serial pulses → ``Trigger`` messages to the emulator, TR index counted from 0.

    ``pulse`` is called where the pulse arrives (the web server's event loop, the serial reader's thread)
    with the host monotonic time stamped there; it never blocks: the pulse is queued for this object's
    thread, which owns the DEALER socket (ZMQ sockets are not thread-safe). A pulse closer than
    ``min_interval_s`` to the previous accepted one is dropped and counted (key repeat, a slice-wise
    sync box, a flood)."""

    def __init__(self, cfg: DashboardConfig, state: LiveState, ctx: zmq.Context):
        import queue

        self.cfg = cfg
        self.state = state
        self.ctx = ctx
        self.min_ns = int(cfg.inputs.min_trigger_interval_s * 1e9)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._last_ns: int | None = None
        self.next_tr = 0
        self.sent = 0
        self.lost = 0
        self.debounced = 0
        self.by_source: dict[str, int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dashboard-triggers", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._queue.put(None)
        if self.thread.ident is not None:
            self.thread.join(5)

    def pulse(self, source: str, t_ns: int) -> int | None:
        """Accept one pulse stamped ``t_ns`` (host monotonic ns); its TR index, or None when debounced."""
        with self._lock:
            if self._last_ns is not None and t_ns - self._last_ns < self.min_ns:
                self.debounced += 1
                self.state.on_inputs(triggers_debounced=self.debounced)
                return None
            self._last_ns = t_ns
            tr, self.next_tr = self.next_tr, self.next_tr + 1
            self.by_source[source] = self.by_source.get(source, 0) + 1
            self.state.on_inputs(triggers_by_source=dict(self.by_source), last_trigger_tr=tr,
                                 last_trigger_source=source)
            self._queue.put(Trigger(tr_index=tr, t_ns=t_ns, source=source, host_clock=True))  # in TR order
        return tr

    def _run(self) -> None:
        dealer = make_socket(self.ctx, zmq.DEALER, hwm=10_000, linger_ms=200)
        ch = Channel(dealer)
        try:
            secure_connect(dealer, self.cfg.control, self.cfg.curve)
            while True:
                msg = self._queue.get()
                if msg is None:
                    break
                try:
                    ch.send(msg, flags=zmq.NOBLOCK)
                    self.sent += 1
                    self.state.on_inputs(triggers_sent=self.sent)
                except zmq.Again:  # 10 000 queued for an absent emulator: this one is lost, counted
                    self.lost += 1
                    self.state.on_inputs(triggers_lost=self.lost)
        finally:
            dealer.close(linger=200)


# --- brain map -----------------------------------------------------------------------------------------


def load_brain_map(cfg: DashboardConfig, n_slices: int = 8) -> dict[str, Any] | None:
    """Axial slices of the ROI label volume (and its brain mask) for the browser to colour by score.

    The volume is reoriented to RAS first, so rows run anterior (top) → posterior and columns
    left → right (neurological view) whatever the file's voxel order.
    """
    import nibabel as nib

    names: dict[int, str] = {}
    if cfg.atlas:
        img = nib.load(cfg.atlas)
        if len(img.shape) == 4:
            img = img.slicer[..., 0]
        img = nib.as_closest_canonical(img)
        labels = np.asarray(img.dataobj).astype(np.int32)
        mask = labels > 0
        if cfg.atlas_labels:
            names = read_label_table(cfg.atlas_labels)
    elif cfg.weights:
        from encoders.weights import EncodingWeights

        w = EncodingWeights.load(cfg.weights)
        if w.roi_labels is None:
            return None
        both = np.stack([w.to_volume(w.roi_labels.astype(np.float32)), w.mask.astype(np.float32)], axis=-1)
        img = nib.as_closest_canonical(nib.Nifti1Image(both, w.affine))
        labels = np.asarray(img.dataobj)[..., 0].round().astype(np.int32)
        mask = np.asarray(img.dataobj)[..., 1] > 0.5
        names = dict(w.roi_names)
    else:
        return None
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    if not len(zs):
        return None
    picks = np.unique(np.linspace(zs[0], zs[-1], n_slices + 2)[1:-1].round().astype(int))
    z_mm = [float((img.affine @ [0, 0, z, 1])[2]) for z in picks]
    present = sorted(int(v) for v in np.unique(labels) if v)
    return {"shape": [int(labels.shape[0]), int(labels.shape[1])], "z": [int(z) for z in picks],
            "z_mm": [round(z, 1) for z in z_mm],
            "slices": [np.flipud(labels[:, :, z].T).ravel().tolist() for z in picks],
            "mask": [np.flipud(mask[:, :, z].T).astype(np.uint8).ravel().tolist() for z in picks],
            "names": {str(k): names.get(k, f"roi{k}") for k in present}}


def read_label_table(path: str | Path) -> dict[int, str]:
    """``index<TAB>name`` TSV (header optional) → {label: name}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0].strip().isdigit():
            out[int(cols[0])] = cols[1].strip()
    return out


# --- the web server -----------------------------------------------------------------------------------


def create_app(cfg: DashboardConfig, state: LiveState, player: KeyboardPlayer | None = None,
               triggers: TriggerForwarder | None = None):
    app = FastAPI(title="neuroarcade dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    brain_map = load_brain_map(cfg)
    static_files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}

    def token_ok(query: dict, headers, cookies: dict) -> bool:
        if not cfg.token:
            return True
        auth = headers.get("authorization", "")
        given = [query.get("token", ""), headers.get("x-neuroarcade-token", ""), cookies.get(TOKEN_COOKIE, ""),
                 auth[7:] if auth.lower().startswith("bearer ") else ""]
        return any(g and secrets.compare_digest(g, cfg.token) for g in given)

    def guard(request: Request) -> None:
        if not token_ok(request.query_params, request.headers, request.cookies):
            raise HTTPException(status_code=401, detail="token required: open /?token=...")

    @app.get("/")
    def index(request: Request):
        guard(request)
        resp = FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})
        if cfg.token:
            resp.set_cookie(TOKEN_COOKIE, cfg.token, httponly=True, samesite="strict")
        return resp

    @app.get("/static/{name}")
    def static(name: str, request: Request):
        guard(request)
        if name not in static_files:
            raise HTTPException(status_code=404)
        return FileResponse(static_files[name], headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    def api_state(request: Request):
        guard(request)
        return JSONResponse(state.snapshot())

    metrics_registry = snapshot_registry("dashboard", state.metrics_snapshot)

    @app.get("/metrics")
    def metrics(request: Request):
        guard(request)  # a scraper passes the token as "Authorization: Bearer …" when one is set
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/brainmap")
    def api_brainmap(request: Request):
        guard(request)
        return JSONResponse(brain_map)

    @app.get("/api/frame.png")
    def api_frame(request: Request):
        guard(request)
        msg = state.frame_message()
        if msg is None:
            raise HTTPException(status_code=404, detail="no frame yet")
        return Response(_png(msg[1]), media_type="image/png")

    @app.get("/api/overlay.png")
    def api_overlay(request: Request, stream: str = ""):
        """The newest alignment overlay of encoder stream ``stream`` (a key of the snapshot's ``quality``)."""
        guard(request)
        png = state.overlay(stream)
        if png is None:
            raise HTTPException(status_code=404, detail=f"no alignment overlay from stream {stream!r} yet")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        if not token_ok(websocket.query_params, websocket.headers, websocket.cookies):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        reader = asyncio.create_task(_read_keys(websocket))
        frame_dt, state_dt = 1.0 / max(cfg.max_fps, 0.1), 1.0 / max(cfg.state_hz, 0.1)
        sent_frame, next_state = 0, 0.0
        try:
            while not reader.done():
                now = time.monotonic()
                msg = state.frame_message()
                if msg is not None and msg[0] != sent_frame:
                    sent_frame = msg[0]
                    await websocket.send_bytes(msg[1])
                if now >= next_state:  # always: the TR clock and ages move even when no message came
                    await websocket.send_text(json.dumps(state.snapshot(), allow_nan=False, default=_json_default))
                    next_state = now + state_dt
                await asyncio.sleep(frame_dt)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            reader.cancel()

    async def _read_keys(websocket: WebSocket) -> None:
        try:
            while True:
                text = await websocket.receive_text()
                t_arrival = time.monotonic_ns()  # a trigger keypress is stamped here, on arrival
                if len(text) > 4096:
                    continue
                try:
                    msg = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if msg.get("type") == "trigger":
                    if triggers is not None and str(msg.get("key", "")) and \
                            normalize_key(str(msg.get("key"))) == normalize_key(cfg.inputs.trigger_key):
                        triggers.pulse("keyboard", t_arrival)
                elif msg.get("type") == "keys" and player is not None:
                    keys = msg.get("keys")
                    if isinstance(keys, list):
                        player.set_keys([str(k)[:32] for k in keys[:8]])
                    elif isinstance(msg.get("buttons"), list):
                        player.set_buttons({str(b) for b in msg["buttons"][:8]})
        except Exception:  # disconnect ends the session's reader
            return

    return app


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _finite(o)
    raise TypeError(type(o).__name__)


def _png(frame_message: bytes) -> bytes:
    from io import BytesIO

    from PIL import Image

    _, _, h, w, c = struct.unpack_from("<IIHHI", frame_message)
    px = np.frombuffer(frame_message, dtype=np.uint8, offset=16).reshape(h, w, c)
    buf = BytesIO()
    Image.fromarray(px[..., :3] if c >= 3 else px[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


# --- running it ----------------------------------------------------------------------------------------


class Dashboard:
    """Subscriber thread + optional keyboard player + uvicorn server; ``start()``/``stop()`` or ``run()``."""

    def __init__(self, cfg: DashboardConfig, ctx: zmq.Context | None = None):
        check_access(cfg)
        check_endpoints(cfg)
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.state = LiveState(cfg.history_trs)
        self.subscriber = Subscriber(cfg, self.state, self.ctx)
        cfg.inputs.check()
        self.player = KeyboardPlayer(cfg, self.state, self.ctx) if cfg.play else None
        # the page's trigger key is the participant's computer's (play mode); a serial line is wherever it is given
        forward = bool(cfg.control) and ((cfg.play and bool(cfg.inputs.trigger_key)) or bool(cfg.inputs.serial.port))
        self.triggers = TriggerForwarder(cfg, self.state, self.ctx) if forward else None
        self.serial: SerialTriggerReader | None = None
        if cfg.inputs.serial.port and self.triggers is not None:
            fwd = self.triggers
            self.serial = SerialTriggerReader(cfg.inputs.serial, lambda t_ns: fwd.pulse("serial", t_ns))
        self.state.on_inputs(trigger_key=normalize_key(cfg.inputs.trigger_key) if cfg.play and forward else "",
                             keymap=[[k, a] for k, a in cfg.inputs.keymap.items()], serial_port=cfg.inputs.serial.port,
                             min_trigger_interval_s=cfg.inputs.min_trigger_interval_s, triggers_sent=0,
                             triggers_debounced=0, triggers_by_source={})
        self.app = create_app(cfg, self.state, self.player, self.triggers)
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.cfg.port}/" + (f"?token={self.cfg.token}" if self.cfg.token else "")

    def _make_server(self):
        import uvicorn

        config = uvicorn.Config(self.app, host=self.cfg.host, port=self.cfg.port, log_level="warning",
                                ws="websockets-sansio", lifespan="off", ws_ping_interval=20)
        return uvicorn.Server(config)

    def _start_streams(self) -> None:
        if self.serial is not None:
            self.serial.start()  # first: a missing port is an error before anything else runs
        self.subscriber.start()
        self.subscriber.ready.wait(5)
        if self.triggers is not None:
            self.triggers.start()
        if self.player is not None:
            self.player.start()

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve in a background thread (tests, the orchestration commands)."""
        self._start_streams()
        self._server = self._make_server()
        self._thread = threading.Thread(target=self._server.run, name="dashboard-http", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > t_end or not self._thread.is_alive():
                raise RuntimeError(f"dashboard did not start on {self.cfg.host}:{self.cfg.port}")
            time.sleep(0.02)

    def run(self) -> None:
        """Serve in this thread until Ctrl-C."""
        self._start_streams()
        self._server = self._make_server()
        try:
            self._server.run()
        finally:
            self._stop_streams()

    def _stop_streams(self) -> None:
        if self.serial is not None:
            self.serial.stop()
            self.state.on_inputs(serial=dict(self.serial.counts.__dict__))
        if self.player is not None:
            self.player.stop()
        if self.triggers is not None:
            self.triggers.stop()
        self.subscriber.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._stop_streams()
