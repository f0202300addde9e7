"""Multipart codec: a message becomes ``[header, buf_0, buf_1, …]``.

The header is the message as a msgpack map; each numpy array field is replaced there by
``{"dtype": str, "shape": [int], "buf": i}`` and its bytes travel as frame ``1 + i``, so large
payloads are handed to ZMQ without copying and rebuilt with ``np.frombuffer`` on receipt (the
received array is a read-only view of the ZMQ frame). Decoding validates everything a peer
controls and raises ``ProtocolError`` with an ``ErrorCode``; it never trusts a length or shape.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import msgspec
import numpy as np

from .messages import KINDS, PROTOCOL_VERSION, ErrorCode

# Little-endian fixed-size dtypes a peer may send; names are numpy's canonical names.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64", "bool")
}
MAX_NDIM = 8
MAX_HEADER_BYTES = 1 << 20


class ProtocolError(Exception):
    """A received message that must be rejected; ``code`` is an ``ErrorCode`` constant."""

    def __init__(self, code: str, detail: str, ref_kind: str = ""):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.ref_kind = ref_kind


class _Envelope(msgspec.Struct):
    """The two fields every header must have; read first so errors name the real problem."""

    v: int
    kind: str


class Encoder:
    """Encodes messages to multipart frames. One per sending thread (it keeps scratch state)."""

    def __init__(self) -> None:
        self._bufs: list[Any] = []
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def encode(self, msg: msgspec.Struct) -> list[Any]:
        """Return ``[header_bytes, *array_buffers]``; arrays are C-contiguous little-endian views."""
        self._bufs = []
        try:
            header = self._encoder.encode(msg)
            return [header, *self._bufs]
        finally:
            self._bufs = []

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            name = obj.dtype.name
            if name not in ALLOWED_DTYPES:
                raise TypeError(f"dtype {obj.dtype} cannot go on the wire")
            arr = np.ascontiguousarray(obj)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            self._bufs.append(arr if arr.nbytes else b"")
            return {"dtype": name, "shape": list(arr.shape), "buf": len(self._bufs) - 1}
        raise TypeError(f"cannot encode {type(obj).__name__}")


class Decoder:
    """Decodes and validates multipart frames. One per receiving thread."""

    def __init__(self, accept: Sequence[type] | None = None) -> None:
        """``accept``: message types this endpoint takes; others raise NOT_ALLOWED."""
        self._accept = {t.__struct_config__.tag for t in accept} if accept else set(KINDS)
        self._envelope = msgspec.msgpack.Decoder(_Envelope)
        self._decoders = {
            kind: msgspec.msgpack.Decoder(t, dec_hook=self._dec_hook) for kind, t in KINDS.items()
        }
        self._bufs: Sequence[Any] = ()
        self._used: set[int] = set()

    def decode(self, parts: Sequence[Any]) -> msgspec.Struct:
        """``parts``: the frames after any topic/identity frames (bytes, memoryview or zmq.Frame)."""
        if not parts:
            raise ProtocolError(ErrorCode.BAD_HEADER, "empty message")
        header = _as_buffer(parts[0])
        if len(header) > MAX_HEADER_BYTES:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            env = self._envelope.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not a map with int 'v' and str 'kind': {e}") from None
        if env.v != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {env.v}, expected {PROTOCOL_VERSION}", env.kind)
        if env.kind not in KINDS:
            raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown kind {env.kind[:64]!r}", env.kind[:64])
        if env.kind not in self._accept:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, f"{env.kind} is not accepted on this socket", env.kind)
        self._bufs = [_as_buffer(p) for p in parts[1:]]
        self._used = set()
        try:
            msg = self._decoders[env.kind].decode(header)
        except ProtocolError as e:
            e.ref_kind = env.kind
            raise
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            # dec_hook errors surface here wrapped by msgspec; keep their code when they carry one.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, ProtocolError):
                raise ProtocolError(cause.code, cause.detail, env.kind) from None
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{env.kind}: {e}", env.kind) from None
        finally:
            bufs, self._bufs = self._bufs, ()
        if len(self._used) != len(bufs):
            raise ProtocolError(
                ErrorCode.BAD_PAYLOAD, f"{len(bufs)} data frames sent, {len(self._used)} referenced", env.kind
            )
        return msg

    def _dec_hook(self, type_: type, obj: Any) -> Any:
        if type_ is not np.ndarray:
            raise TypeError(f"unsupported type {type_}")
        ref = _array_ref(obj)
        i = ref["buf"]
        if i >= len(self._bufs) or i in self._used:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"array refers to data frame {i}, which is missing or reused")
        dtype = ALLOWED_DTYPES[ref["dtype"]]
        shape = ref["shape"]
        expected = math.prod(shape) * dtype.itemsize
        buf = self._bufs[i]
        if len(buf) != expected:
            raise ProtocolError(
                ErrorCode.BAD_PAYLOAD,
                f"data frame {i} holds {len(buf)} bytes, shape {shape} × {ref['dtype']} needs {expected}",
            )
        self._used.add(i)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _array_ref(obj: Any) -> dict:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "buf"}:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "array reference must be a map with exactly dtype, shape, buf")
    dtype, shape, buf = obj["dtype"], obj["shape"], obj["buf"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"dtype {str(dtype)[:32]!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"shape must be a list of ≤{MAX_NDIM} non-negative ints")
    if not isinstance(buf, int) or isinstance(buf, bool) or buf < 0:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "buf must be a non-negative int")
    return obj


def _as_buffer(part: Any) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and numpy arrays support the buffer protocol directly.
    buf = getattr(part, "buffer", None)
    mv = buf if isinstance(buf, memoryview) else memoryview(part)
    return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
