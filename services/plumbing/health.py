"""Health probes for containers: does the service bound at an endpoint answer?

Used by ``neuroarcade health`` (Docker healthchecks, Kubernetes exec probes). Four checks:

* ``heartbeat``: a DEALER sends a Heartbeat to a ROUTER and waits for the echo with the same
  ``seq`` (the emulator's control socket answers it from its main loop, so a hung loop fails).
* ``status``: a SUB waits for a ``Status`` on the ``heartbeat`` topic of a PUB (the emulator's
  frames socket publishes one every second from its loop).
* ``handshake``: a SUB (for PUB/XPUB) or DEALER (for ROUTER) completes the ZMTP handshake with
  the socket bound there (libzmq's ``HANDSHAKE_SUCCEEDED`` monitor event). For services that
  publish no Status: proves a live ZeroMQ peer (with matching CURVE keys, when on) — not that its
  main loop is busy-healthy.
* ``http``: GET returns 2xx (the dashboard), with the access token as ``x-neuroarcade-token``.

With CURVE (any non-loopback endpoint) the probe connects with its own key pair and the
server's public key, so a probe also fails when the keys do not match.
"""

from __future__ import annotations

import os
import time

import zmq


class HealthError(RuntimeError):
    """The service did not answer as expected within the timeout."""


def _curve(secret_key: str, server_key: str):
    if not secret_key:
        return None
    from services.plumbing.security import CurveConfig

    return CurveConfig(secret_key=secret_key, server_public_key=server_key)


def _connect(sock: zmq.Socket, endpoint: str, secret_key: str, server_key: str) -> None:
    from services.plumbing.security import SecurityError, secure_connect

    try:
        secure_connect(sock, endpoint, _curve(secret_key, server_key))
    except (SecurityError, OSError, ValueError) as e:
        raise HealthError(str(e)) from None


def probe(endpoint: str, check: str, *, timeout_s: float = 3.0, socket_kind: str = "sub", service: str = "",
          secret_key: str = "", server_key: str = "", token: str = "", ctx: zmq.Context | None = None) -> dict:
    """Run one check; return details on success, raise :class:`HealthError` otherwise."""
    if check == "http":
        return _probe_http(endpoint, timeout_s, token)
    ctx = ctx or zmq.Context.instance()
    t0 = time.monotonic()
    if check == "heartbeat":
        detail = _probe_heartbeat(ctx, endpoint, timeout_s, secret_key, server_key)
    elif check == "status":
        detail = _probe_status(ctx, endpoint, timeout_s, service, secret_key, server_key)
    elif check == "handshake":
        detail = _probe_handshake(ctx, endpoint, timeout_s, socket_kind, secret_key, server_key)
    else:
        raise ValueError(f"unknown check {check!r}")
    detail["ms"] = round((time.monotonic() - t0) * 1e3, 2)
    return detail


def _probe_heartbeat(ctx, endpoint, timeout_s, secret_key, server_key) -> dict:
    from protocols import Decoder, Error, Heartbeat
    from services.plumbing.transport import Channel

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        _connect(sock, endpoint, secret_key, server_key)
        chan = Channel(sock, Decoder([Heartbeat, Error]))
        seq = int.from_bytes(os.urandom(4), "little")
        chan.send(Heartbeat(sender=f"health-{os.getpid()}", seq=seq, t_ns=time.monotonic_ns()))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            msg = chan.decode(chan.recv_parts())
            if isinstance(msg, Heartbeat) and msg.seq == seq:
                return {"sender": msg.sender}
            if isinstance(msg, Error):
                raise HealthError(f"answered with an error: {msg.code}: {msg.detail}")
        raise HealthError(f"no heartbeat echo within {timeout_s:g} s")
    finally:
        sock.close(0)


def _probe_status(ctx, endpoint, timeout_s, service, secret_key, server_key) -> dict:
    from protocols import Decoder, Status
    from services.plumbing.transport import TOPIC_HEARTBEAT, Channel, split_topic

    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
    try:
        _connect(sock, endpoint, secret_key, server_key)
        chan = Channel(sock, Decoder([Status]))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            _, parts = split_topic(chan.recv_parts())
            msg = chan.decode(parts)
            if isinstance(msg, Status) and (not service or msg.service == service):
                return {"service": msg.service, "session_id": msg.session_id, "steps": msg.steps,
                        "clients": len(msg.clients), "rejected": msg.rejected}
        raise HealthError(f"no Status{' from ' + service if service else ''} within {timeout_s:g} s")
    finally:
        sock.close(0)


def _probe_handshake(ctx, endpoint, timeout_s, socket_kind, secret_key, server_key) -> dict:
    from zmq.utils.monitor import recv_monitor_message

    sock = ctx.socket(zmq.SUB if socket_kind == "sub" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    monitor = sock.get_monitor_socket(events)
    try:
        _connect(sock, endpoint, secret_key, server_key)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            ev = recv_monitor_message(monitor)
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return {"handshake": "ok"}
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise HealthError("handshake refused: CURVE authentication failed (keys?)")
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                raise HealthError("handshake failed: wrong socket type or not a ZeroMQ peer (--socket?)")
        raise HealthError(f"no ZeroMQ handshake within {timeout_s:g} s (nothing bound there?)")
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def _probe_http(url: str, timeout_s: float, token: str) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"x-neuroarcade-token": token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return {"http_status": resp.status}
    except urllib.error.HTTPError as e:
        raise HealthError(f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise HealthError(f"no HTTP answer: {getattr(e, 'reason', e)}") from None
