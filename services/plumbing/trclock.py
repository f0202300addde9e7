"""TR clock of a live session: scanner triggers when there are any, the export folder's arrival times otherwise.

    emulator frames PUB (trigger: every pulse it recorded) ─┐
    scanner PUB (bold: volumes as they appear in the folder) ┴─ SUB ─► TrClock ─► fallback Trigger ─► emulator control

The TR clock prefers real pulses: the sync box's keypress on the participant's page, a serial line,
the simulated scanner (``Trigger.source`` ``keyboard`` / ``serial`` / ``simulated``), all recorded by
the emulator on its clock and re-published on its frames PUB. While none has come, each volume's
arrival in the export folder stands in: volume k complete at time a_k means TR k started about one TR
earlier, so a ``Trigger(tr_index=k, t_ns=a_k - TR, source="folder", host_clock=True)`` goes to the
emulator (it records it, the encoders and the dashboard get it from there). That estimate is late by
the export lag (reconstruction + transfer), which is why triggers win whenever present: once a real
pulse has been seen, no more fallback triggers are sent.

Either way the arrival times are kept beside the triggers: ``TrTimingReport`` gives, per TR, the
trigger time and source and the volume's arrival, and the export lag (arrival - trigger - TR) at p50
and max, so a session's summary says how far the folder's clock lagged the scanner's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols import TRIGGER_MAX_AGE_S, BoldVolume, Decoder, Trigger
from services.plumbing.security import CurveConfig, check_connect, secure_connect

log = logging.getLogger("neuroarcade.trclock")

FOLDER = "folder"
"""``Trigger.source`` of the fallback pulses derived from the export folder's arrival times."""


@dataclass
class TrTimingReport:
    """How a live session's TRs were timed, and how the export folder's arrival times compare."""

    timed_by: str
    """``triggers`` (real pulses), ``folder`` (the fallback only), ``mixed`` (fallback, then pulses), ``none``."""
    tr_s: float
    """Nominal TR (the weights'), seconds."""
    triggers: int
    """Real pulses seen (every source but the fallback)."""
    by_source: dict[str, int]
    """Pulses per ``Trigger.source``, the fallback's (``folder``) included."""
    fallback_triggers: int
    """Triggers sent from the folder's arrival times."""
    volumes: int
    """Volumes that arrived from the export folder."""
    paired: int
    """Volumes with a real pulse of the same TR index (the lag below is over these)."""
    export_lag_ms_p50: float | None
    """Median of arrival − (trigger + TR): how long after its TR ended a volume appeared in the folder (ms)."""
    export_lag_ms_max: float | None
    """Largest such lag, ms."""
    trigger_interval_s_p50: float | None
    """Median interval between consecutive real pulses (the TR the scanner actually ran), seconds."""
    rows: list[dict] = field(default_factory=list)
    """Per TR: ``tr_index``, ``trigger_ns``, ``trigger_source``, ``arrival_ns``, ``export_lag_ms`` (None where absent)."""

    def summary(self) -> dict:
        """Everything but the per-TR rows (for a session summary)."""
        return {k: v for k, v in self.__dict__.items() if k != "rows"}

    def write_tsv(self, path: str | Path) -> Path:
        """One row per TR (``tr_timing.tsv``): trigger time and source beside the volume's arrival and the lag."""
        path = Path(path)
        cols = ["tr_index", "trigger_ns", "trigger_source", "arrival_ns", "export_lag_ms"]
        lines = ["\t".join(cols)] + ["\t".join("n/a" if r[c] is None else (f"{r[c]:.3f}" if isinstance(r[c], float)
                                                                           else str(r[c])) for c in cols)
                                     for r in self.rows]
        path.write_text("\n".join(lines) + "\n")
        return path


class TrClock:
    """The TR clock's logic without sockets: feed pulses and arrivals; it says when to send a fallback trigger."""

    def __init__(self, tr_s: float, fallback: bool = True):
        self.tr_s = float(tr_s)
        self.tr_ns = int(round(self.tr_s * 1e9))
        self.fallback = fallback
        self.triggers: dict[int, tuple[int, str]] = {}
        """TR index → (emulator-recorded ns, source) of the newest pulse of that index."""
        self.arrivals: dict[int, int] = {}
        """TR index → host monotonic ns when the volume arrived (first arrival)."""
        self.by_source: dict[str, int] = {}
        self.fallback_sent: dict[int, int] = {}
        """TR index → t_ns of the fallback trigger sent for it."""
        self.real_seen = False
        self.mixed = False

    def on_trigger(self, tr_index: int, t_ns: int, source: str) -> None:
        """A pulse the emulator recorded (its re-publication)."""
        self.by_source[source] = self.by_source.get(source, 0) + 1
        if source != FOLDER:
            if not self.real_seen and self.fallback_sent:
                self.mixed = True
                log.warning("trclock: scanner triggers (%s) started after %d folder-timed TRs; from now on TRs follow "
                            "the triggers", source, len(self.fallback_sent))
            self.real_seen = True
            self.triggers[tr_index] = (t_ns, source)
        else:
            self.triggers.setdefault(tr_index, (t_ns, source))

    def on_volume(self, tr_index: int, t_ns: int) -> Trigger | None:
        """Volume ``tr_index`` arrived at ``t_ns``; the fallback trigger to send for it, if any."""
        if tr_index < 0 or tr_index in self.arrivals:
            return None
        self.arrivals[tr_index] = t_ns
        if not self.fallback or self.real_seen or tr_index in self.triggers:
            return None
        t = t_ns - self.tr_ns
        earlier = [v for k, v in self.fallback_sent.items() if k < tr_index]
        if earlier:  # volumes that arrive in a burst still get TRs of some length, in order
            t = max(t, max(earlier) + 1)
        self.fallback_sent[tr_index] = t
        return Trigger(tr_index=tr_index, t_ns=t, source=FOLDER, host_clock=True)

    def report(self) -> TrTimingReport:
        real = {k: v for k, v in self.triggers.items() if v[1] != FOLDER}
        lags = [(self.arrivals[k] - real[k][0] - self.tr_ns) / 1e6 for k in sorted(real) if k in self.arrivals]
        ks = sorted(real)
        gaps = [(real[b][0] - real[a][0]) / 1e9 for a, b in zip(ks, ks[1:]) if b == a + 1]
        rows = []
        for k in sorted(set(self.triggers) | set(self.arrivals)):
            trig = self.triggers.get(k)
            arr = self.arrivals.get(k)
            lag = (arr - trig[0] - self.tr_ns) / 1e6 if trig is not None and arr is not None and trig[1] != FOLDER \
                else None
            rows.append({"tr_index": k, "trigger_ns": trig[0] if trig else None,
                         "trigger_source": trig[1] if trig else None, "arrival_ns": arr, "export_lag_ms": lag})
        timed_by = ("mixed" if self.mixed else "triggers") if self.real_seen else (FOLDER if self.fallback_sent
                                                                                   else "none")
        return TrTimingReport(
            timed_by=timed_by, tr_s=self.tr_s, triggers=sum(n for s, n in self.by_source.items() if s != FOLDER),
            by_source=dict(self.by_source), fallback_triggers=len(self.fallback_sent), volumes=len(self.arrivals),
            paired=len(lags), export_lag_ms_p50=float(np.median(lags)) if lags else None,
            export_lag_ms_max=float(np.max(lags)) if lags else None,
            trigger_interval_s_p50=float(np.median(gaps)) if gaps else None, rows=rows)


@dataclass
class TrClockConfig:
    """Sockets of the TR clock."""

    bold: str
    """Scanner PUB with the export folder's volumes (topic ``bold``)."""
    frames: str
    """Emulator frames PUB (topic ``trigger``: every pulse it recorded, with the recorded time)."""
    control: str
    """Emulator control ROUTER: fallback triggers go there."""
    tr_s: float
    """Nominal TR, seconds (the weights')."""
    fallback: bool = True
    """Send triggers from the folder's arrival times while no real pulse has come."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE client keys (required for endpoints off loopback)."""


def run_tr_clock(cfg: TrClockConfig, stop: threading.Event, ctx=None) -> TrTimingReport:
    """Run until ``stop``; returns the timing report."""
    import zmq

    from services.plumbing.transport import TOPIC_BOLD, TOPIC_TRIGGER, Channel, make_socket, split_topic

    for ep in (cfg.bold, cfg.frames, cfg.control):
        check_connect(ep, cfg.curve)
    ctx = ctx or zmq.Context.instance()
    clock = TrClock(cfg.tr_s, cfg.fallback)
    sub = make_socket(ctx, zmq.SUB, hwm=10_000, linger_ms=0)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_BOLD)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    secure_connect(sub, cfg.bold, cfg.curve)
    secure_connect(sub, cfg.frames, cfg.curve)
    inbox = Channel(sub, Decoder(accept=[BoldVolume, Trigger]))
    out = Channel(make_socket(ctx, zmq.DEALER, hwm=10_000, linger_ms=200))
    secure_connect(out.sock, cfg.control, cfg.curve)
    max_age = int(TRIGGER_MAX_AGE_S * 1e9)
    try:
        while not stop.is_set():
            if not sub.poll(100):
                continue
            _, parts = split_topic(inbox.recv_parts())
            msg = inbox.decode(parts)  # None: malformed, counted by the channel
            if isinstance(msg, Trigger):
                clock.on_trigger(msg.tr_index, msg.t_ns, msg.source)
            elif isinstance(msg, BoldVolume):
                now = time.monotonic_ns()
                t = msg.t_ns if now - max_age <= msg.t_ns <= now else now  # same host: the publisher's stamp
                fallback = clock.on_volume(msg.tr_index, t)
                if fallback is not None:
                    try:
                        out.send(fallback, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        log.error("trclock: emulator unreachable, fallback trigger %d lost", fallback.tr_index)
    finally:
        sub.close(0)
        out.sock.close(200)
    return clock.report()
