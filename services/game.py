"""The emulated game: one ALE environment with its settings, frame hashing and recording header.

Shared by the emulator service, headless recording and replay verification so that all three
step the game identically: first reset seeded, later resets unseeded (the ALE RNG carries on),
and an automatic reset right after a terminal or truncated step.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version

import ale_py
import gymnasium as gym
import numpy as np
import xxhash

from protocols import PROTOCOL_VERSION

from .recording import FORMAT_VERSION, Header

gym.register_envs(ale_py)


@dataclass
class GameSettings:
    """Everything that determines the frames a game produces for a given action sequence."""

    game: str = "ALE/Pong-v5"
    """Gymnasium id of an ALE game (``ALE/<Name>-v5``)."""
    seed: int = 0
    """Seed of the first reset (sticky-action draws use the seeded ALE RNG)."""
    frameskip: int = 4
    """Emulator frames per step; the stream runs at 60 / frameskip Hz."""
    repeat_action_probability: float = 0.25
    """Sticky actions (v5 default 0.25; 0 for fully deterministic control)."""
    full_action_space: bool = False
    """All 18 ALE actions instead of the game's minimal set."""


def frame_hash(pixels: np.ndarray) -> str:
    """128-bit xxh3 of the raw RGB bytes, hex. Fast (~2 µs per Atari frame) and portable."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(pixels))


class GameEnv:
    """A gymnasium ALE env plus the bookkeeping the emulator and recordings need."""

    def __init__(self, settings: GameSettings):
        self.settings = settings
        try:
            self.env = gym.make(
                settings.game,
                frameskip=settings.frameskip,
                repeat_action_probability=settings.repeat_action_probability,
                full_action_space=settings.full_action_space,
                obs_type="rgb",
            )
        except gym.error.Error as e:
            raise ValueError(f"cannot make game {settings.game!r}: {e}") from None
        self.unwrapped = self.env.unwrapped
        self.action_meanings: list[str] = list(self.unwrapped.get_action_meanings())
        self.n_actions = len(self.action_meanings)
        self.rom: str = self.unwrapped._game
        self.episode = -1
        self.step_in_episode = 0
        self._seeded = False

    def reset(self) -> tuple[np.ndarray, int | None]:
        """Start an episode; returns (pixels, seed used or None)."""
        seed = None if self._seeded else self.settings.seed
        obs, _ = self.env.reset(seed=seed)
        self._seeded = True
        self.episode += 1
        self.step_in_episode = 0
        return obs, seed

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        if not 0 <= action < self.n_actions:
            raise ValueError(f"action {action} outside 0..{self.n_actions - 1}")
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.step_in_episode += 1
        return obs, float(reward), bool(terminated), bool(truncated)

    def rom_md5(self) -> str:
        path = ale_py.roms.get_rom_path(self.rom)
        with open(path, "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    def header(self, mode: str, session_id: str | None = None, source_recording: str = "",
               meta: dict[str, str] | None = None) -> Header:
        s = self.settings
        return Header(
            format_version=FORMAT_VERSION,
            session_id=session_id or new_session_id(),
            game=s.game,
            rom=self.rom,
            rom_md5=self.rom_md5(),
            ale_py_version=ale_py.__version__,
            gymnasium_version=gym.__version__,
            neuroarcade_version=_neuroarcade_version(),
            protocol_version=PROTOCOL_VERSION,
            seed=s.seed,
            frameskip=s.frameskip,
            repeat_action_probability=s.repeat_action_probability,
            full_action_space=s.full_action_space,
            mode=mode,
            action_meanings=self.action_meanings,
            frame_shape=list(self.env.observation_space.shape),
            start_wall_ns=time.time_ns(),
            start_t_ns=time.monotonic_ns(),
            source_recording=source_recording,
            meta=dict(meta or {}),
        )

    def close(self) -> None:
        self.env.close()


def settings_from_header(h: Header) -> GameSettings:
    return GameSettings(game=h.game, seed=h.seed, frameskip=h.frameskip,
                        repeat_action_probability=h.repeat_action_probability,
                        full_action_space=h.full_action_space)


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _neuroarcade_version() -> str:
    try:
        return version("neuroarcade")
    except Exception:
        return "0+unknown"
