"""Scanner triggers from a serial line (a sync box's RS-232 / USB-serial port), stamped on arrival.

Sync boxes (Current Designs fORP, Cedrus, NordicNeuroLab SyncBox, Siemens' own) deliver each TR pulse
as one character on a serial line, often the same character they type as a keypress (``5`` or ``t``).
``SerialTriggerReader`` opens the port with pyserial, reads in a thread, and calls ``on_pulse(t_ns)``
for every configured trigger byte, with ``t_ns`` the host's ``time.monotonic_ns()`` when the read
returned (the emulator's clock on the same host). Other bytes are counted and ignored.

A port that cannot be opened at start is an error (``SerialTriggerError``, with the port named); a port
that vanishes while running (a USB adapter unplugged) is counted, logged once, and reopened every
``reopen_s`` until it is back or the reader stops. Pulses closer together than ``min_interval_s`` are
dropped and counted (a sync box sending one byte per slice, line noise, a flood), so the TR count stays
the number of volumes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("neuroarcade.serial_trigger")


class SerialTriggerError(RuntimeError):
    """The serial port could not be opened or the configuration is unusable."""


@dataclass
class SerialTriggerConfig:
    """Which serial port carries the scanner's pulses and how to read them."""

    port: str = ""
    """Device path (``/dev/ttyUSB0``, ``/dev/ttyACM0``, ``COM3``); '' = no serial trigger."""
    baud: int = 115200
    """Line speed (sync boxes use 9600 … 115200; see the box's manual)."""
    char: str = "5"
    """The character (one byte) that marks a pulse: usually ``5`` or ``t``; ``\\x..`` escapes allowed."""
    min_interval_s: float = 0.1
    """Pulses closer than this to the previous accepted one are dropped (counted as ``debounced``)."""
    reopen_s: float = 1.0
    """After the port vanished, try to reopen it this often."""

    def trigger_byte(self) -> int:
        """The byte value that marks a pulse (``SerialTriggerError`` unless ``char`` is exactly one byte)."""
        text = self.char.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in self.char \
            else self.char
        try:
            raw = text.encode("latin-1")
        except UnicodeEncodeError:
            raw = b""
        if len(raw) != 1:
            raise SerialTriggerError(f"serial trigger character {self.char!r} is not one byte "
                                     "(give e.g. '5', 't' or '\\x35')")
        return raw[0]


@dataclass
class SerialTriggerCounts:
    """What the reader saw."""

    pulses: int = 0
    """Trigger bytes accepted (``on_pulse`` called)."""
    debounced: int = 0
    """Trigger bytes dropped for coming within ``min_interval_s`` of the previous pulse."""
    other_bytes: int = 0
    """Bytes that are not the trigger character (ignored)."""
    disconnects: int = 0
    """Times the port vanished while reading."""
    reopened: int = 0
    """Times it was opened again after vanishing."""
    last_error: str = ""
    """The most recent read/open error ('' = none)."""


class SerialTriggerReader:
    """Reads ``cfg.port`` in a daemon thread; ``on_pulse(t_ns)`` per accepted trigger byte. ``start``/``stop``.

    ``on_pulse`` is called in the reader thread with the host monotonic ns of the pulse's arrival and must
    not block; ``counts`` says what was read."""

    def __init__(self, cfg: SerialTriggerConfig, on_pulse: Callable[[int], None]):
        self.cfg = cfg
        self.on_pulse = on_pulse
        self.counts = SerialTriggerCounts()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial = None

    def start(self) -> None:
        """Open the port (``SerialTriggerError`` if it cannot be opened) and start reading."""
        self._byte = self.cfg.trigger_byte()
        self._serial = self._open()
        self._thread = threading.Thread(target=self._run, name="serial-trigger", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close()

    def _open(self):
        import serial

        try:
            return serial.Serial(self.cfg.port, self.cfg.baud, timeout=0.05)
        except (serial.SerialException, OSError, ValueError) as e:
            raise SerialTriggerError(f"cannot open serial trigger port {self.cfg.port!r}: {e}") from None

    def _close(self) -> None:
        s, self._serial = self._serial, None
        if s is not None:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing a vanished port
                pass

    def _run(self) -> None:
        import serial

        last_ns: int | None = None
        min_ns = int(self.cfg.min_interval_s * 1e9)
        while not self._stop.is_set():
            if self._serial is None:  # vanished: reopen when it is back
                if self._stop.wait(self.cfg.reopen_s):
                    break
                try:
                    self._serial = self._open()
                    self.counts.reopened += 1
                    log.warning("serial trigger port %s is back", self.cfg.port)
                except SerialTriggerError as e:
                    self.counts.last_error = str(e)
                continue
            try:
                data = self._serial.read(max(1, self._serial.in_waiting or 1))
            except (serial.SerialException, OSError, TypeError, AttributeError) as e:
                # pyserial raises SerialException (or a bare OSError) when the device disappears; a handle
                # closed under it by stop() raises TypeError/AttributeError
                if self._stop.is_set():
                    break
                self.counts.disconnects += 1
                self.counts.last_error = f"{self.cfg.port}: {e}"
                log.error("serial trigger port %s failed (%s): reopening every %.1f s", self.cfg.port, e,
                          self.cfg.reopen_s)
                self._close()
                continue
            if not data:
                continue
            t_ns = time.monotonic_ns()  # arrival: as soon as the read returned
            for b in data:
                if b != self._byte:
                    self.counts.other_bytes += 1
                elif last_ns is not None and t_ns - last_ns < min_ns:
                    self.counts.debounced += 1
                else:
                    last_ns = t_ns
                    self.counts.pulses += 1
                    self.on_pulse(t_ns)
