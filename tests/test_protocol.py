"""The codec: round trips, zero-copy rebuild, and rejection of every kind of bad input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from protocols import (
    KINDS, PROTOCOL_VERSION, Activation, BoldVolume, Decoder, Encoder, ErrorCode, Frame, Hello, Prediction,
    ProtocolError,
)


def _frame(pixels=None) -> Frame:
    px = np.arange(210 * 160 * 3, dtype=np.uint32).astype(np.uint8).reshape(210, 160, 3) if pixels is None else pixels
    return Frame(session_id="s", seq=7, episode=0, step=7, action=3, controller="c", reward=1.0, terminated=False,
                 truncated=False, t_ns=123, wall_ns=456, pixels=px, frame_hash="h")


def test_round_trip_every_array_message():
    enc, dec = Encoder(), Decoder()
    msgs = [
        _frame(),
        Activation(agent_id="a", model="m", condition="action", layers=[0, 1], pooling="last_token",
                   frame_seqs=[1, 2], t_ns=5, vectors=np.random.default_rng(0).standard_normal((2, 64)).astype(np.float16)),
        BoldVolume(run="r", tr_index=3, acq_time_s=6.0, t_ns=1, affine=[float(i) for i in range(16)],
                   data=np.ones((4, 5, 6), dtype=np.int16)),
        Prediction(agent_id="a", condition="c", tr_index=1, t_ns=2, roi_names=["V1"], roi_predicted=[0.5],
                   voxels=np.zeros(10, dtype=np.float32)),
        Prediction(agent_id="a", condition="c", tr_index=1, t_ns=2, roi_names=[], roi_predicted=[]),
    ]
    for msg in msgs:
        parts = enc.encode(msg)
        out = dec.decode([bytes(memoryview(p)) for p in parts])
        assert type(out) is type(msg)
        for f in msg.__struct_fields__:
            a, b = getattr(msg, f), getattr(out, f)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            else:
                assert a == b


def test_arrays_travel_as_separate_frames_and_rebuild_without_copy():
    msg = _frame()
    parts = Encoder().encode(msg)
    assert len(parts) == 2 and len(parts[0]) < 300  # header small, pixels out of band
    wire = bytes(memoryview(parts[1]))
    out = Decoder().decode([parts[0], wire])
    assert np.shares_memory(out.pixels, np.frombuffer(wire, np.uint8))
    assert not out.pixels.flags.writeable


def test_every_message_carries_version_and_kind():
    for kind in KINDS:
        assert kind
    header = msgspec.msgpack.decode(Encoder().encode(Hello(client_id="x"))[0])
    assert header["v"] == PROTOCOL_VERSION and header["kind"] == "hello"


def _bad(parts, code):
    with pytest.raises(ProtocolError) as e:
        Decoder().decode(parts)
    assert e.value.code == code, e.value
    return e.value


def test_rejections_name_the_problem():
    enc = Encoder()
    header, pixels = enc.encode(_frame())
    h = msgspec.msgpack.decode(header)
    _bad([], ErrorCode.BAD_HEADER)
    _bad([b"\xc1garbage"], ErrorCode.BAD_HEADER)
    _bad([msgspec.msgpack.encode([1, 2])], ErrorCode.BAD_HEADER)
    _bad([msgspec.msgpack.encode({**h, "v": 99}), pixels], ErrorCode.BAD_VERSION)
    _bad([msgspec.msgpack.encode({**h, "kind": "launch_missiles"}), pixels], ErrorCode.UNKNOWN_KIND)
    _bad([msgspec.msgpack.encode({**h, "seq": "seven"}), pixels], ErrorCode.BAD_HEADER)
    no_seq = dict(h)
    del no_seq["seq"]
    _bad([msgspec.msgpack.encode(no_seq), pixels], ErrorCode.BAD_HEADER)
    _bad([header, bytes(memoryview(pixels))[:-1]], ErrorCode.BAD_PAYLOAD)  # truncated payload
    _bad([header], ErrorCode.BAD_PAYLOAD)  # payload frame missing
    _bad([header, pixels, b"extra"], ErrorCode.BAD_PAYLOAD)  # unreferenced frame
    huge = {**h, "pixels": {"dtype": "uint8", "shape": [1 << 40, 1 << 40, 3], "buf": 0}}
    e = _bad([msgspec.msgpack.encode(huge), pixels], ErrorCode.BAD_PAYLOAD)  # oversized shape
    assert "needs" in e.detail
    _bad([msgspec.msgpack.encode({**h, "pixels": {"dtype": "object", "shape": [1], "buf": 0}}), b"x"],
         ErrorCode.BAD_PAYLOAD)
    _bad([msgspec.msgpack.encode({**h, "pixels": {"dtype": "uint8", "shape": [-1], "buf": 0}}), b""],
         ErrorCode.BAD_PAYLOAD)
    _bad([msgspec.msgpack.encode({**h, "pixels": {"dtype": "uint8", "shape": [1], "buf": 5}}), b"x"],
         ErrorCode.BAD_PAYLOAD)
    strided = np.zeros((210, 160, 6), np.uint8)[:, :, ::2]  # the right byte count, but not one run of bytes
    e = _bad([header, strided], ErrorCode.BAD_PAYLOAD)
    assert "contiguous" in e.detail


def test_decoder_restricted_to_accepted_kinds():
    parts = Encoder().encode(_frame())
    with pytest.raises(ProtocolError) as e:
        Decoder(accept=[Hello]).decode(parts)
    assert e.value.code == ErrorCode.NOT_ALLOWED


def test_big_endian_and_noncontiguous_arrays_are_normalised():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    msg = Prediction(agent_id="a", condition="", tr_index=0, t_ns=0, roi_names=[], roi_predicted=[], voxels=a)
    out = Decoder().decode(Encoder().encode(msg))
    assert out.voxels.dtype == np.dtype("<f4")
    assert np.array_equal(out.voxels, a.astype("<f4"))


def test_invalid_utf8_in_a_string_is_a_bad_header():
    header = msgspec.msgpack.encode({"v": 1, "kind": "hello", "client_id": "x"}).replace(b"\xa1x", b"\xa1\xdc")
    _bad([header], ErrorCode.BAD_HEADER)
