"""CURVE encryption and authentication for ZeroMQ endpoints.

Loopback endpoints (127.0.0.0/8, localhost, ::1, ipc://, inproc://) may run without keys. Any
other endpoint refuses to start without them: a server binds with its secret key and admits only
clients whose public keys are in an allow-list folder, checked by a ZAP authenticator
(``zmq.auth``); a client connects with the server's public key and its own key pair. Keys are
made by ``neuroarcade keys generate``; pyzmq's certificate files (``*.key`` public,
``*.key_secret`` secret) are the on-disk format.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("neuroarcade.security")


class SecurityError(RuntimeError):
    pass


@dataclass
class CurveConfig:
    """Key files for CURVE. Empty fields = no CURVE (allowed on loopback only)."""

    secret_key: str = ""
    """This process's ``*.key_secret`` file (server and client both have one)."""
    server_public_key: str = ""
    """Client side: the server's ``*.key`` public key file."""
    allowed_clients: str = ""
    """Server side: folder of client ``*.key`` files allowed to connect."""

    @property
    def enabled(self) -> bool:
        return bool(self.secret_key)


def is_loopback(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name, '*' or a DNS name: treat as exposed


def generate_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` (secret, mode 600) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


class ServerSecurity:
    """Applies CURVE to the server sockets of one service; owns its ZAP authenticator."""

    def __init__(self, ctx: zmq.Context, cfg: CurveConfig):
        self.cfg = cfg
        self.ctx = ctx
        self._auth: ThreadAuthenticator | None = None
        if cfg.enabled:
            if not cfg.allowed_clients:
                raise SecurityError("CURVE server needs an allow-list folder of client public keys")
            if not Path(cfg.allowed_clients).is_dir():
                raise SecurityError(f"allow-list folder {cfg.allowed_clients} does not exist")
            self._public, self._secret = zmq.auth.load_certificate(cfg.secret_key)
            if self._secret is None:
                raise SecurityError(f"{cfg.secret_key} holds no secret key")

    def bind(self, sock: zmq.Socket, endpoint: str, *, accepts_clients: bool = True) -> None:
        """Bind, with CURVE when configured. Refuses a non-loopback endpoint without keys."""
        if not self.cfg.enabled:
            if not is_loopback(endpoint):
                raise SecurityError(f"{endpoint} is not loopback: CURVE keys are required (neuroarcade keys generate)")
            sock.bind(endpoint)
            return
        if self._auth is None:
            self._auth = ThreadAuthenticator(self.ctx, log=log)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.cfg.allowed_clients))
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.curve_server = True
        sock.bind(endpoint)

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def secure_connect(sock: zmq.Socket, endpoint: str, cfg: CurveConfig | None) -> None:
    """Connect, as a CURVE client when keys are configured."""
    if cfg is not None and cfg.enabled:
        if not cfg.server_public_key:
            raise SecurityError("CURVE client needs the server's public key file")
        public, secret = zmq.auth.load_certificate(cfg.secret_key)
        server_public, _ = zmq.auth.load_certificate(cfg.server_public_key)
        if secret is None:
            raise SecurityError(f"{cfg.secret_key} holds no secret key")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public
    elif not is_loopback(endpoint):
        raise SecurityError(f"{endpoint} is not loopback: connecting needs CURVE keys")
    sock.connect(endpoint)
