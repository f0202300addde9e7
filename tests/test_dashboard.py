"""Live dashboard: a real emulator, real ZMQ publishers, the real web server, a real headless Chromium.

The publishers in these tests (scanner triggers/volumes, an agent's activations/decisions, an
encoder's predictions) are real ZMQ clients of the dashboard sending protocol messages on
loopback; the emulator is the real one, and keyboard play goes through the page's key events.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from protocols import Action, Activation, BoldVolume, Prediction, Trigger
from services.dashboard import Dashboard, DashboardConfig, action_for_keys, check_access
from services.plumbing.recording import read_recording
from services.plumbing.transport import (
    TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_PREDICTION, TOPIC_TRIGGER, Channel, free_tcp_endpoint, make_socket,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
PONG = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
BREAKOUT = ["NOOP", "FIRE", "RIGHT", "LEFT"]
FULL = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE",
        "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]


def test_keys_map_to_the_games_action_names():
    assert action_for_keys(set(), PONG) == 0
    assert action_for_keys({"FIRE"}, PONG) == 1
    assert action_for_keys({"UP"}, PONG) == PONG.index("RIGHT")  # Pong paddles: RIGHT moves up
    assert action_for_keys({"DOWN", "FIRE"}, PONG) == PONG.index("LEFTFIRE")
    assert action_for_keys({"LEFT"}, BREAKOUT) == BREAKOUT.index("LEFT")
    assert action_for_keys({"LEFT", "FIRE"}, BREAKOUT) == BREAKOUT.index("LEFT")  # no LEFTFIRE: drop FIRE
    assert action_for_keys({"UP", "LEFT", "FIRE"}, FULL) == FULL.index("UPLEFTFIRE")
    assert action_for_keys({"UP", "DOWN"}, FULL) == 0  # opposite keys cancel
    assert action_for_keys({"DOWN", "RIGHT"}, FULL) == FULL.index("DOWNRIGHT")


def test_token_required_off_loopback():
    check_access(DashboardConfig(host="127.0.0.1"))
    check_access(DashboardConfig(host="::1"))
    check_access(DashboardConfig(host="0.0.0.0", token="s3cret"))
    with pytest.raises(ValueError, match="--token"):
        check_access(DashboardConfig(host="0.0.0.0"))
    with pytest.raises(ValueError, match="--token"):
        Dashboard(DashboardConfig(host="192.168.1.20", frames="", control=""))


def _port() -> int:
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_token_guards_every_route():
    dash = Dashboard(DashboardConfig(frames="", control="", port=_port(), token="s3cret"))
    dash.start()
    try:
        base = f"http://127.0.0.1:{dash.cfg.port}"
        assert _get(base + "/")[0] == 401
        assert _get(base + "/static/dashboard.js")[0] == 401
        assert _get(base + "/api/state?token=wrong")[0] == 401
        status, body = _get(base + "/?token=s3cret")
        assert status == 200 and b"neuroarcade" in body
        status, body = _get(base + "/api/state", {"X-Neuroarcade-Token": "s3cret"})
        assert status == 200 and json.loads(body)["frame"] == {}
        assert _get(base + "/api/state", {"Authorization": "Bearer s3cret"})[0] == 200
        assert _get(base + "/static/../dashboard.py?token=s3cret")[0] == 404
        assert _get(base + "/metrics")[0] == 401
        status, body = _get(base + "/metrics", {"Authorization": "Bearer s3cret"})  # how Prometheus passes it
        assert status == 200 and b"neuroarcade_dashboard_messages_rejected_total 0.0" in body
    finally:
        dash.stop()


class FakeScannerEncoderAgent:
    """Real ZMQ publishers of the three upstream streams the dashboard shows, paced at a short TR.

    Per TR: a Trigger and a BoldVolume (scanner), an Activation and an Action per condition
    (agent), and per condition a Prediction whose measured ROI means follow a slow signal and
    whose predicted means are that signal mixed with noise at a planted strength per ROI.
    """

    def __init__(self, roi_names: list[str], frames_endpoint: str, tr_s: float = 0.25):
        self.ctx = zmq.Context.instance()
        self.frames = make_socket(self.ctx, zmq.SUB, hwm=4)
        self.frames.setsockopt(zmq.SUBSCRIBE, b"frame")
        self.frames.connect(frames_endpoint)
        self.endpoints = {k: free_tcp_endpoint() for k in ("scanner", "agent", "encoder")}
        self.socks = {k: Channel(make_socket(self.ctx, zmq.PUB)) for k in self.endpoints}
        for k, ch in self.socks.items():
            ch.sock.bind(self.endpoints[k])
        self.roi_names = ["all", *roi_names]
        self.tr_s = tr_s
        self.stop_event = threading.Event()
        self.trs_sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stop_event.set()
        self.thread.join(5)
        for ch in self.socks.values():
            ch.sock.close(linger=0)
        self.frames.close(linger=0)

    def _newest_frame(self, seq: int, t_ns: int) -> tuple[int, int]:
        """The agent decides on the newest emulator frame (seq and emulator time stamp)."""
        while True:
            try:
                parts = self.frames.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return seq, t_ns
            header = msgspec.msgpack.decode(parts[1])
            seq, t_ns = header["seq"], header["t_ns"]

    def _run(self):
        rng = np.random.default_rng(0)
        n = len(self.roi_names)
        strength = {"action": np.linspace(0.9, 0.2, n), "reasoning": np.linspace(0.3, 0.8, n)}
        hist = {c: ([], []) for c in strength}
        t, seq, frame_t_ns = 0, 0, time.monotonic_ns()
        while not self.stop_event.is_set():
            now = time.monotonic_ns()
            seq, frame_t_ns = self._newest_frame(seq, frame_t_ns)
            self.socks["scanner"].send(Trigger(tr_index=t, t_ns=now, source="test-scanner"), topic=TOPIC_TRIGGER)
            self.socks["scanner"].send(BoldVolume(run="run-1", tr_index=t, acq_time_s=t * self.tr_s, t_ns=now,
                                                  affine=[float(x) for x in np.eye(4).ravel()], data=np.zeros((4, 5, 3), np.float32),
                                                  source="simulated"), topic=TOPIC_BOLD)
            measured = np.sin(t / 3.0 + np.arange(n)) + 0.3 * rng.standard_normal(n)
            for cond, rho in strength.items():
                self.socks["agent"].send(Activation(
                    agent_id="vlm-0", model="tiny-qwen2.5-vl", condition=cond, layers=[0, 1, 2], pooling="last_token",
                    frame_seqs=[seq], t_ns=now + int(30e6), vectors=np.zeros((3, 64), np.float32), frame_t_ns=frame_t_ns),
                    topic=TOPIC_ACTIVATION)
                probs = rng.dirichlet(np.ones(6))
                self.socks["agent"].send(Action(agent_id="vlm-0", frame_seq=seq, action=int(probs.argmax()),
                                                probs=[float(p) for p in probs], condition=cond,
                                                latency_ns=int(40e6 + 5e6 * rng.random())), topic=b"action")
                predicted = rho * measured + np.sqrt(1 - rho**2) * rng.standard_normal(n)
                hist[cond][0].append(predicted)
                hist[cond][1].append(measured)
                p, m = np.array(hist[cond][0]), np.array(hist[cond][1])
                scores = [float(np.corrcoef(p[:, i], m[:, i])[0, 1]) if len(p) > 2 else float("nan") for i in range(n)]
                self.socks["encoder"].send(Prediction(
                    agent_id="vlm-0", condition=cond, tr_index=t, t_ns=now, roi_names=self.roi_names,
                    roi_predicted=[float(x) for x in predicted], roi_measured=[float(x) for x in measured],
                    roi_scores=scores), topic=TOPIC_PREDICTION)
            self.trs_sent = t = t + 1
            self.stop_event.wait(self.tr_s)


@pytest.fixture
def atlas_files(tmp_path: Path):
    import nibabel as nib

    from encoders.synth import brain_grid, roi_atlas

    mask, affine = brain_grid(6.0)
    labels, names = roi_atlas(mask, affine)
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "atlas.nii.gz")
    (tmp_path / "atlas_labels.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in names.items()))
    return tmp_path / "atlas.nii.gz", tmp_path / "atlas_labels.tsv", list(names.values())


def _wait_for(fn, timeout_s: float, what: str):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: apt-get install chromium "
                                                         "(see docs/dashboard.md)")
@pytest.mark.slow
def test_dashboard_in_headless_chromium(start_emulator, atlas_files):
    from playwright.sync_api import sync_playwright

    atlas, atlas_labels, roi_names = atlas_files
    emu = start_emulator(game="ALE/Pong-v5", mode="realtime")
    upstream = FakeScannerEncoderAgent(roi_names, emu.cfg.frames_endpoint)
    cfg = DashboardConfig(frames=emu.cfg.frames_endpoint, control=emu.cfg.control_endpoint,
                          activations=[upstream.endpoints["agent"]], bold=[upstream.endpoints["scanner"]],
                          predictions=[upstream.endpoints["encoder"]], port=_port(), play=True,
                          atlas=str(atlas), atlas_labels=str(atlas_labels), max_fps=20)
    dash = Dashboard(cfg)
    dash.start()
    upstream.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1180})
            page.goto(dash.url)
            seq = lambda: int(page.get_attribute("#frame-seq", "data-seq"))  # noqa: E731
            points = lambda: int(page.get_attribute("#roi-points", "data-points"))  # noqa: E731

            first = _wait_for(lambda: seq() >= 0 and seq() + 1, 15, "a first frame on the page") - 1
            _wait_for(lambda: seq() >= first + 10, 10, "frames to advance on the page")
            p0 = _wait_for(points, 15, "ROI time-course points")
            _wait_for(lambda: points() > p0, 10, "the ROI chart to update")
            _wait_for(lambda: page.text_content("#agents").count("latency") >= 2, 10, "agent decisions")
            assert "RIGHT" in page.text_content("#frame-action") or "by" in page.text_content("#frame-action")
            assert page.text_content("#tr-index").startswith("TR ")

            # keyboard play: the dashboard is the controller "human"; up arrow = RIGHT in Pong, space = FIRE
            _wait_for(lambda: "you control" in page.text_content("#play-role"), 10, "the controller role")
            page.click("#game")
            page.keyboard.down("ArrowUp")
            _wait_for(lambda: page.text_content("#play-action") == "RIGHT", 5, "RIGHT to be the played action")
            time.sleep(0.5)
            page.keyboard.up("ArrowUp")
            page.keyboard.down(" ")
            _wait_for(lambda: page.text_content("#play-action") == "FIRE", 5, "FIRE to be the played action")
            time.sleep(0.5)
            page.keyboard.up(" ")
            time.sleep(0.6)  # several TRs: the time courses fill in a little more for the screenshot
            out = REPO / "docs" / "dashboard.png"
            out.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        upstream.stop()
        dash.stop()
    emu.stop()
    rec = read_recording(emu.cfg.record_path)
    by_human = [s.action for s in rec.steps if s.controller == "human"]
    assert PONG.index("RIGHT") in by_human, "the emulator never applied the browser's up arrow"
    assert PONG.index("FIRE") in by_human, "the emulator never applied the browser's space bar"
    assert out.stat().st_size > 20_000


def test_subscriber_keeps_bounded_newest_state_and_survives_bad_messages():
    ctx = zmq.Context.instance()
    encoder = Channel(make_socket(ctx, zmq.PUB, hwm=10_000))
    endpoint = free_tcp_endpoint()
    encoder.sock.bind(endpoint)
    dash = Dashboard(DashboardConfig(frames="", control="", predictions=[endpoint], port=_port(), history_trs=50))
    dash.start()

    def pred(t: int, agent: str = "rl-0") -> Prediction:
        return Prediction(agent_id=agent, condition="", tr_index=t, t_ns=time.monotonic_ns(), roi_names=["all", "v1"],
                          roi_predicted=[0.1 * t, float("nan")], roi_measured=[1.0, 2.0], roi_scores=[0.5, float("nan")])

    try:
        def probe():  # slow joiner: publish until the subscription is live
            encoder.send(pred(0, "probe"), topic=TOPIC_PREDICTION)
            return dash.state.counts.get("prediction")
        _wait_for(probe, 10, "the dashboard to subscribe")
        encoder.sock.send_multipart([TOPIC_PREDICTION, b"\xc1 not msgpack"])
        encoder.sock.send_multipart([TOPIC_PREDICTION, msgspec.msgpack.encode({"v": 99, "kind": "prediction"})])
        for t in range(300):
            encoder.send(pred(t), topic=TOPIC_PREDICTION)
        _wait_for(lambda: dash.state.snapshot()["streams"].get("rl-0", {}).get("last_tr") == 299, 10, "TR 299")
        status, body = _get(f"http://127.0.0.1:{dash.cfg.port}/api/state")
        assert status == 200
        snap = json.loads(body)  # NaN became null: the page gets strict JSON
        rl = snap["streams"]["rl-0"]
        assert rl["tr"] == list(range(250, 300))  # only the newest history_trs TRs are kept
        assert rl["predicted"][-1] == [pytest.approx(29.9), None] and rl["scores"] == [0.5, None]
        assert snap["counts"]["rejected"] == 2
        status, body = _get(f"http://127.0.0.1:{dash.cfg.port}/metrics")
        metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in body.decode().splitlines() if line and not line.startswith("#")}
        assert metrics["neuroarcade_dashboard_messages_rejected_total"] == 2
        assert metrics['neuroarcade_dashboard_messages_received_total{kind="prediction"}'] >= 301
        assert metrics["neuroarcade_dashboard_prediction_streams"] == 2  # the probe's and rl-0's
        assert _get(f"http://127.0.0.1:{dash.cfg.port}/api/frame.png")[0] == 404
    finally:
        dash.stop()
        encoder.sock.close(linger=0)
