"""ZeroMQ plumbing shared by every service: typed send/receive, keep-latest draining, counters.

Sockets and codecs are owned by the caller (one per thread); nothing here is global.
PUB sockets send ``[topic, header, *buffers]``; DEALER/ROUTER carry ``[header, *buffers]``
(a ROUTER sees the peer identity first). See protocols/PROTOCOL.md.
"""

from __future__ import annotations

import logging
import socket as _socket
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec
import zmq

from protocols import Decoder, Encoder, Error, ProtocolError

log = logging.getLogger("neuroarcade.transport")

# Topics on PUB sockets (prefix-matched by SUB subscriptions).
TOPIC_FRAME = b"frame"
TOPIC_ACTIVATION = b"activation"
TOPIC_ACTION = b"action"  # agents re-publish their decisions for sinks
TOPIC_BOLD = b"bold"
TOPIC_TRIGGER = b"trigger"
TOPIC_PREDICTION = b"prediction"
TOPIC_QUALITY = b"quality"  # encoder: VolumeQuality per measured volume (motion, FD, exclusion, time)
TOPIC_HEARTBEAT = b"heartbeat"

# Default loopback endpoints (PROTOCOL.md, "Sockets").
DEFAULT_FRAMES = "tcp://127.0.0.1:5555"
DEFAULT_CONTROL = "tcp://127.0.0.1:5556"
DEFAULT_ACTIVATIONS = "tcp://127.0.0.1:5557"
DEFAULT_BOLD = "tcp://127.0.0.1:5558"
DEFAULT_PREDICTIONS = "tcp://127.0.0.1:5559"

# Bounded queues: a slow peer loses messages at the high-water mark, never stalls the sender.
DEFAULT_HWM = 64

# Below this size array frames are copied into the message, above it sent zero-copy. Zero-copy
# makes pyzmq's garbage-collector thread take the GIL once per message to release the buffer;
# with a subscriber attached that costs more than a memcpy up to a few hundred kB (measured per
# send: 100 kB 51 µs copied vs 83 µs zero-copy, 400 kB 107 vs 154 µs, 1 MB 591 vs 102 µs).
# So Atari frames and activations are copied and fMRI volumes go zero-copy.
ZERO_COPY_MIN_BYTES = 512 * 1024

_MORE = int(zmq.SNDMORE)


@dataclass
class Counters:
    """Per-service message counters; the service owns one and reports it."""

    received: int = 0
    sent: int = 0
    rejected: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)

    def reject(self, err: ProtocolError) -> None:
        self.rejected += 1
        self.rejected_by_code[err.code] = self.rejected_by_code.get(err.code, 0) + 1


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A loopback TCP endpoint whose port stays reserved for this caller for about a minute.

    For a service that binds an endpoint given in its config, chosen before it starts (the
    emulator, the agent's activation PUB, the encoder, the scanner). Where the binding socket is
    at hand, bind ``tcp://127.0.0.1:*`` instead and read the port back (``bind_ephemeral``).

    Releasing a port that ``bind(port 0)`` picked leaves a window in which another process (a
    parallel test run, a client's outgoing connection) can be given the same port. So the port is
    not merely released: a connection is made to it, accepted, and closed from the accepting side
    first, which leaves that side in TIME_WAIT on the port for 2 MSL (60 s on Linux). Meanwhile the
    kernel hands the port out neither to another ``bind(port 0)`` nor to an outgoing connection's
    source port, while a bind to it with SO_REUSEADDR — which libzmq sets on every TCP listener —
    succeeds at once (the same trick as Yelp's ephemeral-port-reserve). Two calls never return the
    same port within that minute, in this process or another.
    """
    with _socket.socket() as listener:
        # SO_REUSEADDR here makes the TIME_WAIT left behind compatible with libzmq's own bind.
        listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with _socket.create_connection((host, port), timeout=5):
            accepted, _ = listener.accept()
            accepted.close()  # the accepting side closes first: it holds the port in TIME_WAIT
    return f"tcp://{host}:{port}"


def bind_ephemeral(sock: zmq.Socket, host: str = "127.0.0.1") -> str:
    """Bind ``sock`` to a port the OS picks on ``host`` and return the endpoint actually bound.

    No window between choosing and binding: nothing else can take the port. Use it wherever the
    binding socket is at hand (tests, benchmarks); peers then connect to the returned endpoint.
    """
    sock.bind(f"tcp://{host}:*")
    return bound_endpoint(sock)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint ``sock`` was bound to last, with the port the OS picked for a ``:*`` bind."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def make_socket(ctx: zmq.Context, kind: int, *, hwm: int = DEFAULT_HWM, linger_ms: int = 500) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # A short linger lets the last replies (e.g. ~100 kB frames) leave before close; never hang on exit.
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.copy_threshold = ZERO_COPY_MIN_BYTES
    return sock


class Channel:
    """A socket plus its codec and counters: ``send`` typed messages, ``recv`` validated ones."""

    def __init__(self, sock: zmq.Socket, decoder: Decoder | None = None, counters: Counters | None = None):
        self.sock = sock
        self.encoder = Encoder()
        self.decoder = decoder or Decoder()
        self.counters = counters if counters is not None else Counters()

    def send(self, msg: msgspec.Struct, *, topic: bytes | None = None, identity: bytes | None = None,
             flags: int = 0) -> None:
        parts = self.encoder.encode(msg)
        # Frame by frame with plain-int flags: send_multipart re-checks every part and combines
        # enum flags in Python, which is a measurable share of a small message's send.
        sock, flags = self.sock, int(flags)
        if identity is not None:
            sock.send(identity, flags | _MORE)
        if topic is not None:
            sock.send(topic, flags | _MORE)
        if len(parts) == 1:
            sock.send(parts[0], flags)
        else:
            sock.send(parts[0], flags | _MORE)  # the header: small, always copied
            last = len(parts) - 1
            for i in range(1, last + 1):  # arrays: zero-copy above ZERO_COPY_MIN_BYTES
                sock.send(parts[i], flags if i == last else flags | _MORE, copy=False)
        self.counters.sent += 1

    def recv_parts(self, flags: int = 0) -> list[Any]:
        return self.sock.recv_multipart(flags=flags, copy=False)

    def decode(self, parts: Sequence[Any]) -> msgspec.Struct | None:
        """Decode validated parts; on a bad message count it, log it and return None."""
        try:
            msg = self.decoder.decode(parts)
        except ProtocolError as err:
            self.counters.reject(err)
            log.debug("rejected message: %s", err)
            return None
        self.counters.received += 1
        return msg

    def error_reply(self, err: ProtocolError, identity: bytes | None = None) -> None:
        """Best-effort Error reply; never blocks (a peer that does not read loses it)."""
        try:
            self.send(Error(code=err.code, detail=err.detail[:500], ref_kind=err.ref_kind), identity=identity,
                      flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def split_topic(parts: Sequence[Any]) -> tuple[bytes, Sequence[Any]]:
    """For PUB/SUB traffic: return (topic, message parts)."""
    topic = parts[0].bytes if hasattr(parts[0], "bytes") else bytes(parts[0])
    return topic, parts[1:]


def recv_latest(sock: zmq.Socket, timeout_ms: int) -> tuple[list[Any] | None, int]:
    """Wait up to ``timeout_ms`` for a message, then drain the queue and keep only the newest.

    CONFLATE cannot hold multipart messages, so keep-latest is done by draining with NOBLOCK.
    Returns ``(parts or None on timeout, number of older messages discarded)``.
    """
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None, 0
    latest = sock.recv_multipart(copy=False)
    dropped = 0
    while True:
        try:
            latest = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            dropped += 1
        except zmq.Again:
            return latest, dropped
