"""RL baseline agent: Nature-CNN DQN / PPO on the observation ale-py's vector env trains on.

Training (agents/train_rl.py) uses ale-py's C++ ``AtariVectorEnv``: ALE palette grayscale, the max
over the last two emulator frames of each frame-skip group (Atari sprites flicker), OpenCV area
resize to 84×84 and a stack of the last 4. The emulator publishes that max (``Frame.pooled_gray``,
made with the same ALE calls), and :func:`observe_frame` does the rest exactly as the C++ does, so a
trained policy is served the tensors it was trained on (tests/test_rl_agent.py compares them).
:data:`TRAIN_ENV` is the one definition of those settings.

Checkpoints: CleanRL ``.cleanrl_model`` state dicts (``dqn_atari.py`` QNetwork: ``network.0/2/4/7/9``;
``ppo_atari.py`` Agent: ``network.0/2/4/7`` + ``actor`` + ``critic``), fp32 or fp16, and SB3 / rl-zoo
zips (``policy.pth`` inside, keys ``q_net.*`` or ``features_extractor.*``/``action_net``/``value_net``).
Everything is read with ``torch.load(weights_only=True)``: no pickled code runs. A sidecar
``<checkpoint>.json`` (written by ``neuroarcade train-rl``) records the game, used to refuse
checkpoints of another game. Checkpoints trained here ship in ``agents/checkpoints/`` and are the
default for their game (:func:`shipped_checkpoint`).
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agents.base import ActivationSet, Choice, Decision, FatalAgentError, FrameRef, Observation

log = logging.getLogger("neuroarcade.rl")

FRAME_SIZE = 84
STACK = 4
ALGOS = ("dqn", "ppo")
ACTIVATION_LAYERS = ("penultimate", "conv1", "conv2", "conv3")


class CheckpointError(FatalAgentError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ObservationSpec:
    """How Atari screens become the policy's input, in training and in serving."""

    size: int = FRAME_SIZE
    """Side of the square grey frame."""
    frameskip: int = 4
    """Emulator frames per agent step (the emulator's default)."""
    noop_max: int = 30
    """Training only: up to this many NOOPs after a reset (random starts)."""
    max_frames_per_episode: int = 108_000
    """v5's limit (30 min of play); the emulator truncates at the same point."""


TRAIN_ENV = ObservationSpec()


def observe_frame(pooled_gray: np.ndarray) -> np.ndarray:
    """(210, 160) uint8 ``Frame.pooled_gray`` → (84, 84) uint8, OpenCV area interpolation (as
    ale-py's vector env resizes)."""
    import cv2

    if pooled_gray.ndim != 2 or pooled_gray.dtype != np.uint8:
        raise ValueError(f"pooled_gray must be a 2-D uint8 screen, got {pooled_gray.dtype} {pooled_gray.shape}")
    return cv2.resize(pooled_gray, (TRAIN_ENV.size, TRAIN_ENV.size), interpolation=cv2.INTER_AREA)


def gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB → (H, W) uint8 luma, for frames that come without ``pooled_gray`` (a client of
    another emulator). Not what training saw: the agent warns once when it has to use this."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


def nature_cnn(n_actions: int, algo: str) -> "QNetwork | PPOAgent":
    """Networks with CleanRL's parameter names (so their state dicts load as saved)."""
    trunk = [nn.Conv2d(STACK, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
             nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU()]
    if algo == "dqn":
        return QNetwork(nn.Sequential(*trunk, nn.Linear(512, n_actions)))
    return PPOAgent(nn.Sequential(*trunk), nn.Linear(512, n_actions), nn.Linear(512, 1))


class QNetwork(nn.Module):
    """CleanRL dqn_atari.py QNetwork: ``network`` ends in the Q head."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x / 255.0)

    def features(self, x):
        """(penultimate 512-d, conv outputs) for uint8 stacks (B, 4, 84, 84)."""
        return _trunk_features(self.network[:9], x)

    def head(self, feat):
        return self.network[9](feat)


class PPOAgent(nn.Module):
    """CleanRL ppo_atari.py Agent: shared ``network`` trunk, ``actor`` and ``critic`` heads."""

    def __init__(self, network, actor, critic):
        super().__init__()
        self.network = network
        self.actor = actor
        self.critic = critic

    def forward(self, x):
        return self.actor(self.network(x / 255.0))

    def features(self, x):
        return _trunk_features(self.network, x)

    def head(self, feat):
        return self.actor(feat)


def _trunk_features(trunk, x):
    h = x / 255.0
    convs = []
    for i, layer in enumerate(trunk):
        h = layer(h)
        if i in (1, 3, 5):  # after each conv's ReLU
            convs.append(h)
    return h, convs


# --- checkpoint loading ------------------------------------------------------------------------

_SB3_DQN = {"q_net.features_extractor.cnn.0": "network.0", "q_net.features_extractor.cnn.2": "network.2",
            "q_net.features_extractor.cnn.4": "network.4", "q_net.features_extractor.linear.0": "network.7",
            "q_net.q_net.0": "network.9"}
_SB3_PPO = {"features_extractor.cnn.0": "network.0", "features_extractor.cnn.2": "network.2",
            "features_extractor.cnn.4": "network.4", "features_extractor.linear.0": "network.7",
            "action_net": "actor", "value_net": "critic"}


@dataclass
class LoadedCheckpoint:
    algo: str
    n_actions: int
    state_dict: dict
    meta: dict
    """Sidecar / zip metadata (env_id, training log, eval score) when present."""


def _torch_load(data: bytes, path: Path) -> dict:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"corrupt checkpoint {path}: cannot read tensors ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"wrong architecture in {path}: not a state dict of tensors")
    return obj


def _remap(sd: dict, mapping: dict[str, str]) -> dict:
    out = {}
    for key, value in sd.items():
        for src, dst in mapping.items():
            if key.startswith(src + "."):
                out[dst + key[len(src):]] = value
    return out


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a CleanRL state dict or an SB3 zip; detect the algorithm from the keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    meta: dict = {}
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
    if zipfile.is_zipfile(io.BytesIO(raw)) and "policy.pth" in zipfile.ZipFile(io.BytesIO(raw)).namelist():
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            sd = _torch_load(z.read("policy.pth"), path)
            if "data" in z.namelist():
                try:
                    data = json.loads(z.read("data"))
                    meta.setdefault("sb3_action_n", data.get("action_space", {}).get("n"))
                except ValueError:
                    pass
        if any(k.startswith("q_net.") for k in sd):
            sd, algo = _remap(sd, _SB3_DQN), "dqn"
        elif any(k.startswith("action_net.") for k in sd):
            sd, algo = _remap(sd, _SB3_PPO), "ppo"
        else:
            raise CheckpointError(f"wrong architecture in {path}: SB3 policy is neither a DQN nor a PPO CnnPolicy")
    else:
        sd = _torch_load(raw, path)
        algo = "ppo" if "actor.weight" in sd else "dqn"
    head = "actor.weight" if algo == "ppo" else "network.9.weight"
    if head not in sd:
        raise CheckpointError(f"wrong architecture in {path}: no Nature-CNN {algo} head ({head}); "
                              f"keys: {sorted(sd)[:6]}…")
    return LoadedCheckpoint(algo, int(sd[head].shape[0]), sd, meta)


def load_policy(path: str | Path, n_actions: int, game: str | None = None):
    """Build the network for a checkpoint and load it strictly; refuse mismatches with a clear error."""
    ckpt = read_checkpoint(path)
    check_game(ckpt, game, path)
    if ckpt.n_actions != n_actions:
        raise CheckpointError(f"checkpoint {path} is for another game or action set: it has {ckpt.n_actions} "
                              f"actions, the game has {n_actions}")
    net = nature_cnn(n_actions, ckpt.algo)
    try:
        net.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"wrong architecture in {path}: not a Nature-CNN {ckpt.algo}: "
                              f"{str(err).splitlines()[0][:300]}") from None
    return net.eval(), ckpt


def check_game(ckpt: LoadedCheckpoint, game: str | None, path) -> None:
    """Refuse a checkpoint whose recorded env id names another game than ``game``."""
    recorded = ckpt.meta.get("env_id")
    if game and recorded and _game_key(recorded) != _game_key(game):
        raise CheckpointError(f"checkpoint {path} is for another game: trained on {recorded}, emulator runs {game}")


def _game_key(env_id: str) -> str:
    """``ALE/Pong-v5``, ``PongNoFrameskip-v4``, ``pong`` → ``pong``."""
    name = env_id.split("/")[-1].split("-")[0]
    return name.replace("NoFrameskip", "").lower()


# --- the agent ---------------------------------------------------------------------------------


CHECKPOINTS = Path(__file__).parent / "checkpoints"
"""Checkpoints trained with ``neuroarcade train-rl`` that ship with neuroarcade, one per game,
named ``<game>.cleanrl_model`` (``breakout``, ``pong``) with a sidecar and a model card."""
RANDOM = "random"
"""``RLConfig.checkpoint`` value asking for the seeded random network even where one ships."""


def shipped_checkpoint(game: str | None) -> Path | None:
    """The shipped checkpoint for ``game`` (any id spelling), or None."""
    if not game:
        return None
    path = CHECKPOINTS / f"{_game_key(game)}.cleanrl_model"
    return path if path.is_file() else None


@dataclass
class RLConfig:
    """How to run the RL baseline agent."""

    checkpoint: str | None = None
    """CleanRL .cleanrl_model or SB3 zip. None: the shipped checkpoint for ``game`` if there is one,
    else a seeded random network (with a warning); ``"random"``: the random network regardless."""
    algo: str = "ppo"
    """Architecture when no checkpoint is used: dqn or ppo."""
    game: str | None = None
    """Game the emulator runs (picks the shipped checkpoint; checked against a checkpoint's env id)."""
    activation_layers: tuple[str, ...] = ("penultimate",)
    """Which activations to publish: penultimate (512-d) and/or conv1/conv2/conv3 (flattened)."""
    greedy: bool | None = None
    """Argmax action (True) or a draw from the policy's probabilities (False, seeded). None: draw
    for PPO (as it played in training), argmax for DQN."""
    seed: int = 0
    torch_threads: int = 1


class RLAgent:
    """Nature-CNN policy on a stack of the last 4 observed frames (see :data:`TRAIN_ENV`)."""

    conditions = [""]

    def __init__(self, cfg: RLConfig, n_actions: int | None = None):
        """``n_actions`` None: build the network on the first observation (from its legal actions);
        the checkpoint is still read now, so a corrupt or foreign file fails at once."""
        torch.set_num_threads(cfg.torch_threads)
        bad = [l for l in cfg.activation_layers if l not in ACTIVATION_LAYERS]
        if bad:
            raise ValueError(f"unknown RL activation layer(s) {bad}; choose from {ACTIVATION_LAYERS}")
        if cfg.checkpoint is None:
            shipped = shipped_checkpoint(cfg.game)
            if shipped is None:
                log.warning("no trained checkpoint ships for %s: the RL agent is a seeded random network "
                            "(pass --checkpoint, or train one with `neuroarcade train-rl`)", cfg.game or "this game")
            cfg = replace(cfg, checkpoint=str(shipped) if shipped else RANDOM)
        self.cfg = cfg
        self.trained = cfg.checkpoint != RANDOM
        if self.trained:
            check_game(read_checkpoint(cfg.checkpoint), cfg.game, cfg.checkpoint)
        self.name = str(cfg.checkpoint) if self.trained else f"nature-cnn-{cfg.algo}-random"
        self.n_actions = n_actions
        self.net = None
        if n_actions is not None:
            self._build(n_actions)
        self.rng = np.random.default_rng(cfg.seed)
        self._stack: deque[np.ndarray] = deque(maxlen=STACK)
        self._last_seq: int | None = None
        self._warned_rgb = False

    def _build(self, n_actions: int) -> None:
        cfg = self.cfg
        self.n_actions = n_actions
        if self.trained:
            self.net, ckpt = load_policy(cfg.checkpoint, n_actions, cfg.game)
            self.algo = ckpt.algo
        else:
            if cfg.algo not in ALGOS:
                raise ValueError(f"algo must be one of {ALGOS}")
            torch.manual_seed(cfg.seed)
            self.net, self.algo = nature_cnn(n_actions, cfg.algo).eval(), cfg.algo
        self.greedy = (self.algo == "dqn") if cfg.greedy is None else cfg.greedy

    def reset(self) -> None:
        self._stack.clear()
        self._last_seq = None

    def observe(self, frame: FrameRef) -> np.ndarray:
        """One frame → (84, 84) uint8 as training saw it (from ``pooled_gray``)."""
        if frame.pooled_gray is not None:
            return observe_frame(frame.pooled_gray)
        if not self._warned_rgb:
            log.warning("frames carry no pooled_gray (not a neuroarcade emulator?): the RL agent falls back to "
                        "grey from RGB without flicker pooling, which is not what it was trained on")
            self._warned_rgb = True
        return observe_frame(gray_from_rgb(frame.pixels))

    def stack(self, obs: Observation) -> np.ndarray:
        """Push the frames not seen yet (skipped ones too: the policy was trained on consecutive
        frames); return (4, 84, 84) uint8, oldest first. A reset frame starts a new stack, padded
        with zeros as ale-py's vector env pads it."""
        if self._last_seq is not None and obs.newest.seq < self._last_seq:
            self.reset()  # emulator restarted: numbering went back
        for f in (*obs.skipped[-STACK:], *obs.frames):
            if self._last_seq is not None and f.seq <= self._last_seq:
                continue
            if f.step == 0:
                self._stack.clear()
            self._stack.append(self.observe(f))
            self._last_seq = f.seq
        pad = [np.zeros((TRAIN_ENV.size, TRAIN_ENV.size), np.uint8)] * (STACK - len(self._stack))
        return np.stack([*pad, *self._stack])

    def infer(self, obs: Observation) -> Decision:
        if self.net is None:
            self._build(len(obs.action_meanings))
        if len(obs.action_meanings) != self.n_actions:
            raise ValueError(f"agent built for {self.n_actions} actions, observation has {len(obs.action_meanings)}")
        t0 = time.perf_counter()
        x = torch.from_numpy(self.stack(obs)).float().unsqueeze(0)
        t1 = time.perf_counter()
        with torch.inference_mode():
            feat, convs = self.net.features(x)
            out = self.net.head(feat)[0].double()
        t2 = time.perf_counter()
        probs = torch.softmax(out, -1).float().numpy()
        action = int(np.argmax(probs)) if self.greedy else int(self.rng.choice(self.n_actions, p=probs / probs.sum()))
        acts = []
        for layer in self.cfg.activation_layers:
            vec = feat[0] if layer == "penultimate" else convs[int(layer[-1]) - 1][0].flatten()
            acts.append(ActivationSet("", [ACTIVATION_LAYERS.index(layer)], layer, vec.numpy()[None, :].astype(np.float32)))
        t3 = time.perf_counter()
        return Decision([Choice("", action, probs)], acts, [f.seq for f in obs.frames], obs.newest.t_ns,
                        {"preprocess": (t1 - t0) * 1e3, "forward": (t2 - t1) * 1e3, "score": (t3 - t2) * 1e3})


class RandomAgent:
    """Uniformly random legal actions (seeded): the floor a trained agent is measured against."""

    name = "random"
    conditions = [""]

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def infer(self, obs: Observation) -> Decision:
        n = len(obs.action_meanings)
        action = int(self.rng.integers(n))
        return Decision([Choice("", action, np.full(n, 1.0 / n, np.float32))], [], [f.seq for f in obs.frames],
                        obs.newest.t_ns, {})
