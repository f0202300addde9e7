"""Shared fixtures: a real emulator on loopback with ephemeral ports, run in a thread; one synthetic participant."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.emulator import Emulator, EmulatorConfig
from services.plumbing.game import GameSettings
from services.plumbing.transport import free_tcp_endpoint


# Slow tests in files this conftest marks instead of a decorator there (module → test names; "*" = all).
# Everywhere else the mark sits on the test itself (`@pytest.mark.slow` or a module's `pytestmark`).
SLOW_ELSEWHERE = {
    "test_session.py": "*",  # a synthetic participant (minutes), whole demo / live sessions
    "test_synth.py": "*",  # a synthetic BIDS dataset, fits through the CLI
    "test_rl_agent.py": {"test_train_rl_resumes_after_sigkill_on_the_same_schedule"},  # PPO training, twice
    "test_report.py": {"test_report_html_has_sections_images_and_numbers",  # nilearn brain maps
                       "test_report_shows_planted_beside_recovered"},
    "test_plant.py": {"test_planted_partition_comes_back_with_its_sign"},  # synthetic session + fits
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_ELSEWHERE.get(item.path.name)
        if names == "*" or (names and getattr(item, "originalname", item.name) in names):
            item.add_marker(pytest.mark.slow)


class RunningEmulator:
    def __init__(self, cfg: EmulatorConfig):
        self.cfg = cfg
        self.emu = Emulator(cfg)
        self.summary = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.emu.ready.wait(10), "emulator did not bind"

    def _run(self):
        self.summary = self.emu.run()

    def stop(self, timeout: float = 10):
        self.emu.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "emulator did not stop"
        return self.summary


@pytest.fixture(scope="session")
def participant(tmp_path_factory):
    """ONE synthetic participant per test session (``pipelines.session.make_participant``), shared by
    tests/test_session.py (whose known-answer tests rely on runs=4, trs=60) and tests/test_dashboard.py.
    Building it takes minutes on a loaded 2-core machine."""
    from pipelines.session import ParticipantConfig, make_participant

    return make_participant(tmp_path_factory.mktemp("participant"), ParticipantConfig(runs=4, trs=60),
                            progress=lambda m: None)


@pytest.fixture
def start_emulator(tmp_path: Path):
    """Factory: start_emulator(mode=..., **config) -> RunningEmulator (stopped at teardown)."""
    running: list[RunningEmulator] = []

    def _start(game: str = "ALE/Pong-v5", sticky: float = 0.0, seed: int = 0, **kw) -> RunningEmulator:
        kw.setdefault("frames_endpoint", free_tcp_endpoint())
        kw.setdefault("control_endpoint", free_tcp_endpoint())
        kw.setdefault("record_path", str(tmp_path / f"session{len(running)}.narec"))
        cfg = EmulatorConfig(game=GameSettings(game=game, seed=seed, repeat_action_probability=sticky), **kw)
        r = RunningEmulator(cfg)
        running.append(r)
        return r

    yield _start
    for r in running:
        if r.thread.is_alive():
            r.stop()


def feed_live(weights, features, vols, *, tr: float, layer: int, preprocess: bool = True):
    """The encoding service's core fed as a live session would feed it: every TR's trigger, one decision per TR
    (``features`` (T, D) as Activation messages of ``layer``), then the T measured ``vols``; returns the core."""
    from encoders.synth import decisions_for_run, trigger_times_ns
    from protocols import Activation
    from services.encoding import CoreConfig, EncodingCore

    core = EncodingCore(weights, CoreConfig(preprocess=preprocess))
    trig = trigger_times_ns(len(vols), tr, start_ns=10**12)
    vecs, frame_t = decisions_for_run(features, trig, tr, per_tr=1)
    for t, t_ns in enumerate(trig):
        core.on_trigger(t, int(t_ns))
    for i, (v, ft) in enumerate(zip(vecs, frame_t)):
        core.on_activation(Activation(agent_id="a", model="synthetic", condition="action", layers=[layer],
                                      pooling="mean", frame_seqs=[i], t_ns=int(ft), vectors=v[None],
                                      frame_t_ns=int(ft)))
    core.finish()
    for t in range(len(vols)):
        core.on_volume(t, vols[t])
    return core
