"""CURVE encryption and authentication for ZeroMQ endpoints.

Loopback endpoints (127.0.0.0/8, localhost, ::1, ipc://, inproc://) may run without keys. Any
other endpoint refuses to start without them: a server binds with its secret key and admits only
clients whose public keys are in an allow-list folder, checked by a ZAP authenticator
(``zmq.auth``); a client connects with the server's public key and its own key pair. Keys are
made by ``neuroarcade keys generate``; pyzmq's certificate files (``*.key`` public,
``*.key_secret`` secret) are the on-disk format.

Every service has one key pair: it is both its server key (for the sockets it binds) and its
client key (for the sockets it connects). A client finds a server's public key either in one
file (every server it connects to uses that key) or in a folder of public keys named after the
servers' host names (``tcp://agent-rl:5557`` → ``agent-rl.key``): the lab layout, where one
folder holds every service's public key and serves as allow-list and server-key folder at once.

A process with keys runs CURVE on every socket it binds or connects, loopback included.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
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
    """Client side: the server's ``*.key`` public key file, or a folder of servers' public keys
    named after their hosts (``tcp://encoder:5559`` → ``encoder.key``)."""
    allowed_clients: str = ""
    """Server side: folder of client ``*.key`` files allowed to connect."""

    @property
    def enabled(self) -> bool:
        return bool(self.secret_key)

    def server_key_file(self, endpoint: str) -> Path:
        """The public key file of the server at ``endpoint`` (``server_public_key`` or a file in it)."""
        if not self.server_public_key:
            raise SecurityError(f"connecting to {endpoint} with CURVE needs the server's public key "
                                "(--curve-server-key FILE or a folder of HOST.key files)")
        path = Path(self.server_public_key)
        if path.is_dir():
            host = (urlsplit(endpoint).hostname or "").strip("[]")
            path = path / f"{host}.key"
            if not path.is_file():
                raise SecurityError(f"no public key for {endpoint}: expected {path} (the server's NAME.key, "
                                    "named after its host)")
        elif not path.is_file():
            raise SecurityError(f"server public key file {path} does not exist")
        return path


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


def check_bind(endpoint: str, cfg: CurveConfig | None) -> None:
    """Refuse, before anything starts, to bind a non-loopback endpoint without CURVE keys."""
    if cfg is not None and cfg.enabled:
        _check_server_keys(cfg)
    elif not is_loopback(endpoint):
        raise SecurityError(f"{endpoint} is not loopback: CURVE keys are required (neuroarcade keys generate; "
                            "--curve-secret and --curve-allow)")


def check_connect(endpoint: str, cfg: CurveConfig | None) -> None:
    """Refuse, before anything starts, to connect to a non-loopback endpoint without CURVE keys."""
    if cfg is not None and cfg.enabled:
        _load_key_pair(cfg.secret_key)
        _load_public_key(cfg.server_key_file(endpoint))
    elif not is_loopback(endpoint):
        raise SecurityError(f"{endpoint} is not loopback: connecting needs CURVE keys (--curve-secret and "
                            "--curve-server-key)")


def preflight(cfg: CurveConfig | None, binds=(), connects=()) -> None:
    """``check_bind`` / ``check_connect`` on each endpoint ('' skipped): commands call it before any work."""
    for ep in binds:
        if ep:
            check_bind(ep, cfg)
    for ep in connects:
        if ep:
            check_connect(ep, cfg)


def _load_key_pair(path: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE key pair {path}: {e}") from None
    if secret is None:
        raise SecurityError(f"{path} holds no secret key (give the NAME.key_secret file)")
    return public, secret


def _check_server_keys(cfg: CurveConfig) -> tuple[bytes, bytes]:
    if not cfg.allowed_clients:
        raise SecurityError("CURVE server needs an allow-list folder of client public keys (--curve-allow)")
    if not Path(cfg.allowed_clients).is_dir():
        raise SecurityError(f"allow-list folder {cfg.allowed_clients} does not exist")
    return _load_key_pair(cfg.secret_key)


def _load_public_key(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE public key {path}: {e}") from None
    return public


class _ZapRegistry:
    """One ZAP authenticator per context, shared by every CURVE server socket in it.

    ZAP is a per-context singleton (libzmq's handler binds ``inproc://zeromq.zap.01``), so two
    services in one process (tests, the closed loop) cannot each start their own. Each allow-list
    folder gets a ZAP domain of its own, so servers with different allow-lists stay apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(ctx) -> [authenticator, users]; the authenticator holds ctx, so the id stays unique while listed
        self._entries: dict[int, list] = {}

    def acquire(self, ctx: zmq.Context, allowed_clients: str) -> str:
        domain = "na-" + hashlib.sha256(str(Path(allowed_clients).resolve()).encode()).hexdigest()[:24]
        with self._lock:
            entry = self._entries.get(id(ctx))
            if entry is None:
                auth = ThreadAuthenticator(ctx, log=log)
                auth.start()
                entry = self._entries[id(ctx)] = [auth, 0]
            entry[0].configure_curve(domain=domain, location=str(allowed_clients))
            entry[1] += 1
        return domain

    def release(self, ctx: zmq.Context) -> None:
        with self._lock:
            entry = self._entries.get(id(ctx))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._entries[id(ctx)]
                entry[0].stop()


_ZAP = _ZapRegistry()


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
        self._domain: str | None = None
        if cfg.enabled:
            self._public, self._secret = _check_server_keys(cfg)

    def bind(self, sock: zmq.Socket, endpoint: str, *, accepts_clients: bool = True) -> None:
        """Bind, with CURVE when configured. Refuses a non-loopback endpoint without keys."""
        check_bind(endpoint, self.cfg)
        if not self.cfg.enabled:
            sock.bind(endpoint)
            return
        if self._domain is None:
            self._domain = _ZAP.acquire(self.ctx, self.cfg.allowed_clients)
        sock.zap_domain = self._domain.encode()
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.curve_server = True
        sock.bind(endpoint)

    def close(self) -> None:
        if self._domain is not None:
            _ZAP.release(self.ctx)
            self._domain = None


def secure_connect(sock: zmq.Socket, endpoint: str, cfg: CurveConfig | None) -> None:
    """Connect, as a CURVE client when keys are configured.

    The keys are set per connect (libzmq copies them into each connection), so one SUB socket can
    connect to several servers with different public keys.
    """
    check_connect(endpoint, cfg)
    if cfg is not None and cfg.enabled:
        public, secret = _load_key_pair(cfg.secret_key)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = _load_public_key(cfg.server_key_file(endpoint))
    sock.connect(endpoint)
