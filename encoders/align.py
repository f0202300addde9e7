"""Frame → TR alignment: which decisions' activations make up the feature row of each TR.

Rule (the same online and offline, both go through ``TrAligner``):

* TR t spans ``[trigger_t, trigger_{t+1})`` on the emulator's monotonic clock (scanner pulses
  are recorded by the emulator / published by the scanner on the same host clock).
* A decision belongs to the TR during which the newest frame it saw was shown:
  ``Activation.frame_t_ns`` (emulator time stamp of that frame). It is a causal choice: the
  features of TR t only use what the participant had seen by the end of TR t.
* Past the newest known trigger, TR boundaries are extrapolated with the nominal TR, so a late
  or lost trigger message does not merge TRs.
* Row of TR t = mean of the pooled vectors of its decisions (one vector per decision).
* A TR without any decision repeats the previous TR's row ("carry last"): the screen and the
  agent's state persist between decisions, and zeros would read as a large, fake, feature
  change after z-scoring. Before the first decision the row is the training mean, i.e.
  zeros after z-scoring (``fill_value``, given by the weights).
* Decisions whose frame precedes the first trigger are not part of the scan (counted). Decisions
  that arrive before ANY trigger message are held until the first one arrives (on a live system
  the activation and the trigger travel on different sockets and can swap order).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np


@dataclass
class AlignCounts:
    """What the aligner saw (reported by the encoding service)."""

    decisions: int = 0
    before_scan: int = 0
    """Decisions on frames shown before the first trigger."""
    late: int = 0
    """Decisions arriving for a TR already closed (dropped)."""
    empty_trs: int = 0
    """TRs without any decision (row carried over)."""


@dataclass
class TrAligner:
    """Online bucketing of decision vectors into TRs; ``close(t)`` yields the row of TR t."""

    dim: int
    tr_ns: int
    """Nominal TR in ns (extrapolates boundaries past the newest trigger)."""
    fill_value: np.ndarray | None = None
    """Row used before the first decision (default zeros)."""
    triggers: list[int] = field(default_factory=list)
    """Trigger times, index = TR index (missing ones filled by extrapolation)."""
    counts: AlignCounts = field(default_factory=AlignCounts)
    _sums: dict[int, np.ndarray] = field(default_factory=dict)
    _n: dict[int, int] = field(default_factory=dict)
    _last_row: np.ndarray | None = None
    _closed: int = -1
    _early: list = field(default_factory=list)
    max_early: int = 10_000
    """Decisions held while no trigger is known (older ones are counted as before_scan)."""

    def add_trigger(self, tr_index: int, t_ns: int) -> None:
        """Record the pulse of TR ``tr_index``; gaps before it are filled at the nominal TR."""
        while len(self.triggers) < tr_index:
            prev = self.triggers[-1] if self.triggers else t_ns - tr_index * self.tr_ns
            self.triggers.append(prev + self.tr_ns)
        if len(self.triggers) == tr_index:
            self.triggers.append(int(t_ns))
        else:
            self.triggers[tr_index] = int(t_ns)  # a real pulse replaces an extrapolated time
        early, self._early = self._early, []
        for vector, frame_t_ns in early:
            self.counts.decisions -= 1  # counted again by add()
            self.add(vector, frame_t_ns)

    def tr_of(self, t_ns: int) -> int:
        """TR index of an emulator time (-1 = before the first trigger or no trigger yet)."""
        if not self.triggers or t_ns < self.triggers[0]:
            return -1
        i = bisect.bisect_right(self.triggers, t_ns) - 1
        if i == len(self.triggers) - 1:
            i += int((t_ns - self.triggers[-1]) // self.tr_ns)
        return i

    def add(self, vector: np.ndarray, frame_t_ns: int) -> int:
        """Add one decision's pooled vector; return its TR (-1 if not counted)."""
        t = self.tr_of(frame_t_ns)
        self.counts.decisions += 1
        if not self.triggers:
            self._early.append((np.array(vector, dtype=np.float64), frame_t_ns))
            if len(self._early) > self.max_early:
                self._early.pop(0)
                self.counts.before_scan += 1
            return -1
        if t < 0:
            self.counts.before_scan += 1
            return -1
        if t <= self._closed:
            self.counts.late += 1
            return -1
        v = np.asarray(vector, dtype=np.float64)
        if t in self._sums:
            self._sums[t] += v
            self._n[t] += 1
        else:
            self._sums[t] = v.copy()
            self._n[t] = 1
        return t

    @property
    def closed(self) -> int:
        """Highest TR index closed so far (-1 = none)."""
        return self._closed

    def close(self, t: int) -> np.ndarray:
        """Row of TR ``t`` (must be the next unclosed TR); later decisions for it count as late."""
        if t != self._closed + 1:
            raise ValueError(f"TRs close in order: next is {self._closed + 1}, asked {t}")
        self._closed = t
        if t in self._sums:
            row = (self._sums.pop(t) / self._n.pop(t)).astype(np.float32)
            self._last_row = row
        else:
            self.counts.empty_trs += 1
            if self._last_row is not None:
                row = self._last_row
            elif self.fill_value is not None:
                row = np.asarray(self.fill_value, dtype=np.float32)
            else:
                row = np.zeros(self.dim, dtype=np.float32)
        return row


def features_per_tr(vectors: np.ndarray, frame_t_ns: np.ndarray, trigger_ns: np.ndarray, tr: float,
                    fill_value: np.ndarray | None = None) -> tuple[np.ndarray, AlignCounts]:
    """Offline alignment of a whole run: (n_trs, dim) rows for the TRs of ``trigger_ns``."""
    vectors = np.asarray(vectors)
    aligner = TrAligner(dim=vectors.shape[1], tr_ns=int(round(tr * 1e9)), fill_value=fill_value)
    for i, t in enumerate(trigger_ns):
        aligner.add_trigger(i, int(t))
    for v, t in zip(vectors, frame_t_ns):
        aligner.add(v, int(t))
    rows = np.stack([aligner.close(t) for t in range(len(trigger_ns))])
    return rows, aligner.counts
