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
from typing import Iterator

import ale_py
import gymnasium as gym
import numpy as np
import xxhash

from protocols import PROTOCOL_VERSION

from services.plumbing.recording import FORMAT_VERSION, Header, Recording, Reset, Step

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


# Frame hash algorithms by the name recordings store (Header.frame_hash_algo). New sessions use
# xxh64: scalar code. xxh3 is faster in isolation (3–10 µs a frame) but its wide-vector code slows
# the emulation that follows on AVX-512 Xeons: measured, the unthrottled step rate dropped 11–13 %
# with xxh3 against 3.4 % with xxh64 (9–12 µs). Recordings made with xxh3_128 replay unchanged.
FRAME_HASHES = {"xxh64": xxhash.xxh64_hexdigest, "xxh3_128": xxhash.xxh3_128_hexdigest}
FRAME_HASH = "xxh64"


def frame_hash(pixels: np.ndarray, algo: str = FRAME_HASH) -> str:
    """Hex digest of the raw RGB bytes (``algo`` one of ``FRAME_HASHES``)."""
    return FRAME_HASHES[algo](np.ascontiguousarray(pixels))


class GameEnv:
    """A gymnasium ALE env plus the bookkeeping the emulator and recordings need."""

    def __init__(self, settings: GameSettings, frame_hash_algo: str = FRAME_HASH, pooled_gray: bool = True):
        """``frame_hash_algo``: how ``hash`` digests frames; a replay passes its recording's.
        ``pooled_gray``: keep ``pooled_gray`` up to date (two ALE grayscale reads per step, ≈15 % of a
        bare step here); False leaves it None, for sessions with no RL agent watching."""
        if frame_hash_algo not in FRAME_HASHES:
            raise ValueError(f"unknown frame hash {frame_hash_algo!r} (known: {', '.join(FRAME_HASHES)})")
        self.settings = settings
        self.frame_hash_algo = frame_hash_algo
        self.hash = FRAME_HASHES[frame_hash_algo]
        """Hex digest of a frame from ``reset``/``step`` (C-contiguous arrays, as the ALE returns)."""
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
        self._ale = self.unwrapped.ale
        self._ale_actions = list(self.unwrapped._action_set)
        self._max_episode_steps = self.env.spec.max_episode_steps if self.env.spec else None
        self.action_meanings: list[str] = list(self.unwrapped.get_action_meanings())
        self.n_actions = len(self.action_meanings)
        self.rom: str = self.unwrapped._game
        self.episode = -1
        self.step_in_episode = 0
        self._seeded = False
        h, w = self.env.observation_space.shape[:2]
        self._gray = (np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8))
        self._pool = pooled_gray
        self.pooled_gray: np.ndarray | None = self._gray[0] if pooled_gray else None
        """(H, W) uint8: the max of the ALE grayscale screens of the last two emulator frames of the
        latest step (the reset screen after a reset) — what ale-py's vector env, and so RL training,
        builds its observation from (agents/rl.py). A new array each step."""

    def reset(self) -> tuple[np.ndarray, int | None]:
        """Start an episode; returns (pixels, seed used or None)."""
        seed = None if self._seeded else self.settings.seed
        obs, _ = self.env.reset(seed=seed)
        self._seeded = True
        if self._pool:
            self._ale.getScreenGrayscale(self._gray[0])
            self.pooled_gray = self._gray[0].copy()
        self.episode += 1
        self.step_in_episode = 0
        return obs, seed

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """One step, making exactly the ALE calls of ale_py's ``AtariEnv.step`` (frameskip ×
        ``act``, game over, truncation, screen) without gymnasium's wrapper layers and info dict:
        the same frames for a fraction of the per-step Python work."""
        if not 0 <= action < self.n_actions:
            raise ValueError(f"action {action} outside 0..{self.n_actions - 1}")
        ale, ale_action = self._ale, self._ale_actions[action]
        reward = 0.0
        skip = self.settings.frameskip
        pool_from = skip - 2 if self._pool else skip
        for i in range(skip):
            reward += ale.act(ale_action, 1.0)
            if i >= pool_from:  # the last two frames, for pooled_gray (as ale-py's vector env)
                ale.getScreenGrayscale(self._gray[skip - 1 - i])
        if self._pool:
            self.pooled_gray = np.maximum(*self._gray) if skip > 1 else self._gray[0].copy()
        terminated = ale.game_over(with_truncation=False)
        truncated = ale.game_truncated()
        self.step_in_episode += 1
        if self._max_episode_steps is not None and self.step_in_episode >= self._max_episode_steps:
            truncated = True  # what gymnasium's TimeLimit wrapper would say (ids that register one)
        return ale.getScreenRGB(), float(reward), bool(terminated), bool(truncated)

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
            frame_hash_algo=self.frame_hash_algo,
            start_wall_ns=time.time_ns(),
            start_t_ns=time.monotonic_ns(),
            source_recording=source_recording,
            meta=dict(meta or {}),
        )

    def close(self) -> None:
        self.env.close()


def check_replay_compatible(rec: Recording, game: GameEnv) -> None:
    """Refuse to replay ``rec`` on a game that cannot reproduce it (other ROM or action set);
    warn on another ale-py version (frames usually still match; replay checks every hash)."""
    import logging

    h = rec.header
    md5 = game.rom_md5()
    if md5 != h.rom_md5:
        raise ValueError(f"ROM of {h.game} differs from the recording's (md5 {md5} != {h.rom_md5})")
    if game.action_meanings != h.action_meanings:
        raise ValueError(f"action set differs from the recording's: {game.action_meanings} != {h.action_meanings}")
    if ale_py.__version__ != h.ale_py_version:
        logging.getLogger("neuroarcade.game").warning(
            "recording made with ale-py %s, replaying with %s", h.ale_py_version, ale_py.__version__)


def replay_headless(rec: Recording) -> "Iterator[tuple[Reset | Step, np.ndarray, str, GameEnv]]":
    """Step a new game through the recording's resets and steps in ``seq`` order: the recorded
    first-reset seed, the recorded actions. Yields ``(record, pixels, hash, game)`` per frame, the
    hash made with the recording's algorithm (callers compare it with ``record.frame_hash``);
    ``game`` carries the frame's ``pooled_gray`` and ``step_in_episode``. The one headless replay
    loop (verification, batch extraction); the emulator's replay mode adds pacing and triggers."""
    game = GameEnv(settings_from_header(rec.header), rec.header.frame_hash_algo)
    try:
        check_replay_compatible(rec, game)
        events = sorted([*rec.resets, *rec.steps], key=lambda r: r.seq)
        for r in events:
            pixels = game.step(r.action)[0] if isinstance(r, Step) else game.reset()[0]
            yield r, pixels, game.hash(pixels), game
    finally:
        game.close()


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
