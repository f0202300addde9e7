"""Multipart codec: a message becomes ``[header, buf_0, buf_1, …]``.

The header is the message as a msgpack map; each numpy array field is replaced there by
``{"dtype": str, "shape": [int], "buf": i}`` and its bytes travel as frame ``1 + i``, so large
payloads are handed to ZMQ without copying and rebuilt with ``np.frombuffer`` on receipt (the
received array is a read-only view of the ZMQ frame). Decoding validates everything a peer
controls and raises ``ProtocolError`` with an ``ErrorCode``; it never trusts a length or shape.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy as np

from .messages import KINDS, PROTOCOL_VERSION, ErrorCode, Message

# Little-endian fixed-size dtypes a peer may send; names are numpy's canonical names.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64", "bool")
}
# native dtype object → wire name, for the encoder's hot path
_WIRE_NAMES: dict[np.dtype, str] = {
    np.dtype(name): name for name in ALLOWED_DTYPES if np.dtype(name).byteorder in ("=", "|", "<")
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
        bufs = self._bufs = []  # filled by the hook; a failed encode leaves it until the next call
        header = self._encoder.encode(msg)
        if not bufs:
            return [header]
        self._bufs = []  # do not keep the arrays alive
        return [header, *bufs]

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            dtype = obj.dtype
            name = _WIRE_NAMES.get(dtype)
            if name is None:
                if dtype.name not in ALLOWED_DTYPES:
                    raise TypeError(f"dtype {dtype} cannot go on the wire")
                obj = obj.astype(ALLOWED_DTYPES[dtype.name])  # big-endian → little-endian
                name = dtype.name
            if not obj.flags.c_contiguous:
                obj = np.ascontiguousarray(obj)
            self._bufs.append(obj if obj.nbytes else b"")
            return {"dtype": name, "shape": list(obj.shape), "buf": len(self._bufs) - 1}
        raise TypeError(f"cannot encode {type(obj).__name__}")


class Decoder:
    """Decodes and validates multipart frames. One per receiving thread."""

    def __init__(self, accept: Sequence[type] | None = None) -> None:
        """``accept``: message types this endpoint takes; others raise NOT_ALLOWED."""
        self._accept = tuple(accept) if accept else tuple(KINDS.values())
        self._envelope = msgspec.msgpack.Decoder(_Envelope)
        # One pass over the header on the happy path; the envelope is read only to explain a failure.
        self._decoder = msgspec.msgpack.Decoder(Message, dec_hook=self._dec_hook)
        self._parts: Sequence[Any] = ()  # the message being decoded, for the hook
        self._used_mask = 0  # bit i set once data frame i has been referenced

    def decode(self, parts: Sequence[Any]) -> msgspec.Struct:
        """``parts``: the frames after any topic/identity frames (bytes, zmq.Frame, or any buffer;
        the header must be one-dimensional bytes)."""
        if not parts:
            raise ProtocolError(ErrorCode.BAD_HEADER, "empty message")
        header = parts[0]
        if len(header) > MAX_HEADER_BYTES:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        # The hook reads array i from parts[1 + i]. Nothing is converted up front: this path runs
        # per message, and every step it skips shows in the round-trip benchmark.
        self._parts = parts
        self._used_mask = 0
        try:
            msg = self._decoder.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            # msgspec lets invalid UTF-8 in a string surface as UnicodeDecodeError
            raise self._explain(header, e) from None
        finally:
            self._parts = ()
        n_bufs = len(parts) - 1
        if msg.v != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {msg.v}, expected {PROTOCOL_VERSION}",
                                msg.__struct_config__.tag)
        if not isinstance(msg, self._accept):
            raise ProtocolError(ErrorCode.NOT_ALLOWED, f"{msg.__struct_config__.tag} is not accepted on this socket",
                                msg.__struct_config__.tag)
        if self._used_mask != (1 << n_bufs) - 1:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                                f"{n_bufs} data frames sent, {self._used_mask.bit_count()} referenced",
                                msg.__struct_config__.tag)
        return msg

    def _explain(self, header: memoryview, err: Exception) -> ProtocolError:
        """Name the real problem of a header that failed to decode."""
        try:
            env = self._envelope.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            return ProtocolError(ErrorCode.BAD_HEADER, f"header is not a map with int 'v' and str 'kind': {e}")
        if env.v != PROTOCOL_VERSION:
            return ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {env.v}, expected {PROTOCOL_VERSION}",
                                 env.kind[:64])
        if env.kind not in KINDS:
            return ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown kind {env.kind[:64]!r}", env.kind[:64])
        # dec_hook errors surface wrapped by msgspec; keep their code when they carry one
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ProtocolError):
            return ProtocolError(cause.code, cause.detail, env.kind)
        return ProtocolError(ErrorCode.BAD_HEADER, f"{env.kind}: {err}", env.kind)

    def _dec_hook(self, type_: type, obj: Any) -> Any:
        # Runs for every array of every message: plain loops and one ndarray constructor
        # (np.frombuffer + reshape costs twice as much).
        if type_ is not np.ndarray:
            raise TypeError(f"unsupported type {type_}")
        if type(obj) is not dict or len(obj) != 3:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, "array reference must be a map with exactly dtype, shape, buf")
        try:
            dtype = ALLOWED_DTYPES[obj["dtype"]]
            shape = obj["shape"]
            i = obj["buf"]
        except (KeyError, TypeError):
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, "array reference must be a map with exactly dtype, shape, buf "
                                                       "(dtype one of the allowed names)") from None
        if type(shape) is not list or len(shape) > MAX_NDIM:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"shape must be a list of ≤{MAX_NDIM} non-negative ints")
        expected = dtype.itemsize
        for n in shape:
            if type(n) is not int or n < 0:
                raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"shape must be a list of ≤{MAX_NDIM} non-negative ints")
            expected *= n
        if type(i) is not int or i < 0:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, "buf must be a non-negative int")
        if i + 1 >= len(self._parts) or (self._used_mask >> i) & 1:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"array refers to data frame {i}, which is missing or reused")
        buf = memoryview(self._parts[i + 1])
        if buf.nbytes != expected or not buf.c_contiguous:
            raise ProtocolError(
                ErrorCode.BAD_PAYLOAD,
                f"data frame {i} holds {buf.nbytes} bytes, shape {shape} × {dtype.name} needs {expected} contiguous",
            )
        self._used_mask |= 1 << i
        return np.ndarray(shape, dtype, buf)
