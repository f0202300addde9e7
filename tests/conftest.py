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
