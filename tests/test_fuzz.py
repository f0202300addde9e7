"""Fuzz every socket that receives from peers with 10,000 malformed messages (hypothesis corpus + mutations).

Messages: multipart ``[header, *buffers]`` where the header is random bytes, msgpack of a
non-map, or a msgpack map mixing real field names with wrong types, versions, kinds and
array references (bad dtypes, shapes, buffer indices, length mismatches). Every message is
checked locally to fail the receiving endpoint's own ``Decoder`` (so the expectation is exact),
then sent; the service must not crash and must count exactly as many rejections as were sent,
and still serve a valid message afterwards.

Sockets that receive from peers, and where they are fuzzed:
- emulator control ROUTER (also tests/test_malformed.py): a DEALER.
- encoding service SUB: our PUB at an endpoint the encoder subscribes to.
- dashboard SUB: our PUB at an endpoint it subscribes to.
- agent services: their only peer input is the frames SUB inside GameClient (the emulator binds
  it, so a rogue PUB cannot join it): we bind our own PUB as the "emulator" frames endpoint, with
  a real emulator control socket elsewhere. GameClient keeps only the newest queued message, so
  the messages go one at a time, each sent after the previous one was decoded and rejected: every
  one of them is decoded (none skipped as stale).
- scanner publishers are XPUB: their only input is subscriptions (TriggerPublisher.wait_for_subscribers).
PUB sockets (emulator frames, agent activations, encoder predictions) discard anything sent to
them; DEALERs (GameClient, dashboard) only connect to the emulator, so no rogue peer reaches them.
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import Activation, BoldVolume, Decoder, Frame, Prediction, ProtocolError, Trigger
from protocols.messages import KINDS, MESSAGE_TYPES
from services.plumbing.transport import (
    Channel, TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_FRAME, TOPIC_PREDICTION, TOPIC_TRIGGER, bind_ephemeral, bound_endpoint,
)

N_MESSAGES = 10_000
"""Per socket."""
CORPUS = 400
"""Distinct messages drawn by hypothesis; the rest are cheap mutations of them."""
BATCH = 500
FIELDS = sorted({f for t in MESSAGE_TYPES for f in t.__struct_fields__} - {"v", "kind"})
DTYPES = ["uint8", "int16", "float32", "float64", "bool", "object", "<U4", ">f4", "complex64", "", "uint8 "]

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=12),
                   st.binary(max_size=12))
value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=6)
array_ref = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES),
                                   "shape": st.lists(st.integers(-3, 2**40), max_size=9),
                                   "buf": st.one_of(st.integers(-2, 4), st.text(max_size=3))})
header_map = st.builds(
    lambda v, kind, fields: {"v": v, "kind": kind, **fields},
    st.one_of(st.just(1), st.integers(-5, 2**31), st.text(max_size=3), st.none()),
    st.one_of(st.sampled_from([*KINDS, "nope", ""]), st.text(max_size=8), st.integers(-(2**63), 2**63 - 1)),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(value, array_ref), max_size=8),
)
header = st.one_of(
    header_map.map(msgpack.packb),
    st.binary(max_size=200),
    st.lists(value, max_size=4).map(msgpack.packb),
)
message = st.tuples(header, st.lists(st.binary(max_size=300), max_size=3)).map(lambda hb: [hb[0], *hb[1]])


@pytest.fixture(scope="module")
def corpus() -> list[list[bytes]]:
    """CORPUS messages drawn by hypothesis (generation costs ~5 ms each, so it is done once)."""
    out: list[list[bytes]] = []

    @settings(max_examples=CORPUS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(m=message)
    def draw(m):
        out.append(m)

    draw()
    return out


def _fuzz(corpus: list[list[bytes]], decoder: Decoder, send_batch, seed: int = 0) -> int:
    """Send N_MESSAGES messages this decoder must reject, BATCH at a time; return the count.

    Corpus messages as drawn, and mutated cheaply (bytes flipped, header cut short, a buffer
    frame added, cut or emptied). The rare accidental valid message is left out, so every
    message sent must be counted as rejected.
    """
    rng = np.random.default_rng(seed)
    batch: list[list[bytes]] = []
    sent = i = 0
    while sent < N_MESSAGES:
        parts = [bytes(p) for p in corpus[i % len(corpus)]]
        how = i % 5
        i += 1
        head = bytearray(parts[0])
        if how == 1 and head:
            for pos in rng.integers(0, len(head), size=1 + len(head) // 16):
                head[pos] = int(rng.integers(256))
        elif how == 2 and head:
            del head[int(rng.integers(len(head))):]
        parts[0] = bytes(head)
        if how == 3:
            parts.append(rng.bytes(int(rng.integers(0, 512))))
        elif how == 4 and len(parts) > 1:
            parts[-1] = parts[-1][: len(parts[-1]) // 2] if rng.random() < 0.5 else b""
        try:
            decoder.decode(parts)
            continue
        except ProtocolError:
            batch.append(parts)
        if len(batch) == BATCH or sent + len(batch) == N_MESSAGES:
            send_batch(batch)
            sent += len(batch)
            batch = []
    return sent


def _wait(cond, timeout_s: float, what: str, poll_s: float = 0.005) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(poll_s)


def _scrape(port: int) -> dict[str, float]:
    """A service's Prometheus metrics, ``{"name{labels}": value}``."""
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l and l[0] != "#"}


def _pub(ctx) -> tuple[zmq.Socket, str]:
    """An XPUB with room for the whole fuzz run, bound to a port the OS picks: (socket, endpoint)."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, bind_ephemeral(sock)


def _subscribed(sock: zmq.Socket, n_subscribers: int = 1) -> zmq.Socket:
    """Wait until the service's SUB sent its ``n_subscribers`` subscriptions."""
    subs = 0
    while subs < n_subscribers:
        assert sock.poll(30_000), "service never subscribed"
        if sock.recv()[:1] == b"\x01":
            subs += 1
    return sock


@pytest.mark.slow
def test_emulator_control_router(start_emulator, corpus):
    from services.plumbing.client import GameClient

    emu = start_emulator()
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(emu.cfg.control_endpoint)
    r0 = emu.emu.counters.rejected

    def send(batch):
        for parts in batch:
            dealer.send_multipart(parts)
        while dealer.poll(0):
            dealer.recv_multipart()  # Error replies; keep our queue short

    n = _fuzz(corpus, Decoder(), send)
    _wait(lambda: emu.emu.counters.rejected - r0 == n, 120, "every message counted")
    with GameClient("after-fuzz", frames_endpoint=emu.cfg.frames_endpoint,
                    control_endpoint=emu.cfg.control_endpoint) as c:
        assert c.join(timeout_s=10).session_id == emu.emu.session_id  # still serving
    dealer.close()
    s = emu.stop()
    assert n == N_MESSAGES and s.counters.rejected - r0 == n


@pytest.mark.slow
def test_encoding_service_sub(tmp_path, corpus):
    from encoders.fit import FitConfig, fit_encoding
    from encoders.synth import SynthConfig, generate
    from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service

    s = generate(SynthConfig(voxel_mm=16, n_runs=2, n_trs=30, space_dim=8, seed=1))
    res = fit_encoding(s.bold, {"a": s.features["action"]}, FitConfig(score=False, progress=False), mask=s.mask,
                       affine=s.affine, tr=2.0, roi_labels=s.atlas[s.mask], roi_names=s.roi_names)
    weights = str(res.weights.save(tmp_path / "w.safetensors"))
    ctx = zmq.Context.instance()
    pub, ep = _pub(ctx)
    box, stop = {}, threading.Event()
    cfg = EncodingServiceConfig(weights=weights, activations=[ep], core=CoreConfig(tr_s=0.1, grace_s=0.05),
                                metrics_port=0)
    ready = threading.Event()
    th = threading.Thread(target=lambda: box.update(r=run_encoding_service(cfg, stop=stop, ctx=ctx, ready=ready)),
                          daemon=True)
    th.start()
    assert ready.wait(30), "encoding service did not start"
    _subscribed(pub, n_subscribers=3)  # activation, bold, trigger subscriptions
    topics = [TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_TRIGGER]

    def send(batch):
        for i, parts in enumerate(batch):
            pub.send_multipart([topics[i % 3], *parts])

    n = _fuzz(corpus, Decoder(accept=[Activation, BoldVolume, Trigger]), send)
    good = Channel(pub)
    for k in range(2):  # still serving: two valid triggers close two TRs
        good.send(Trigger(tr_index=k, t_ns=time.monotonic_ns()), topic=TOPIC_TRIGGER)
    # One PUB→SUB pipe keeps order: once both triggers are decoded, every fuzz message before them was too.
    # Trigger 1 closes TR 0 (after its grace); TR 1 closes when the service finishes.
    _wait(lambda: (lambda m: m.get("neuroarcade_encoder_messages_received_total") == 2
                   and m.get("neuroarcade_encoder_trs_predicted_total") == 1)(_scrape(cfg.metrics_port)), 120,
          "the two valid triggers, TR 0 closed", poll_s=0.05)
    stop.set()
    th.join(30)
    pub.close()
    r = box["r"]
    assert n == N_MESSAGES
    assert r.rejected_messages == n and r.received == 2 and r.trs_predicted == 2


@pytest.mark.slow
def test_dashboard_sub(corpus):
    from services.dashboard import DashboardConfig, LiveState, Subscriber

    ctx = zmq.Context.instance()
    pub, ep = _pub(ctx)
    state = LiveState()
    sub = Subscriber(DashboardConfig(frames="", activations=[ep]), state, ctx)
    sub.start()
    _subscribed(pub, n_subscribers=6)
    topics = [TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_TRIGGER, TOPIC_PREDICTION]
    sent = [0]

    def send(batch):
        for i, parts in enumerate(batch):
            pub.send_multipart([topics[i % 4], *parts])
        sent[0] += len(batch)
        # paced per batch: its SUB keeps 1000 messages, a faster flood would be dropped (by design) uncounted
        _wait(lambda: state.counts.get("rejected", 0) == sent[0], 20, "the dashboard counting the batch")

    n = _fuzz(corpus, Decoder(accept=[Activation, BoldVolume, Trigger, Prediction]), send)
    Channel(pub).send(Trigger(tr_index=3, t_ns=time.monotonic_ns()), topic=TOPIC_TRIGGER)
    _wait(lambda: state.scanner["triggers"] == 1, 10, "a valid trigger after the fuzz")
    assert sub.thread.is_alive()
    sub.stop()
    pub.close()
    assert n == N_MESSAGES and state.counts["rejected"] == n


@pytest.mark.slow
def test_agent_frames_path_gameclient(start_emulator, corpus):
    """The agent service's peer input: frames decoded by GameClient.next_frame (AgentService's I/O loop)."""
    from services.plumbing.client import GameClient

    emu = start_emulator()
    ctx = zmq.Context.instance()
    pub, ep = _pub(ctx)
    client = GameClient("fuzzed-agent", frames_endpoint=ep, control_endpoint=emu.cfg.control_endpoint, ctx=ctx)
    client.join(timeout_s=10)
    _subscribed(pub)
    rejected = client.counters  # shared by its frame and control channels

    def send(batch):
        # One at a time: next_frame decodes only the newest queued message (keep-latest), so each
        # message goes out once the one before it was decoded and rejected; none is skipped unseen.
        for parts in batch:
            want = rejected.rejected + 1
            pub.send_multipart([TOPIC_FRAME, *parts])
            t_end = time.monotonic() + 30
            while rejected.rejected < want:
                assert time.monotonic() < t_end, f"message {want} never decoded"
                assert client.next_frame(timeout_ms=100) is None

    n = _fuzz(corpus, Decoder(accept=[Frame]), send)
    assert rejected.rejected == n == N_MESSAGES
    assert client.stats.frames_skipped == 0  # every message decoded, none dropped as stale
    assert client.stats.frames_received == 0 and client.stats.rejoins == 0  # garbage is never a frame, never rejoins
    client.close()
    pub.close()
    emu.stop()


@pytest.mark.slow
def test_scanner_xpub_subscription_input(corpus):
    """Scanner publishers' only input: subscription messages on their XPUB."""
    from services.scanner import TriggerPublisher

    ctx = zmq.Context.instance()
    pub = TriggerPublisher(ctx, "tcp://127.0.0.1:*")
    ep = bound_endpoint(pub.sock)
    rogue = ctx.socket(zmq.XSUB)
    rogue.setsockopt(zmq.LINGER, 0)
    # An XSUB drops what exceeds its send queue; unbounded, every message waits its turn instead (the
    # XPUB's reader pushes back through TCP), so all of them reach the publisher, in order.
    rogue.setsockopt(zmq.SNDHWM, 0)
    rogue.connect(ep)
    count = [0]

    def send(batch):
        for parts in batch:
            rogue.send(b"\x02" + b"".join(parts))  # one frame, never starting with a (un)subscribe byte
        count[0] += len(batch)

    n = _fuzz(corpus, Decoder(), send)
    rogue.send(b"\x01" + TOPIC_TRIGGER)  # after all of them on the same pipe: read once they all were
    assert pub.wait_for_subscribers(1, 60.0, topic=TOPIC_TRIGGER)
    assert pub.subscriptions == [TOPIC_TRIGGER] and n == count[0] == N_MESSAGES
    rogue.close()
    pub.close()


def test_invalid_utf8_in_a_header_does_not_kill_the_emulator(start_emulator):
    from services.plumbing.client import GameClient

    emu = start_emulator()
    r0 = emu.emu.counters.rejected
    bad = msgpack.packb({"v": 1, "kind": "hello", "client_id": "x"}).replace(b"\xa1x", b"\xa1\xdc")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(emu.cfg.control_endpoint)
    dealer.send(bad)
    _wait(lambda: emu.emu.counters.rejected == r0 + 1 or not emu.thread.is_alive(), 30, "the message handled")
    dealer.close()
    assert emu.thread.is_alive(), "the emulator's loop died on one malformed message"
    with GameClient("after", frames_endpoint=emu.cfg.frames_endpoint, control_endpoint=emu.cfg.control_endpoint) as c:
        c.join(timeout_s=5)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level("CRITICAL")
