"""Train a Nature-CNN PPO agent on an ALE game: CleanRL's Atari recipe on ale-py's vector env.

Example::

    neuroarcade train-rl --game ALE/Breakout-v5 --frames 5000000 --out agents/checkpoints/breakout.cleanrl_model

The observation is ale-py's ``AtariVectorEnv`` (C++: ALE palette grayscale, max over the last two
frames of each frame-skip group, OpenCV area resize to 84×84, stack of 4) built from
:data:`agents.rl.TRAIN_ENV`, the one definition the agent service also serves with
(:func:`agents.rl.observe_frame` on the emulator's ``pooled_gray``). The game is played as the
product plays it: sticky actions 0.25, no FIRE on reset, every life in one episode; a lost life
only cuts the value bootstrap (what CleanRL's EpisodicLife wrapper is for, without resetting the
game). Rewards are clipped to their sign for learning; returns are logged raw.

Outputs beside ``OUT``: ``OUT`` itself (a CleanRL state dict in fp16, written at the end),
``OUT.json`` (game, frames, seed, settings, wall time, machine, versions), ``OUT.log.jsonl`` (one
row per iteration) and ``OUT.state.pt`` (model, optimiser, RNG and progress, rewritten every
``checkpoint_every`` iterations: a rerun of the same command resumes from it after a kill and
continues the same learning-rate and clipping schedule).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from agents.rl import STACK, TRAIN_ENV, nature_cnn


@dataclass
class TrainConfig:
    """One PPO training run. Defaults are CleanRL ``ppo_atari.py`` (8 envs × 128 steps, 4 epochs ×
    4 minibatches, lr 2.5e-4, clip 0.1, both annealed to 0, entropy 0.01, γ 0.99, λ 0.95)."""

    game: str = "ALE/Breakout-v5"
    """Gymnasium ALE id; the ROM and action set come from it."""
    frames: int = 10_000_000
    """Emulator frames to train for (agent steps × frameskip 4, over all envs)."""
    num_envs: int = 8
    num_steps: int = 128
    """Rollout length per env and iteration."""
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    clip_coef: float = 0.1
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    sticky: float = 0.25
    """Sticky-action probability (v5 default; the emulator's default too)."""
    seed: int = 1
    bf16: bool | None = None
    """bf16 autocast for forward and backward; None: where the hardware has bf16 units (a CUDA
    device, or a CPU with AVX512-BF16/AMX). Measured: ≈1.5× faster than fp32 on a Xeon with
    AVX512-BF16, 9× slower on an AVX2-only EPYC (emulated bf16)."""
    channels_last: bool = True
    torch_threads: int = 0
    """torch intra-op threads (0: torch's default, one per core)."""
    checkpoint_every: int = 20
    """Iterations between resumable state files."""
    device: str = "cpu"
    init: str | None = None
    """Warm start: a ``.cleanrl_model`` whose weights this run starts from (fresh optimiser and a new
    annealed schedule over ``frames``); None: a seeded random network."""

    @property
    def batch(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def iterations(self) -> int:
        """Enough iterations to reach ``frames`` (rounded up)."""
        return max(1, -(-self.frames // (TRAIN_ENV.frameskip * self.batch)))

    @property
    def use_bf16(self) -> bool:
        return native_bf16(self.device) if self.bf16 is None else self.bf16


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 in hardware (CPU: AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
    if device.startswith("cuda"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainProgress:
    """What the progress bar shows after each iteration."""

    iteration: int
    iterations: int
    frames: int
    """Emulator frames played so far."""
    frames_per_s: float
    """Since this process started (a resumed run counts from its resume)."""
    episode_return: float | None
    """Mean raw return of the last 20 finished games (None before the first)."""


@dataclass
class TrainSummary:
    """What a finished run wrote (also in ``OUT.json``)."""

    checkpoint: str
    env_id: str
    frames: int
    iterations: int
    train_seconds: float
    """Wall time over all sessions of this run (resumes included)."""
    episode_return_last: float | None
    """Mean raw return of the last 20 training games."""
    resumed_from: int
    """Iteration this process resumed at (0: fresh start)."""
    config: dict = field(default_factory=dict)


def make_train_env(game: str, num_envs: int, sticky: float, threads: int = 0, noop_max: int = TRAIN_ENV.noop_max):
    """ale-py's C++ vector env with :data:`agents.rl.TRAIN_ENV`'s observation settings (``noop_max``
    0: start every game as the emulator does, for comparing the two)."""
    import gymnasium as gym
    from ale_py.vector_env import AtariVectorEnv

    try:
        rom = gym.spec(game).kwargs["game"]
    except Exception as e:
        raise ValueError(f"cannot train on {game!r}: not an ALE game id ({e})") from None
    return AtariVectorEnv(
        rom, num_envs, num_threads=threads, repeat_action_probability=sticky, autoreset_mode="SameStep",
        img_height=TRAIN_ENV.size, img_width=TRAIN_ENV.size, grayscale=True, stack_num=STACK,
        frameskip=TRAIN_ENV.frameskip, maxpool=True, noop_max=noop_max, use_fire_reset=False,
        episodic_life=False, reward_clipping=False, max_num_frames_per_episode=TRAIN_ENV.max_frames_per_episode,
    )


def env_threads(num_envs: int) -> int:
    """ALE worker threads: one per core at most (more only contend with torch's)."""
    return min(num_envs, os.cpu_count() or 1)


class PPO:
    """The policy, its optimiser and one PPO update; no environment, no files."""

    def __init__(self, cfg: TrainConfig, n_actions: int):
        import torch

        self.cfg = cfg
        self.net = nature_cnn(n_actions, "ppo").to(cfg.device)
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.learning_rate, eps=1e-5)

    def _autocast(self):
        import contextlib

        import torch

        return torch.autocast(self.cfg.device.split(':')[0], dtype=torch.bfloat16) if self.cfg.use_bf16 else contextlib.nullcontext()

    def policy(self, obs):
        """obs (B, 4, 84, 84) uint8 → (Categorical over actions, value (B,)); logits in fp32."""
        import torch

        x = obs.float()
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feat = self.net.network(x / 255.0)
            logits, value = self.net.actor(feat), self.net.critic(feat)
        return torch.distributions.Categorical(logits=logits.float()), value.float().squeeze(-1)

    def update(self, frac: float, obs, actions, logp, adv, ret, values) -> dict:
        """One PPO update on a rollout flattened to (batch, …); ``frac`` anneals lr and clip (1 → 0)."""
        import torch
        from torch import nn

        cfg = self.cfg
        self.opt.param_groups[0]["lr"] = cfg.learning_rate * frac
        clip = cfg.clip_coef * frac
        n = obs.shape[0]
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(n).split(n // cfg.num_minibatches):
                dist, value = self.policy(obs[idx])
                ratio = (dist.log_prob(actions[idx]) - logp[idx]).exp()
                a = adv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)).mean()
                v_clipped = values[idx] + (value - values[idx]).clamp(-clip, clip)
                v_loss = 0.5 * torch.max((value - ret[idx]) ** 2, (v_clipped - ret[idx]) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                self.opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
                self.opt.step()
        return {"policy_loss": pg.item(), "value_loss": v_loss.item(), "entropy": entropy.item(),
                "clip_frac": float(((ratio - 1).abs() > clip).float().mean())}


def gae(rewards, values, dones, next_value, next_done, gamma: float, lam: float):
    """Generalised advantage estimates.

    rewards, values, dones: (T, N) — ``dones[t]`` marks that the step *before* t ended an episode
    (CleanRL's convention); next_value, next_done: (N,) after the last step. Returns (adv, ret), (T, N).
    """
    import torch

    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    steps = rewards.shape[0]
    for t in reversed(range(steps)):
        nonterm = 1.0 - (next_done if t == steps - 1 else dones[t + 1])
        nv = next_value if t == steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * nv * nonterm - values[t]
        adv[t] = last = delta + gamma * lam * nonterm * last
    return adv, adv + values


class Rollout:
    """Plays ``num_steps`` steps in every env with the current policy and keeps the buffers."""

    def __init__(self, cfg: TrainConfig, envs):
        import torch

        self.cfg, self.envs = cfg, envs
        T, N = cfg.num_steps, cfg.num_envs
        self.obs = torch.zeros((T, N, STACK, TRAIN_ENV.size, TRAIN_ENV.size), dtype=torch.uint8)
        self.actions = torch.zeros((T, N), dtype=torch.long)
        self.logp, self.rewards, self.dones, self.values = (torch.zeros((T, N)) for _ in range(4))
        self.next_obs = self.next_done = self.lives = None
        self.ep_return = np.zeros(N)
        self.finished: list[float] = []
        """Raw returns of whole games finished (all lives)."""

    def reset(self, seed: int) -> None:
        import torch

        obs, info = self.envs.reset(seed=seed)
        self.next_obs = torch.from_numpy(np.asarray(obs))
        self.next_done = torch.zeros(self.cfg.num_envs)
        self.lives = np.asarray(info["lives"]).copy()
        self.ep_return[:] = 0

    def collect(self, ppo: PPO) -> None:
        import torch

        for t in range(self.cfg.num_steps):
            self.obs[t], self.dones[t] = self.next_obs, self.next_done
            with torch.no_grad():
                dist, value = ppo.policy(self.next_obs)
                action = dist.sample()
            self.actions[t], self.logp[t], self.values[t] = action, dist.log_prob(action), value
            obs, reward, term, trunc, info = self.envs.step(action.numpy().astype(np.int32))
            reward = np.asarray(reward, dtype=np.float64)
            ended = np.asarray(term) | np.asarray(trunc)
            lives = np.asarray(info["lives"])
            life_lost = (lives < self.lives) & ~ended  # cut the bootstrap, keep playing
            self.lives = lives.copy()
            self.ep_return += reward
            for e in np.flatnonzero(ended):
                self.finished.append(float(self.ep_return[e]))
                self.ep_return[e] = 0.0
            self.rewards[t] = torch.from_numpy(np.sign(reward).astype(np.float32))
            self.next_obs = torch.from_numpy(np.asarray(obs))
            self.next_done = torch.from_numpy((ended | life_lost).astype(np.float32))

    def advantages(self, ppo: PPO):
        import torch

        with torch.no_grad():
            _, next_value = ppo.policy(self.next_obs)
        cfg = self.cfg
        return gae(self.rewards, self.values, self.dones, next_value, self.next_done, cfg.gamma, cfg.gae_lambda)

    def flat(self):
        """(obs, actions, logp, values) flattened to (T·N, …)."""
        return (self.obs.reshape(-1, STACK, TRAIN_ENV.size, TRAIN_ENV.size), self.actions.reshape(-1),
                self.logp.reshape(-1), self.values.reshape(-1))


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def _save_state(path: Path, ppo: PPO, cfg: TrainConfig, iteration: int, finished: list[float],
                seconds: float) -> None:
    """Atomically replace the resumable state (a kill mid-write leaves the previous one)."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": asdict(cfg), "iteration": iteration, "model": ppo.net.state_dict(),
                "optimizer": ppo.opt.state_dict(), "torch_rng": torch.get_rng_state(),
                "finished": finished[-1000:], "seconds": seconds}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, cfg: TrainConfig) -> dict | None:
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot resume from {path}: unreadable ({type(e).__name__}); delete it to start over") from None
    saved = state["config"]
    diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items()
            if k not in ("torch_threads", "checkpoint_every", "device") and saved.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume from {path}: it was trained with other settings "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                         f"use the same options or another --out")
    return state


def _init_weights(path: str, like: dict) -> dict:
    """The fp32 weights of checkpoint ``path``, checked against the network they go into."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--init {path}: unreadable ({type(e).__name__})") from None
    if set(sd) != set(like) or any(sd[k].shape != like[k].shape for k in like):
        raise ValueError(f"--init {path}: not a PPO Nature-CNN for this game's action set")
    return {k: v.float() for k, v in sd.items()}


def training_stages(path: str | None) -> list[dict]:
    """The training stages behind checkpoint ``path`` (its sidecar's ``stages``, or the one stage its
    sidecar describes), oldest first; [] when ``path`` is None or has no sidecar."""
    if not path:
        return []
    try:
        meta = json.loads(Path(str(path) + ".json").read_text())
    except (OSError, ValueError):
        return []
    if "stages" in meta:
        return list(meta["stages"])
    return [{"command": meta.get("command", ""), "frames": int(meta.get("frames", 0)), "seed": meta.get("seed"),
             "train_seconds": meta.get("train_seconds"), "log": meta.get("log") or Path(path).name + ".log.jsonl"}]


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows past the resumed iteration (they are replayed)."""
    if not path.is_file():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a torn last line from a kill
    path.write_text("".join(l + "\n" for l in keep))


def train(cfg: TrainConfig, out: str | Path, progress: Callable[[TrainProgress], None] | None = None,
          command: str = "") -> TrainSummary:
    """Train (or resume) a PPO agent; write ``OUT`` and its sidecars. ``command``: recorded in OUT.json."""
    import ale_py
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path, log_path = _state_path(out), out.with_name(out.name + ".log.jsonl")
    envs = make_train_env(cfg.game, cfg.num_envs, cfg.sticky, threads=env_threads(cfg.num_envs))
    n_actions = int(envs.single_action_space.n)
    ppo = PPO(cfg, n_actions)
    rollout = Rollout(cfg, envs)
    state = _load_state(state_path, cfg)
    start, seconds_before = 0, 0.0
    if state is None:
        torch.manual_seed(cfg.seed)
        if cfg.init:
            ppo.net.load_state_dict(_init_weights(cfg.init, ppo.net.state_dict()))
        log_path.write_text("")
    else:
        ppo.net.load_state_dict(state["model"])
        ppo.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, seconds_before = int(state["iteration"]), float(state["seconds"])
        rollout.finished = list(state["finished"])
        _truncate_log(log_path, start)
    # Env state cannot be saved: a resumed run starts new games, seeded by where it resumes.
    rollout.reset(seed=cfg.seed + start * cfg.num_envs)
    frames_per_iter = cfg.batch * TRAIN_ENV.frameskip
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        for it in range(start, cfg.iterations):
            frac = 1.0 - it / cfg.iterations
            rollout.collect(ppo)
            adv, ret = rollout.advantages(ppo)
            obs, actions, logp, values = rollout.flat()
            losses = ppo.update(frac, obs, actions, logp, adv.reshape(-1), ret.reshape(-1), values)
            done = it + 1
            elapsed = time.monotonic() - t0
            recent = rollout.finished[-20:]
            row = {"iteration": done, "frames": done * frames_per_iter, "t_s": round(seconds_before + elapsed, 1),
                   "episodes": len(rollout.finished),
                   "episode_return_mean": float(np.mean(recent)) if recent else None, **losses}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                _save_state(state_path, ppo, cfg, done, rollout.finished, seconds_before + elapsed)
            if progress:
                progress(TrainProgress(done, cfg.iterations, done * frames_per_iter,
                                       (done - start) * frames_per_iter / max(elapsed, 1e-9), row["episode_return_mean"]))
    envs.close()
    return write_checkpoint(cfg, out, ppo.net.state_dict(), n_actions, cfg.iterations,
                            seconds_before + time.monotonic() - t0, rollout.finished, start, command)


def write_checkpoint(cfg: TrainConfig, out: Path, state_dict: dict, n_actions: int, iterations: int,
                     seconds: float, finished: list[float], resumed_from: int, command: str) -> TrainSummary:
    """Write the fp16 checkpoint ``out`` and its sidecar ``out.json`` (stages, settings, versions)."""
    import ale_py
    import torch

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in state_dict.items()}
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, out)
    recent = finished[-20:]
    frames = iterations * cfg.batch * TRAIN_ENV.frameskip
    log_name = out.name + ".log.jsonl"
    summary = TrainSummary(str(out), cfg.game, frames, iterations, round(seconds, 1),
                           float(np.mean(recent)) if recent else None, resumed_from, asdict(cfg))
    stages = training_stages(cfg.init) + [{"command": command, "frames": frames, "seed": cfg.seed,
                                           "train_seconds": summary.train_seconds, "log": log_name}]
    meta = {"env_id": cfg.game, "algo": "ppo", "n_actions": n_actions, "frames": frames,
            "total_frames": sum(st["frames"] for st in stages), "stages": stages,
            "iterations": iterations, "planned_iterations": cfg.iterations, "seed": cfg.seed,
            "train_seconds": summary.train_seconds,
            "episode_return_last": summary.episode_return_last, "command": command,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "ale_py_version": ale_py.__version__, "torch_version": torch.__version__,
            "observation": asdict(TRAIN_ENV), "bf16": cfg.use_bf16, "config": asdict(cfg), "log": log_name,
            "format": "CleanRL ppo_atari Agent state dict, fp16 (torch.save(agent.state_dict()))"}
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return summary


def train_command(cfg: TrainConfig, out: str | Path) -> str:
    """The ``neuroarcade train-rl`` command line that trains (or resumes) ``cfg`` into ``out``."""
    import shlex

    args = ["neuroarcade", "train-rl", "--game", cfg.game, "--frames", str(cfg.frames), "--seed", str(cfg.seed),
            "--num-envs", str(cfg.num_envs), "--sticky", str(cfg.sticky), "--out", str(out)]
    return shlex.join(args + (["--init", cfg.init] if cfg.init else []))


def export_state(out: str | Path) -> TrainSummary:
    """Write checkpoint ``out`` from the resumable ``out.state.pt`` of a run that was stopped before its
    last iteration (its sidecar records the iterations done, the ones planned and the training command)."""
    import torch

    out = Path(out)
    path = _state_path(out)
    if not path.is_file():
        raise ValueError(f"no resumable state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrainConfig(**state["config"])
    n_actions = int(state["model"]["actor.weight"].shape[0])
    return write_checkpoint(cfg, out, state["model"], n_actions, int(state["iteration"]), float(state["seconds"]),
                            list(state["finished"]), int(state["iteration"]), train_command(cfg, out))
