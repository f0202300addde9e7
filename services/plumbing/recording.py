"""Session recordings: append-only, crash-safe, replayable bit-exactly.

File layout (``*.narec``)::

    MAGIC (8 bytes) then records: [u32 length LE][u32 crc32 LE][msgpack record]

Each record is one typed struct (Header, Reset, Step, TriggerMark, End). Every record goes to
the kernel in one ``os.write`` on an O_APPEND descriptor, so a ``kill -9`` of the writer leaves
every completed record readable; the reader stops at the first short or corrupt record and
reports the file as truncated. ``fsync`` runs at most every ``fsync_s`` seconds (power loss).

Scanner alignment: TriggerMark records carry TR pulses on the emulator's clock, so each frame's
``t_ns`` maps to a TR (``frames_per_tr``). A BIDS dataset points at a recording from its
``_events.tsv`` (``stim_file`` column, as CNeuroMod does with its replay files), see
``write_bids_events``.
"""

from __future__ import annotations

import bisect
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import msgspec

MAGIC = b"NARC\x00\x01\r\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 24


class Header(msgspec.Struct, tag="header", tag_field="type"):
    """What is needed to re-create the emulator exactly, plus provenance."""

    format_version: int
    session_id: str
    game: str
    """Gymnasium id, e.g. ``ALE/Pong-v5``."""
    rom: str
    rom_md5: str
    ale_py_version: str
    gymnasium_version: str
    neuroarcade_version: str
    protocol_version: int
    seed: int
    frameskip: int
    repeat_action_probability: float
    full_action_space: bool
    mode: str
    action_meanings: list[str]
    frame_shape: list[int]
    start_wall_ns: int
    start_t_ns: int
    source_recording: str = ""
    """For replay sessions: the recording being replayed."""
    meta: dict[str, str] = {}
    """Free-form labels (subject, session, task, run, operator …)."""
    frame_hash_algo: str = "xxh3_128"
    """Algorithm of every ``frame_hash`` (services.plumbing.game.FRAME_HASHES); files that predate the field
    used xxh3_128."""


class ActionLog(msgspec.Struct, array_like=True, gc=False):
    """An action received from a client during the step it was applied or observed in."""

    agent_id: str
    role: str
    frame_seq: int
    action: int
    t_recv_ns: int
    condition: str = ""


class Reset(msgspec.Struct, tag="reset", tag_field="type", gc=False):
    seq: int
    """Sequence number of the reset frame."""
    episode: int
    seed: int | None
    """Seed passed to ``reset`` (only the first reset of a session is seeded)."""
    t_ns: int
    frame_hash: str


class Step(msgspec.Struct, tag="step", tag_field="type", gc=False):
    seq: int
    episode: int
    step: int
    action: int
    """Action index applied (into Header.action_meanings)."""
    controller: str
    """Who chose it: a client id, ``"hold"`` (held last action), ``"timeout"``, ``"recorded"``, ``"builtin"``."""
    t_ns: int
    wall_ns: int
    frame_hash: str
    reward: float
    terminated: bool
    truncated: bool
    actions: list[ActionLog] = []


class TriggerMark(msgspec.Struct, tag="trigger", tag_field="type"):
    tr_index: int
    t_ns: int
    """Emulator monotonic clock when the pulse was received."""
    source: str = ""


class End(msgspec.Struct, tag="end", tag_field="type"):
    t_ns: int
    reason: str
    steps: int


Record = Union[Header, Reset, Step, TriggerMark, End]


class RecordingError(Exception):
    pass


class RecordingWriter:
    """Appends records to a new file; one ``os.write`` per record."""

    def __init__(self, path: str | os.PathLike, header: Header, fsync_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._encoder = msgspec.msgpack.Encoder()
        self._fsync_s = fsync_s
        self._last_fsync = time.monotonic()
        os.write(self._fd, MAGIC)
        self.write(header)

    def write(self, record: Record) -> None:
        payload = self._encoder.encode(record)
        os.write(self._fd, _PREFIX.pack(len(payload), zlib.crc32(payload)) + payload)
        now = time.monotonic()
        if now - self._last_fsync >= self._fsync_s:
            os.fsync(self._fd)
            self._last_fsync = now

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Recording:
    """A recording read back into memory."""

    path: Path
    header: Header
    resets: list[Reset] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    triggers: list[TriggerMark] = field(default_factory=list)
    end: End | None = None
    truncated: bool = False
    """True when the file ends in a partial or corrupt record (writer killed mid-write)."""

    @property
    def complete(self) -> bool:
        return self.end is not None and not self.truncated

    def frames(self) -> list[tuple[int, int, str]]:
        """All published frames in order as (seq, t_ns, frame_hash): reset frames and steps."""
        rows = [(r.seq, r.t_ns, r.frame_hash) for r in self.resets]
        rows += [(s.seq, s.t_ns, s.frame_hash) for s in self.steps]
        return sorted(rows)

    def frames_per_tr(self) -> list[list[int]]:
        """Frame seqs shown during each TR: TR k spans [trigger k, trigger k+1) on the emulator clock.

        The last TR is closed one median TR length after its trigger. Frames before the first
        trigger belong to no TR.
        """
        if not self.triggers:
            return []
        starts = [t.t_ns for t in sorted(self.triggers, key=lambda t: t.tr_index)]
        gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
        ends = starts[1:] + [starts[-1] + (gaps[len(gaps) // 2] if gaps else 0)]
        out: list[list[int]] = [[] for _ in starts]
        for seq, t_ns, _ in self.frames():
            k = bisect.bisect_right(starts, t_ns) - 1
            if 0 <= k < len(starts) and t_ns < ends[k]:
                out[k].append(seq)
        return out


def iter_records(path: str | os.PathLike) -> Iterator[Record | None]:
    """Yield records in order; yields a final None if the file ends in a partial/corrupt record."""
    decoder = msgspec.msgpack.Decoder(Record)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise RecordingError(f"{path}: not a neuroarcade recording (bad magic)")
        while True:
            prefix = f.read(_PREFIX.size)
            if not prefix:
                return
            if len(prefix) < _PREFIX.size:
                yield None
                return
            length, crc = _PREFIX.unpack(prefix)
            if length > MAX_RECORD_BYTES:
                yield None
                return
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                yield None
                return
            try:
                yield decoder.decode(payload)
            except msgspec.MsgspecError:
                yield None
                return


def read_recording(path: str | os.PathLike) -> Recording:
    records = iter_records(path)
    first = next(records, None)
    if not isinstance(first, Header):
        raise RecordingError(f"{path}: no header record")
    if first.format_version > FORMAT_VERSION:
        raise RecordingError(f"{path}: format version {first.format_version} is newer than {FORMAT_VERSION}")
    rec = Recording(path=Path(path), header=first)
    for r in records:
        if r is None:
            rec.truncated = True
        elif isinstance(r, Step):
            rec.steps.append(r)
        elif isinstance(r, Reset):
            rec.resets.append(r)
        elif isinstance(r, TriggerMark):
            rec.triggers.append(r)
        elif isinstance(r, End):
            rec.end = r
    return rec


def write_bids_events(rec: Recording, events_tsv: str | os.PathLike, *, trial_type: str = "gameplay") -> None:
    """Write a BIDS ``_events.tsv`` whose row points at the recording (``stim_file``).

    Onsets are seconds from the first trigger (the scan start); without triggers, from the first frame.
    """
    events_tsv = Path(events_tsv)
    frames = rec.frames()
    if not frames:
        raise RecordingError(f"{rec.path}: no frames to describe")
    t0 = min(t.t_ns for t in rec.triggers) if rec.triggers else frames[0][1]
    onset = (frames[0][1] - t0) / 1e9
    duration = (frames[-1][1] - frames[0][1]) / 1e9
    stim = os.path.relpath(rec.path, events_tsv.parent)
    events_tsv.write_text(
        "onset\tduration\ttrial_type\tstim_file\tgame\n"
        f"{onset:.6f}\t{duration:.6f}\t{trial_type}\t{stim}\t{rec.header.game}\n"
    )
