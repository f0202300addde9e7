"""The scanner room's inputs (issue #13): trigger keypress and serial line, button-box key map, scanner quality.

Everything real: a realtime ALE emulator and the dashboard on loopback sockets, a headless Chromium
driving the participant's page through playwright, a pseudo-terminal pair (``os.openpty``) standing in
for the sync box's serial line (the reader opens the slave's path with pyserial), the encoder's
``VolumeQuality`` messages on a real PUB socket. The browser test presses the trigger key at known
times (this process's monotonic clock, the emulator's on this host) and finds them in the emulator's
recording within one frame; it plays through a custom key map and finds the mapped actions recorded. Two
real encoding services publish their sessions' registration to the weights' space and its overlay PNG; the
dashboard's route and page show what they published.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from protocols import Decoder, Encoder, VolumeQuality
from services.dashboard import (
    Dashboard, DashboardConfig, ParticipantInputs, action_for_held, normalize_key, parse_keymap,
)
from services.emulator import Emulator, EmulatorConfig
from services.plumbing.game import GameSettings
from services.plumbing.recording import read_recording
from services.plumbing.serial_trigger import SerialTriggerConfig, SerialTriggerError, SerialTriggerReader
from services.plumbing.transport import TOPIC_QUALITY, Channel, free_tcp_endpoint, make_socket
from services.plumbing.trclock import FOLDER, TrClock

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BREAKOUT = ["NOOP", "FIRE", "RIGHT", "LEFT"]
BUTTON_BOX = "1=LEFT,2=RIGHT,3=FIRE,4=NOOP"


def _wait_for(fn, timeout_s: float, what: str):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _port() -> int:
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


# --- key map and trigger key: configuration --------------------------------------------------------------


def test_keymap_parses_button_boxes_and_refuses_bad_input():
    assert parse_keymap(BUTTON_BOX) == {"1": "LEFT", "2": "RIGHT", "3": "FIRE", "4": "NOOP"}
    assert parse_keymap("b=left, y=Right, G=fire, r=NOOP") == {"b": "LEFT", "y": "RIGHT", "g": "FIRE", "r": "NOOP"}
    assert parse_keymap("space=FIRE,left=LEFT") == {" ": "FIRE", "ArrowLeft": "LEFT"}
    assert parse_keymap("") == {}
    for bad, msg in (("1=JUMP", "not an ALE action"), ("1LEFT", "KEY=ACTION"), ("=LEFT", "KEY=ACTION"),
                     ("1=LEFT,1=RIGHT", "twice"), ("b=LEFT,B=RIGHT", "twice")):
        with pytest.raises(ValueError, match=msg):
            parse_keymap(bad)
    with pytest.raises(ValueError, match="trigger key"):  # the trigger is never a game action
        ParticipantInputs(trigger_key="5", keymap=parse_keymap("5=FIRE")).check()
    with pytest.raises(ValueError, match="trigger key"):
        ParticipantInputs(trigger_key="T", keymap=parse_keymap("t=FIRE")).check()
    with pytest.raises(ValueError, match="one byte"):
        ParticipantInputs(serial=SerialTriggerConfig(port="/dev/null", char="55")).check()
    ParticipantInputs(trigger_key="t", keymap=parse_keymap("b=LEFT,y=RIGHT,g=FIRE,r=NOOP")).check()
    assert SerialTriggerConfig(char="\\x35").trigger_byte() == ord("5")


def test_held_keys_map_through_the_keymap_and_never_through_the_trigger_key():
    km = parse_keymap(BUTTON_BOX)
    assert action_for_held([], BREAKOUT, km) == (0, "")
    assert action_for_held(["1"], BREAKOUT, km) == (BREAKOUT.index("LEFT"), "1")
    assert action_for_held(["1", "3"], BREAKOUT, km) == (BREAKOUT.index("FIRE"), "3")  # newest button wins
    assert action_for_held(["ArrowRight"], BREAKOUT, km) == (0, "")  # with a key map the arrows do nothing
    assert action_for_held(["5"], BREAKOUT, km, trigger_key="5") == (0, "")
    assert action_for_held(["2", "5"], BREAKOUT, km, trigger_key="5") == (BREAKOUT.index("RIGHT"), "2")
    # a mapped action the game lacks plays NOOP (the page marks the key)
    assert action_for_held(["1"], BREAKOUT, parse_keymap("1=UPLEFT")) == (0, "1")
    # no key map: arrows/WASD + space, as before
    assert action_for_held(["ArrowLeft", " "], ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"], {}) == \
        (5, "FIRE+LEFT")
    assert normalize_key("T") == "t" and normalize_key("space") == " " and normalize_key("ArrowUp") == "ArrowUp"


# --- serial line: a real pseudo-terminal pair ------------------------------------------------------------


def test_serial_trigger_reader_on_a_real_pty_stamps_pulses_on_arrival():
    master, slave = os.openpty()
    stamps: list[int] = []
    reader = SerialTriggerReader(SerialTriggerConfig(port=os.ttyname(slave), baud=115200, char="t",
                                                     min_interval_s=0.05), stamps.append)
    reader.start()
    try:
        sent = []
        for _ in range(5):
            sent.append(time.monotonic_ns())
            os.write(master, b"t")
            time.sleep(0.15)
        os.write(master, b"xyz\r\n")  # other bytes: ignored, counted
        time.sleep(0.15)
        flood_t = time.monotonic_ns()
        os.write(master, b"t" * 200)  # a flood: one pulse, the rest inside min_interval_s
        _wait_for(lambda: reader.counts.pulses + reader.counts.debounced >= 205, 5, "the flood to be read")
        assert reader.counts.pulses == 6, reader.counts
        assert reader.counts.debounced == 199 and reader.counts.other_bytes == 5
        for t_sent, t_got in zip(sent + [flood_t], stamps):
            assert 0 <= t_got - t_sent < 50e6, (t_got - t_sent) / 1e6  # stamped when it arrived
        assert np.allclose(np.diff(stamps[:5]), np.diff(sent), atol=30e6)
        # the device vanishes (USB adapter pulled): counted, the reader keeps trying, stop() still works
        os.close(master)
        _wait_for(lambda: reader.counts.disconnects >= 1, 5, "the disconnect to be noticed")
        assert reader._thread.is_alive()
    finally:
        reader.stop()
        os.close(slave)
    assert not reader._thread.is_alive()


def test_serial_port_missing_is_a_clear_error():
    with pytest.raises(SerialTriggerError, match="/dev/does-not-exist"):
        SerialTriggerReader(SerialTriggerConfig(port="/dev/does-not-exist"), lambda t: None).start()
    dash = Dashboard(DashboardConfig(frames="", control="tcp://127.0.0.1:9", port=_port(),
                                     inputs=ParticipantInputs(serial=SerialTriggerConfig(port="/dev/does-not-exist"))))
    with pytest.raises(SerialTriggerError, match="cannot open serial trigger port"):
        dash.start()
    dash.stop()


# --- TR clock: triggers when present, the folder's arrivals as fallback -------------------------------------


def test_tr_clock_falls_back_to_folder_arrivals_and_reports_their_lag_beside_triggers():
    tr_ns = 2_000_000_000
    # no trigger at all: volume k's arrival stands in for TR k's start one TR earlier
    clock = TrClock(2.0)
    fallback = [clock.on_volume(k, 10 * tr_ns + k * tr_ns + 300_000_000) for k in range(4)]
    assert [f.tr_index for f in fallback] == [0, 1, 2, 3] and all(f.source == FOLDER and f.host_clock for f in fallback)
    assert [f.t_ns for f in fallback] == [9 * tr_ns + k * tr_ns + 300_000_000 for k in range(4)]
    assert clock.on_volume(2, 0) is None  # a duplicate arrival
    burst = clock.on_volume(5, 10 * tr_ns + 5 * tr_ns)  # arrives with… nothing odd
    late = clock.on_volume(4, 10 * tr_ns + 5 * tr_ns)  # out of order, after 5
    assert burst.tr_index == 5 and late.tr_index == 4
    assert clock.report().timed_by == FOLDER and clock.report().fallback_triggers == 6

    # triggers present: no fallback; the folder's lag behind them is reported (p50/max)
    clock = TrClock(2.0)
    lags_ms = [150, 250, 200, 900]
    for k, lag in enumerate(lags_ms):
        clock.on_trigger(k, k * tr_ns, "keyboard")
        assert clock.on_volume(k, k * tr_ns + tr_ns + lag * 1_000_000) is None
    rep = clock.report()
    assert rep.timed_by == "triggers" and rep.triggers == 4 and rep.paired == 4 and rep.fallback_triggers == 0
    assert rep.export_lag_ms_p50 == pytest.approx(225.0) and rep.export_lag_ms_max == pytest.approx(900.0)
    assert rep.trigger_interval_s_p50 == pytest.approx(2.0)
    assert [r["export_lag_ms"] for r in rep.rows] == pytest.approx(lags_ms)


def test_tr_clock_on_sockets_times_trs_from_the_folder_until_a_trigger_comes(tmp_path):
    """A real emulator records the fallback triggers at (arrival - TR) exactly: it honours the host-clock stamp."""
    from protocols import Trigger
    from services.scanner import ScanVolume, publish_stream
    from services.plumbing.trclock import TrClockConfig, run_tr_clock

    tr = 0.5
    emu = _Emu(tmp_path)
    bold_ep = free_tcp_endpoint()
    stop = threading.Event()
    box: dict = {}
    clock = threading.Thread(target=lambda: box.update(report=run_tr_clock(TrClockConfig(
        bold=bold_ep, frames=emu.cfg.frames_endpoint, control=emu.cfg.control_endpoint, tr_s=tr), stop)))
    clock.start()
    ctx = zmq.Context.instance()
    dealer = Channel(make_socket(ctx, zmq.DEALER))
    dealer.sock.connect(emu.cfg.control_endpoint)
    sent_trigger: list[int] = []

    def volumes():
        vol = np.zeros((4, 4, 3), np.int16)
        for k in range(4):
            if k == 3:  # the scanner's pulses start: TR 3 is timed by its trigger, not by the folder
                sent_trigger.append(time.monotonic_ns())
                dealer.send(Trigger(tr_index=3, t_ns=sent_trigger[0], source="simulated", host_clock=True))
            time.sleep(tr)
            yield ScanVolume("run-1", k, k * tr, vol, np.eye(4), f"vol_{k}.nii")

    try:
        assert publish_stream(volumes(), bold_ep, ctx=ctx, wait_subscribers=1) == 4
        time.sleep(0.5)
    finally:
        stop.set()
        clock.join(10)
        dealer.sock.close(0)
        emu.stop()
    rep = box["report"]
    assert rep.timed_by == "mixed" and rep.fallback_triggers == 3 and rep.triggers == 1 and rep.volumes == 4
    assert rep.paired == 1 and 0 <= rep.export_lag_ms_p50 < 200  # volume 3 came one TR (+ a little) after TR 3's pulse
    arrivals = {r["tr_index"]: r["arrival_ns"] for r in rep.rows}
    marks = {m.tr_index: m for m in read_recording(tmp_path / "session.narec").triggers}
    assert sorted(marks) == [0, 1, 2, 3]
    for k in range(3):
        assert marks[k].source == FOLDER and marks[k].t_ns == arrivals[k] - int(tr * 1e9)
    assert marks[3].source == "simulated" and marks[3].t_ns == sent_trigger[0]


# --- the encoder's per-volume quality message ----------------------------------------------------------------


def test_quality_message_round_trips_and_keeps_nan():
    q = VolumeQuality(agent_id="rl-0", condition="", tr_index=3, t_ns=1, params=[0.1, 0, 0, 0, 0, 0.01],
                      fd_mm=0.6, excluded=True, reason="fd", excluded_total=1, volumes=4, process_ms=12.5)
    out = Decoder().decode(Encoder().encode(q))
    assert out == q or (out.params == q.params and out.reason == "fd" and np.isnan(out.std_dvars))
    assert out.aligned == -1 and out.registration == "" and out.overlay_png == b"" and np.isnan(out.align_mm)
    # the registration fields, the overlay PNG as msgpack bin in the header
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    q2 = VolumeQuality(agent_id="rl-0", condition="action", tr_index=0, t_ns=1, aligned=1,
                       registration="aligned: 3.21 mm, 2.05°, match r 0.962", align_mm=3.21, align_deg=2.05,
                       align_match_r=0.962, overlay_png=png)
    out2 = Decoder().decode(Encoder().encode(q2))
    assert out2.overlay_png == png and out2.aligned == 1 and out2.registration == q2.registration
    assert (out2.align_mm, out2.align_deg, out2.align_match_r) == (3.21, 2.05, 0.962)
    # a sender that predates them (its map lacks the new keys): decoded with the defaults
    import msgspec

    old = {"kind": "quality", "v": 1, "agent_id": "rl-0", "condition": "", "tr_index": 2, "t_ns": 5}
    out3 = Decoder().decode([msgspec.msgpack.encode(old)])
    assert out3.aligned == -1 and out3.registration == "" and out3.overlay_png == b"" and np.isnan(out3.align_match_r)


def test_encoder_publishes_motion_fd_exclusion_and_time_per_volume():
    """EncodingCore.volume_quality after each volume of a moving phantom (the live path's preprocessing)."""
    from services.encoding import CoreConfig, EncodingCore

    n, jerk = 16, 12
    ph, w = _phantom_session(n, jerk=jerk, reference=False)
    core = EncodingCore(w, CoreConfig())
    msgs = []
    for t in range(n):
        t0 = time.perf_counter_ns()
        core.on_volume(t, ph.volumes[t])
        msgs.append(Decoder().decode(Encoder().encode(core.volume_quality(t, (time.perf_counter_ns() - t0) / 1e6))))
    assert all(len(m.params) == 6 and m.process_ms > 0 and m.preprocess_ms > 0 for m in msgs)
    assert [m.excluded for m in msgs] == [t in core.excluded_trs for t in range(n)]
    assert [m.excluded_total for m in msgs] == list(np.cumsum([m.excluded for m in msgs]))
    assert msgs[-1].volumes == n
    assert msgs[jerk].excluded and msgs[jerk].reason.startswith("FD") and msgs[jerk].fd_mm > 0.9, msgs[jerk]
    assert msgs[jerk - 1].fd_mm < 0.9 and not msgs[jerk - 1].excluded
    # these weights keep no reference volume: never registered, and the message says why
    assert all(m.aligned == -1 and "no reference" in m.registration and not m.overlay_png for m in msgs)


def _phantom_session(n: int, seed: int = 2, jerk: int | None = None, reference: bool = True):
    """A moving phantom head (slow ramp; a 2 mm / 1° jerk at volume ``jerk`` if given) and weights fitted on it
    with causal preprocessing; ``reference``: the weights keep its unmoved brain as their reference volume."""
    from encoders.fit import FitConfig, fit_encoding
    from encoders.phantom import PhantomConfig, phantom_run
    from encoders.preprocess import PreprocessConfig
    from encoders.weights import PreprocessRecord

    ph = phantom_run(PhantomConfig(shape=(20, 20, 12), voxel_mm=(6.0, 6.0, 6.0), n_volumes=n,
                                   jerks=() if jerk is None else (jerk,), jerk_mm=2.0, jerk_deg=1.0, ramp_mm=0.5,
                                   ramp_deg=0.5, drift=0.0, noise=0.0, spikes=(), exact=False, seed=seed))
    mask = ph.brain > 500
    rng = np.random.default_rng(0)
    X = [rng.normal(size=(n, 3)).astype(np.float32) for _ in range(2)]
    Y = [(x @ rng.normal(size=(3, int(mask.sum())))).astype(np.float32) for x in X]
    w = fit_encoding(Y, {"action": X}, FitConfig(score=False, progress=False, delays=[0]), mask=mask,
                     affine=ph.affine, tr=2.0, provenance={"action": {"model": "m", "condition": "action",
                                                                      "pooling": "mean", "layer": 1}}).weights
    w.preprocessing = PreprocessRecord(mode="causal", config=PreprocessConfig(
        warmup_trs=4, fd_threshold_mm=0.9, dvars_threshold=0.0).to_dict())
    if reference:
        w.reference = ph.brain.copy()
    return ph, w


@pytest.mark.timeout(180)
def test_registration_and_its_overlay_reach_the_dashboard_from_the_encoders(tmp_path):
    """Scanner PUB → two real encoding services (one whose weights' reference matches the head, one whose
    reference is noise: cannot be registered) → the dashboard: per stream the registration state, and the
    overlay PNG exactly as the encoder published it, at /api/overlay.png and on the page."""
    import hashlib
    import io
    import urllib.error
    import urllib.parse
    import urllib.request

    from PIL import Image

    from protocols import Status
    from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service
    from services.plumbing.transport import TOPIC_HEARTBEAT, split_topic
    from services.scanner import ScanVolume, publish_stream

    n = 8
    ph, w = _phantom_session(n)
    w.save(tmp_path / "ok.npz")
    w.reference = np.random.default_rng(5).gamma(2.0, 100.0, ph.brain.shape).astype(np.float32)  # no head in it
    w.save(tmp_path / "bad.npz")
    ctx = zmq.Context.instance()
    scan_ep = free_tcp_endpoint()
    eps = {"enc-ok": free_tcp_endpoint(), "enc-bad": free_tcp_endpoint()}
    stop = threading.Event()
    reports: dict = {}
    threads = []
    for name, out_dir in (("enc-ok", str(tmp_path / "enc-ok")), ("enc-bad", "")):  # '' : no file, wire only
        ready = threading.Event()
        cfg = EncodingServiceConfig(weights=str(tmp_path / f"{name[4:]}.npz"), bold=[scan_ep], predictions=eps[name],
                                    out_dir=out_dir, out_stem="enc", core=CoreConfig(agent_id=name), status_s=0.05)
        th = threading.Thread(target=lambda c=cfg, r=ready, k=name: reports.update({k: run_encoding_service(
            c, stop, ready=r)}), name=name, daemon=True)
        th.start()
        threads.append(th)
        assert ready.wait(30), f"{name} did not start"
    sink = Channel(make_socket(ctx, zmq.SUB), Decoder(accept=[VolumeQuality, Status]))  # what the encoders publish
    for topic in (TOPIC_QUALITY, TOPIC_HEARTBEAT):
        sink.sock.setsockopt(zmq.SUBSCRIBE, topic)
    for ep in eps.values():
        sink.sock.connect(ep)
    published: list[VolumeQuality] = []
    heard: set[str] = set()

    def drain() -> None:
        while sink.sock.poll(0):
            msg = sink.decode(split_topic(sink.recv_parts())[1])
            if isinstance(msg, Status):
                heard.update(msg.clients)
            elif isinstance(msg, VolumeQuality):
                published.append(msg)

    dash = Dashboard(DashboardConfig(frames="", control="", predictions=list(eps.values()), port=_port()))
    dash.start()
    try:
        _wait_for(lambda: drain() or heard == set(eps), 20, "both encoders' heartbeats")
        _wait_for(lambda: dash.state.counts.get("status", 0) >= 10, 20, "the encoders' heartbeats at the dashboard")

        def volumes():
            for k in range(n):
                yield ScanVolume("run-1", k, 2.0 * k, ph.volumes[k], ph.affine, f"vol_{k}.nii")

        assert publish_stream(volumes(), scan_ep, ctx=ctx, wait_subscribers=2) == n
        keys = {name: f"{name} · action" for name in eps}
        _wait_for(lambda: all(dash.state.snapshot()["quality"].get(k, {}).get("volumes") == n for k in keys.values()),
                  60, "every volume's quality at the dashboard")
        # n volumes' messages per stream, plus one carrying the overlay once drawn (off the encoder's loop)
        _wait_for(lambda: drain() or len(published) == 2 * n + 2, 30, "every quality message at the test's SUB")
        q = dash.state.snapshot()["quality"]
        # per stream, the PNG went out once, in a message of its own
        sent = {name: [m for m in published if m.agent_id == name and m.overlay_png] for name in eps}
        assert [len(v) for v in sent.values()] == [1, 1]
        ok, bad = sent["enc-ok"][0], sent["enc-bad"][0]
        assert ok.aligned == 1 and ok.registration.startswith("aligned: ") and ok.align_match_r > 0.9
        assert ok.align_mm < 1.0 and ok.align_deg < 1.0  # the first volume: the ramp has barely started
        assert bad.aligned == 0 and bad.registration.startswith("NOT aligned: ") and np.isnan(bad.align_mm)
        for m in published:  # the state rides on every later message, the image does not
            assert m.aligned == (1 if m.agent_id == "enc-ok" else 0) and (m is sent[m.agent_id][0]) == bool(m.overlay_png)
        # small: downscaled/quantized from the overlay the report uses (written beside the scores)
        png = Image.open(io.BytesIO(ok.overlay_png))
        full = Image.open(tmp_path / "enc-ok" / "enc_alignment.png")
        print(f"overlay on the wire {len(ok.overlay_png)} B, {png.size}; file {full.size}, "
              f"{(tmp_path / 'enc-ok' / 'enc_alignment.png').stat().st_size} B")
        assert len(ok.overlay_png) < 100_000 and png.width <= 1100 and png.format == "PNG"
        assert abs(png.width / png.height - full.width / full.height) < 0.05
        # the dashboard's state and route
        assert (q[keys["enc-ok"]]["aligned"], q[keys["enc-bad"]]["aligned"]) == (1, 0)
        assert q[keys["enc-ok"]]["registration"] == ok.registration
        assert q[keys["enc-ok"]]["align_match_r"] == pytest.approx(ok.align_match_r)
        assert q[keys["enc-bad"]]["registration"] == bad.registration
        base = dash.url.rstrip("/")

        def get(key: str) -> bytes:
            with urllib.request.urlopen(f"{base}/api/overlay.png?stream={urllib.parse.quote(key)}", timeout=10) as r:
                assert r.headers["Content-Type"] == "image/png"
                return r.read()

        assert get(keys["enc-ok"]) == ok.overlay_png and get(keys["enc-bad"]) == bad.overlay_png
        with pytest.raises(urllib.error.HTTPError, match="404"):
            get("nobody · action")

        if Path(CHROMIUM).exists():  # the page: state text and the image the route serves
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1500, "height": 1300})
                page.goto(dash.url)
                for name, m in (("enc-ok", ok), ("enc-bad", bad)):
                    _wait_for(lambda: keys[name] in page.eval_on_selector_all(
                        "#qc-stream option", "os => os.map(o => o.value)"), 20, "the stream in the selector")
                    page.select_option("#qc-stream", keys[name])
                    _wait_for(lambda: page.get_attribute("#qc-align", "data-aligned") == str(m.aligned), 20,
                              f"{name}'s registration state on the page")
                    _wait_for(lambda: page.evaluate("() => { const i = document.getElementById('qc-overlay');"
                                                    " return i.complete && i.naturalWidth > 0; }"), 20,
                              f"{name}'s overlay image loaded")
                    chip, text = page.text_content("#qc-align-state"), page.text_content("#qc-align-text")
                    shown = page.evaluate("""async () => {
                        const r = await fetch(document.getElementById('qc-overlay').src);
                        const d = await crypto.subtle.digest('SHA-256', await r.arrayBuffer());
                        return Array.from(new Uint8Array(d)).map(b => b.toString(16).padStart(2, '0')).join(''); }""")
                    assert shown == hashlib.sha256(m.overlay_png).hexdigest()
                    assert page.evaluate("() => document.getElementById('qc-overlay').naturalWidth") == \
                        Image.open(io.BytesIO(m.overlay_png)).width
                    if m.aligned == 1:
                        assert chip == "aligned" and "match r " + f"{m.align_match_r:.3f}" in text, text
                    else:
                        assert chip == "NOT aligned" and text and text in m.registration, (chip, text)
                page.screenshot(path=str(tmp_path / "alignment.png"), full_page=True)
                browser.close()
    finally:
        stop.set()
        for th in threads:
            th.join(30)
        dash.stop()
        sink.sock.close(linger=0)
    assert reports["enc-ok"].registration["converged"] and not reports["enc-bad"].registration["converged"]
    assert reports["enc-ok"].registration["overlay"].endswith("enc_alignment.png")


# --- the participant's page: trigger key, serial line, button box, scanner quality ---------------------------


class _Emu:
    def __init__(self, tmp: Path):
        self.cfg = EmulatorConfig(game=GameSettings(game="ALE/Breakout-v5", seed=0), mode="realtime",
                                  controller="human", frames_endpoint=free_tcp_endpoint(),
                                  control_endpoint=free_tcp_endpoint(), record_path=str(tmp / "session.narec"),
                                  heartbeat_s=2.0)
        self.emu = Emulator(self.cfg)
        self.thread = threading.Thread(target=self.emu.run, name="emulator", daemon=True)
        self.thread.start()
        assert self.emu.ready.wait(20), "emulator did not bind"

    def stop(self):
        self.emu.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


def _quality(t: int, excluded: bool) -> VolumeQuality:
    return VolumeQuality(agent_id="rl-0", condition="", tr_index=t, t_ns=time.monotonic_ns(),
                         params=[0.05 * t, -0.02 * t, 0.01, 0.001 * t, 0.0, -0.0005 * t], fd_mm=0.9 if excluded else 0.1,
                         std_dvars=1.0, excluded=excluded, reason="FD 0.90 mm > 0.5 mm" if excluded else "",
                         excluded_total=sum(1 for k in (3, 7) if k <= t), volumes=t + 1, preprocess_ms=8.0 + t,
                         process_ms=10.0 + t)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: apt-get install chromium")
@pytest.mark.timeout(180)
def test_trigger_key_and_button_box_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    master, slave = os.openpty()
    emu = _Emu(tmp_path)
    ctx = zmq.Context.instance()
    encoder = Channel(make_socket(ctx, zmq.PUB, hwm=1000))
    qc_ep = free_tcp_endpoint()
    encoder.sock.bind(qc_ep)
    inputs = ParticipantInputs(trigger_key="5", keymap=parse_keymap(BUTTON_BOX),
                               serial=SerialTriggerConfig(port=os.ttyname(slave), char="t"))
    dash = Dashboard(DashboardConfig(frames=emu.cfg.frames_endpoint, control=emu.cfg.control_endpoint,
                                     predictions=[qc_ep], port=_port(), play=True, inputs=inputs))
    dash.start()
    frame_ns = 1e9 * 4 / 60  # one frame of the stream: frameskip 4 at 60 Hz
    presses: list[int] = []
    serial_writes: list[int] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(dash.url)
            _wait_for(lambda: "you control" in page.text_content("#play-role"), 30, "the controller role")
            # the button box's map is on the page, and the trigger key beside it
            rows = page.eval_on_selector_all("#play-keymap tr", "rs => rs.map(r => [r.dataset.key, r.dataset.action])")
            assert rows == [["1", "LEFT"], ["2", "RIGHT"], ["3", "FIRE"], ["4", "NOOP"]]
            assert page.text_content("#trigger-key").startswith('key "5"')
            page.click("#game")

            # play through the key map: each button's action is applied by the emulator
            for key, action in (("3", "FIRE"), ("2", "RIGHT"), ("1", "LEFT")):
                page.keyboard.down(key)
                _wait_for(lambda: page.text_content("#play-action") == action, 15, f"{action} on the page")
                _wait_for(lambda: page.text_content("#frame-action") == f"{action} by human", 15,
                          f"a frame stepped with the button box's {action}")
                page.keyboard.up(key)
            # an arrow is no game key under a button-box map
            page.keyboard.down("ArrowRight")
            time.sleep(0.3)
            assert page.text_content("#play-action") == "NOOP"
            page.keyboard.up("ArrowRight")

            # the sync box's keypress at known intervals (this clock is the emulator's: same host)
            for gap in (0.0, 0.6, 0.45, 0.8, 0.5, 0.7):
                time.sleep(gap)
                presses.append(time.monotonic_ns())
                page.keyboard.press("5")
            time.sleep(0.3)
            page.keyboard.down("5")  # held: the key repeats, still one pulse
            page.keyboard.down("5")
            page.keyboard.up("5")
            _wait_for(lambda: page.get_attribute("#trigger-count", "data-n") == "7", 10,
                      f"7 trigger pulses forwarded (state: {dash.state.inputs})")
            time.sleep(0.3)
            # a flood of trigger messages from the page: one pulse, the rest dropped and counted
            page.evaluate("() => { for (let i = 0; i < 50; i++) send({type: 'trigger', key: '5'}); }")
            _wait_for(lambda: (dash.state.inputs.get("triggers_debounced", 0)
                               + sum(dash.state.inputs.get("triggers_by_source", {}).values())) >= 57, 10,
                      "the flood to be handled")
            time.sleep(0.3)
            # the sync box's serial line, through the same forwarder
            for gap in (0.0, 0.5):
                time.sleep(gap)
                serial_writes.append(time.monotonic_ns())
                os.write(master, b"t")
            _wait_for(lambda: dash.state.inputs.get("triggers_by_source", {}).get("serial") == 2, 10,
                      "the serial pulses")
            _wait_for(lambda: "serial 2" in page.text_content("#trigger-sources"), 10, "serial pulses on the page")
            # the recorded triggers reach the page's TR clock (the emulator re-publishes them)
            _wait_for(lambda: page.text_content("#tr-index").startswith("TR "), 10, "the TR clock")

            # scanner quality: the encoder's per-volume messages become the motion/FD/time panel
            def publish_quality():
                for t in range(10):
                    encoder.send(_quality(t, excluded=t in (3, 7)), topic=TOPIC_QUALITY)
                return page.get_attribute("#qc-summary", "data-volumes") == "10"
            _wait_for(publish_quality, 20, "10 volumes in the quality panel")
            assert page.get_attribute("#qc-summary", "data-excluded") == "2"
            assert page.text_content("#qc-excluded") == "2"
            assert "fd 2" in page.text_content("#qc-summary")
            assert float(page.text_content("#qc-ms-p50")) == pytest.approx(14.5, abs=0.01)
            q = dash.state.snapshot()["quality"]["rl-0"]
            assert q["params"][9][0] == pytest.approx(0.45) and q["excluded"] == [t in (3, 7) for t in range(10)]
            page.screenshot(path=str(tmp_path / "triggers.png"), full_page=True)
            browser.close()
        inputs_state = dict(dash.state.inputs)
    finally:
        dash.stop()
        emu.stop()
        encoder.sock.close(linger=0)
        os.close(master)
        os.close(slave)

    rec = read_recording(tmp_path / "session.narec")
    assert rec.header.action_meanings == BREAKOUT
    marks = sorted(rec.triggers, key=lambda m: m.tr_index)
    keyboard = [m for m in marks if m.source == "keyboard"]
    serial = [m for m in marks if m.source == "serial"]
    assert [m.tr_index for m in marks] == list(range(len(marks)))  # one TR count for both sources
    flood = len(keyboard) - 7
    assert 1 <= flood <= 3 and flood + inputs_state["triggers_debounced"] == 50, (flood, inputs_state)
    # each pressed trigger is where it was pressed, within one frame; so are the intervals between them
    timed = presses[:6]
    got = [m.t_ns for m in keyboard[:6]]
    for t_press, t_mark in zip(timed, got):
        assert 0 <= t_mark - t_press < frame_ns, f"trigger mark {(t_mark - t_press) / 1e6:.1f} ms after the press"
    assert np.all(np.abs(np.diff(got) - np.diff(timed)) < frame_ns)
    assert keyboard[6].t_ns - presses[5] > 0  # the held key's one pulse came after the last press
    assert len(serial) == 2
    for t_write, m in zip(serial_writes, serial):
        assert 0 <= m.t_ns - t_write < frame_ns, f"serial mark {(m.t_ns - t_write) / 1e6:.1f} ms after the write"
    # frames map to those TRs: every keyboard TR holds frames
    per_tr = rec.frames_per_tr()
    assert all(per_tr[m.tr_index] for m in keyboard[:5])
    # the button box's actions were applied, and the trigger key never was one
    by_human = [s.action for s in rec.steps if s.controller == "human"]
    for name in ("LEFT", "RIGHT", "FIRE"):
        assert BREAKOUT.index(name) in by_human, f"the emulator never applied the button box's {name}"
    t0, t1 = keyboard[0].t_ns, keyboard[5].t_ns
    during = {s.action for s in rec.steps if s.controller == "human" and t0 <= s.t_ns <= t1}
    assert during == {0}, f"actions while only the trigger key was pressed: {during}"


def test_live_faults_need_the_simulated_scanner_and_a_valid_setting(tmp_path):
    """`live --simulate RUN --faults …` as `scanner simulated --faults`: a bad setting or no --simulate is one
    error line, exit 2, before any session starts."""
    from typer.testing import CliRunner

    from neuroarcade.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["live", str(tmp_path / "p"), "--scanner-folder", str(tmp_path / "f"),
                              "--faults", "realistic"])
    assert res.exit_code == 2 and "--simulate" in res.output, res.output
    res = runner.invoke(app, ["live", str(tmp_path / "p"), "--scanner-folder", str(tmp_path / "f"), "--simulate",
                              str(tmp_path / "run.nii.gz"), "--faults", "realistic,wobble=2"])
    assert res.exit_code == 2 and "wobble" in res.output, res.output
