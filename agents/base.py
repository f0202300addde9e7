"""The one agent interface and the wrappers that stack on it.

In the spirit of openpi's ``BasePolicy``: an agent turns an :class:`Observation` (the newest
frame(s) plus the legal actions) into a :class:`Decision` with ``infer`` and forgets its history
with ``reset``. Wrappers implement the same interface around an inner agent, so they stack::

    Recorder(RateLimiter(FrameWindow(VLMAgent(...), k=4, span_s=1.5), max_hz=2), "runs/x")

``infer`` may return ``None`` (a rate limiter skipping a frame); the service then acts on nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FrameRef:
    """One emulator frame as an agent sees it."""

    seq: int
    """Frame sequence number within the emulator session."""
    t_ns: int
    """Emulator monotonic time stamp of the frame (Frame.t_ns)."""
    pixels: np.ndarray
    """uint8 (H, W, 3) RGB."""
    pooled_gray: np.ndarray | None = None
    """uint8 (H, W): Frame.pooled_gray, the flicker-free grey screen RL policies are trained on
    (None when the emulator did not send it)."""
    step: int = -1
    """Step within the episode (0: the frame right after a reset; -1: unknown)."""


@dataclass(frozen=True)
class Observation:
    """What an agent decides on: frames (oldest → newest) and the game's legal actions."""

    frames: tuple[FrameRef, ...]
    action_meanings: tuple[str, ...]
    received_ns: int = 0
    """Agent monotonic clock when the newest frame arrived (latency is measured from here)."""
    skipped: tuple[FrameRef, ...] = ()
    """Frames that arrived since the previous observation but were not decided on (oldest first).
    Not model input: history for frame windows and frame stacks, so a slow agent still sees them."""

    @property
    def newest(self) -> FrameRef:
        return self.frames[-1]


@dataclass
class Choice:
    """The action chosen under one prompt condition (RL agents: condition ``""``)."""

    condition: str
    action: int
    """Index into Observation.action_meanings; always legal."""
    probs: np.ndarray
    """float32 (n_actions,), sums to 1."""


@dataclass
class ActivationSet:
    """Pooled hidden states from the forward pass that made the decision."""

    condition: str
    layers: list[int]
    pooling: str
    """``"last_token"``, ``"mean_image"`` (VLM) or ``"penultimate"``/``"conv1"``… (RL)."""
    vectors: np.ndarray
    """(len(layers), dim), float32 or float16."""


@dataclass
class Decision:
    """An agent's answer for one observation."""

    choices: list[Choice]
    activations: list[ActivationSet]
    frame_seqs: list[int]
    """Frames the input covered, oldest → newest."""
    frame_t_ns: int
    """Emulator time stamp of the newest frame covered."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Per-stage wall time, e.g. ``{"preprocess": .., "forward": .., "score": ..}``."""

    @property
    def action(self) -> int:
        """The action of the first condition (the one a controller applies)."""
        return self.choices[0].action


class FatalAgentError(ValueError):
    """The agent cannot work with this game at all (e.g. a checkpoint for another game); stops the service."""


@runtime_checkable
class Agent(Protocol):
    """Anything that decides on observations: models and wrappers alike."""

    name: str
    """Model name or path, for provenance (Hello.model, Activation.model)."""
    conditions: list[str]
    """Prompt conditions this agent produces a Choice for, in order."""

    def infer(self, obs: Observation) -> Decision | None: ...

    def reset(self) -> None: ...


class Wrapper:
    """Base for wrappers: forwards everything to the inner agent."""

    def __init__(self, inner: Agent):
        self.inner = inner
        self.name = inner.name
        self.conditions = inner.conditions

    def infer(self, obs: Observation) -> Decision | None:
        return self.inner.infer(obs)

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close:
            close()


class RateLimiter(Wrapper):
    """Decide at most ``max_hz`` times per second (wall clock); frames in between get ``None``."""

    def __init__(self, inner: Agent, max_hz: float):
        super().__init__(inner)
        if max_hz <= 0:
            raise ValueError("max_hz must be > 0")
        self.period_ns = int(1e9 / max_hz)
        self._last_ns: int | None = None

    def infer(self, obs: Observation) -> Decision | None:
        now = time.monotonic_ns()
        if self._last_ns is not None and now - self._last_ns < self.period_ns:
            return None
        self._last_ns = now
        return self.inner.infer(obs)

    def reset(self) -> None:
        self._last_ns = None
        super().reset()


class FrameWindow(Wrapper):
    """Pass ``k`` frames evenly spaced over the last ``span_s`` seconds (emulator time) as one input.

    The paper feeds 4 frames over ~1.5 s per TR. Targets are ``t_newest - i * span/(k-1)``; each
    picks the newest remembered frame at or before it (the oldest one while history is short).
    """

    def __init__(self, inner: Agent, k: int = 4, span_s: float = 1.5):
        super().__init__(inner)
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.span_ns = int(span_s * 1e9)
        self._history: list[FrameRef] = []

    def window(self, newest: FrameRef, skipped: tuple[FrameRef, ...] = ()) -> tuple[FrameRef, ...]:
        if self._history and newest.seq < self._history[-1].seq:
            self._history.clear()  # a new emulator session restarted the numbering
        for f in (*skipped, newest):
            if (not self._history or f.seq > self._history[-1].seq) and f.seq <= newest.seq:
                self._history.append(f)
        horizon = newest.t_ns - self.span_ns
        # Keep one frame older than the horizon so the oldest target always has a frame at or before it.
        while len(self._history) > 1 and self._history[1].t_ns <= horizon:
            self._history.pop(0)
        if self.k == 1:
            return (newest,)
        picks = []
        for i in range(self.k - 1, -1, -1):
            target = newest.t_ns - i * self.span_ns // (self.k - 1)
            before = [f for f in self._history if f.t_ns <= target]
            picks.append(before[-1] if before else self._history[0])
        return tuple(picks)

    def infer(self, obs: Observation) -> Decision | None:
        frames = self.window(obs.newest, obs.skipped)
        return self.inner.infer(Observation(frames, obs.action_meanings, obs.received_ns))

    def reset(self) -> None:
        self._history.clear()
        super().reset()


class Recorder(Wrapper):
    """Write every decision and its activations under ``out_dir`` (no pickle).

    Layout: ``decisions.jsonl`` (one JSON line per decision: frames, choices, timings, and for each
    activation set the file and tensor name holding it) and ``activations_NNNNN.npz`` chunks of
    ``chunk`` decisions, written when full and on ``close()``.
    """

    def __init__(self, inner: Agent, out_dir: str | Path, chunk: int = 64):
        super().__init__(inner)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.chunk = chunk
        self._index = open(self.out / "decisions.jsonl", "a", encoding="utf-8")
        self._pending: dict[str, np.ndarray] = {}
        self._n_chunk = len(list(self.out.glob("activations_*.npz")))
        self._n_in_chunk = 0
        self.recorded = 0

    def infer(self, obs: Observation) -> Decision | None:
        decision = self.inner.infer(obs)
        if decision is None:
            return None
        chunk_file = f"activations_{self._n_chunk:05d}.npz"
        acts = []
        for j, a in enumerate(decision.activations):
            key = f"d{self.recorded:07d}_{j}"
            self._pending[key] = a.vectors
            acts.append({"condition": a.condition, "layers": a.layers, "pooling": a.pooling,
                         "file": chunk_file, "key": key})
        line = {
            "n": self.recorded, "frame_seqs": decision.frame_seqs, "frame_t_ns": decision.frame_t_ns,
            "choices": [{"condition": c.condition, "action": c.action, "probs": [float(p) for p in c.probs]}
                        for c in decision.choices],
            "timings_ms": decision.timings_ms, "activations": acts,
        }
        self._index.write(json.dumps(line) + "\n")
        self._index.flush()
        self.recorded += 1
        self._n_in_chunk += 1
        if self._n_in_chunk >= self.chunk:
            self._flush()
        return decision

    def _flush(self) -> None:
        if self._pending:
            np.savez(self.out / f"activations_{self._n_chunk:05d}.npz", **self._pending)
            self._n_chunk += 1
        self._pending = {}
        self._n_in_chunk = 0

    def close(self) -> None:
        self._flush()
        self._index.close()
        super().close()


def read_decisions(out_dir: str | Path) -> list[dict]:
    """Load a :class:`Recorder` directory: the JSON lines with each activation's ``vectors`` filled in.

    (Not a session recording: those are ``.narec`` files, read by ``services.plumbing.recording.read_recording``.)
    """
    out = Path(out_dir)
    files: dict[str, dict] = {}
    rows = []
    for line in (out / "decisions.jsonl").read_text().splitlines():
        row = json.loads(line)
        for a in row["activations"]:
            if a["file"] not in files:
                with np.load(out / a["file"], allow_pickle=False) as z:
                    files[a["file"]] = dict(z)
            a["vectors"] = files[a["file"]][a["key"]]
        rows.append(row)
    return rows


# The old name, easily taken for the session-recording reader; only tests/test_vlm_agent.py still imports it.
read_recording = read_decisions


class AddedLatency(Wrapper):
    """Sleep ``seconds`` before each decision: emulates a slower (bigger) model on the real one.

    Used to check that a too-slow agent skips stale frames and slows nobody else.
    """

    def __init__(self, inner: Agent, seconds: float):
        super().__init__(inner)
        self.seconds = seconds

    def infer(self, obs: Observation) -> Decision | None:
        time.sleep(self.seconds)
        decision = self.inner.infer(obs)
        if decision is not None:
            decision.timings_ms["added_latency"] = self.seconds * 1e3
        return decision
