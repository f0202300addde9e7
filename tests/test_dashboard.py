"""Live dashboard: the real web server, a real headless Chromium, and for the page test the real services.

The browser test runs the scanner-side live session (``pipelines.session.run_live``): a realtime
emulator whose controller is the dashboard's keyboard, the RL agent and the tiny VLM in their own
processes, a simulated scanner writing a synthetic participant's volumes into an export folder with
triggers, the folder watcher and one encoding service per stream. Keyboard play goes through the
page's key events and is checked in the emulator's recording. The screenshot goes to the test's
temporary folder; ``make docs-dashboard`` (NEUROARCADE_SCREENSHOT) also copies it to docs/dashboard.png.
The other tests feed the dashboard from real ZMQ publishers on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest
import zmq

from protocols import Prediction
from services.dashboard import Dashboard, DashboardConfig, action_for_keys, check_access
from services.plumbing.recording import read_recording
from services.plumbing.transport import TOPIC_PREDICTION, Channel, free_tcp_endpoint, make_socket

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


def _wait_for(fn, timeout_s: float, what: str):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


LIVE_S = 50.0
"""How long the live session plays once every agent has joined: the page checks run inside that window."""
SCREENSHOT_ENV = "NEUROARCADE_SCREENSHOT"
"""Set to a path (``make docs-dashboard``: docs/dashboard.png) to also copy the page's screenshot there."""


class LiveSession:
    """``pipelines.session.run_live`` in a thread (it blocks for the session); ``url`` once the dashboard serves."""

    def __init__(self, plan_kw: dict, participant, out: Path):
        from pipelines.session import LivePlan

        self.url: str | None = None
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.plan = LivePlan(participant, out / "export", out / "live", on_dashboard=self._on_url, **plan_kw)
        self.thread = threading.Thread(target=self._run, name="run-live", daemon=True)
        self.thread.start()

    def _on_url(self, url: str) -> None:
        self.url = url

    def _run(self) -> None:
        from pipelines.session import run_live

        try:
            self.summary = run_live(self.plan, progress=lambda m: None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self.error = e

    def wait_url(self, timeout_s: float) -> str:
        _wait_for(lambda: self.url or not self.thread.is_alive(), timeout_s, "the live session's dashboard")
        if self.error is not None:
            raise self.error
        assert self.url, "run_live ended without serving the dashboard"
        return self.url

    def join(self, timeout_s: float) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"run_live did not end within {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.summary


def _agent_latencies(page) -> dict[str, list[str]]:
    """Agent id → the latency text of each of its prompt conditions, as the Agents panel shows them."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#agents .agent')].map((a) => [
        a.querySelector('.name').textContent,
        [...a.querySelectorAll('.cond .meta span')].filter((s) => s.textContent.startsWith('latency'))
            .map((s) => s.querySelector('b').textContent)]))""")


def _decided_with_latency(page) -> bool:
    lat = _agent_latencies(page)
    return (len(lat.get("rl-0", [])) == 1 and len(lat.get("vlm-0", [])) == 2  # RL: policy; VLM: action, reasoning
            and all(re.fullmatch(r"\d+(\.\d+)?", x) for x in lat["rl-0"] + lat["vlm-0"]))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: apt-get install chromium "
                                                         "(see docs/dashboard.md)")
@pytest.mark.slow
@pytest.mark.timeout(1200)  # the shared participant (when this test builds it), agent start-up, the session
def test_dashboard_in_headless_chromium(participant, tmp_path):
    from playwright.sync_api import sync_playwright

    live = LiveSession(dict(duration_s=LIVE_S, simulate=participant.runs[-1]["bold"], dashboard_port=_port()),
                       participant, tmp_path)
    shot = tmp_path / "dashboard.png"
    try:
        url = live.wait_url(120)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1180})
            page.goto(url)
            seq = lambda: int(page.get_attribute("#frame-seq", "data-seq"))  # noqa: E731
            points = lambda: int(page.get_attribute("#roi-points", "data-points"))  # noqa: E731

            # the emulator starts once both agent processes and the dashboard have joined (model loads: slow)
            first = _wait_for(lambda: seq() >= 0 and seq() + 1, 240, "a first frame on the page") - 1
            _wait_for(lambda: seq() >= first + 10, 30, "frames to advance on the page")

            # keyboard play: the dashboard is the controller "human"; in Breakout (NOOP, FIRE, RIGHT, LEFT)
            # the right arrow is RIGHT and space is FIRE (services.dashboard.action_for_keys)
            _wait_for(lambda: "you control" in page.text_content("#play-role"), 30, "the controller role")
            page.click("#game")
            for key, action in (("ArrowRight", "RIGHT"), (" ", "FIRE")):
                page.keyboard.down(key)
                _wait_for(lambda: page.text_content("#play-action") == action, 15, f"{action} to be the played action")
                _wait_for(lambda: page.text_content("#frame-action") == f"{action} by human", 15,
                          f"a frame the emulator stepped with the human's {action}")
                page.keyboard.up(key)

            # the real agents' decisions: RL policy and both VLM prompt conditions, each with its latency in ms
            _wait_for(lambda: _decided_with_latency(page), 60, "decisions with latency from rl-0 and vlm-0")
            # the scanner's triggers reach the page's TR clock
            _wait_for(lambda: re.fullmatch(r"TR \d+", page.text_content("#tr-index")), 30, "a TR index")
            # the encoders' predictions: ROI time courses appear, then grow as TRs close
            p0 = _wait_for(points, 60, "ROI time-course points")
            _wait_for(lambda: points() > p0, 30, "the ROI chart to update")
            # the encoders' per-volume quality (motion, FD, excluded TRs, time per volume) reaches its panel
            _wait_for(lambda: int(page.get_attribute("#qc-summary", "data-volumes")) > 0, 30, "the quality panel")
            assert re.fullmatch(r"\d+(\.\d+)?", page.text_content("#qc-ms-p50")), page.text_content("#qc-summary")
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:  # run_live cannot be stopped early: it ends with its session, then writes a report
        live.thread.join(LIVE_S + 600)
    live.join(0)
    assert shot.stat().st_size > 20_000
    if os.environ.get(SCREENSHOT_ENV):  # `make docs-dashboard`
        dest = Path(os.environ[SCREENSHOT_ENV])
        dest = dest if dest.is_absolute() else REPO / dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
    # TRs were timed by the (simulated) scanner's triggers; the folder's arrivals are reported beside them
    timing = live.summary["tr_timing"]
    assert timing["timed_by"] == "triggers" and timing["by_source"].get("simulated", 0) > 0, timing
    assert timing["fallback_triggers"] == 0 and timing["paired"] > 0 and timing["export_lag_ms_p50"] is not None
    assert (live.plan.out / "tr_timing.tsv").exists()
    rec = read_recording(live.plan.out / "session.narec")
    meanings = rec.header.action_meanings
    assert meanings == BREAKOUT, meanings
    by_human = [s.action for s in rec.steps if s.controller == "human"]
    assert meanings.index("RIGHT") in by_human, "the emulator never applied the browser's right arrow"
    assert meanings.index("FIRE") in by_human, "the emulator never applied the browser's space bar"


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
