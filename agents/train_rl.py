"""Train a Nature-CNN PPO or DQN agent on an ALE game, CleanRL style, in one file.

The observation pipeline is the agent's own (agents/rl.py): the v5 env's frameskip-4 RGB frames →
``preprocess_frame`` (84×84 gray) → FrameStackObservation(4), exactly what the agent service sees
on the emulator stream. Rewards are clipped to their sign for learning; episode returns are logged
raw. Output: ``OUT`` (a CleanRL state dict, loadable by CleanRL's own scripts), ``OUT.json``
(game, algorithm, settings, eval score, wall time) and ``OUT.log.jsonl`` (one line per update).

How long a useful agent takes (REFERENCE §4): CleanRL PPO reaches a good Pong/Breakout score in
about 10M frames (2.5M agent steps at frameskip 4): ≈6 min with 16+ envs on a 16-core GPU box,
≈1–2 h on a 2-core CPU box. Short runs here only check the pipeline.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from agents.rl import STACK, nature_cnn, preprocess_frame


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: CleanRL ppo_atari.py, scaled for short CPU runs)."""

    game: str = "ALE/Pong-v5"
    algo: str = "ppo"
    """ppo or dqn."""
    steps: int = 10_000
    """Total agent steps over all envs (frames = 4× this at frameskip 4)."""
    num_envs: int = 4
    num_steps: int = 128
    """PPO rollout length per env."""
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    clip_coef: float = 0.1
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    buffer_size: int = 50_000
    """DQN replay buffer (uint8 stacks)."""
    learning_starts: int = 1_000
    train_frequency: int = 4
    target_update: int = 1_000
    batch_size: int = 32
    eps_end: float = 0.01
    eps_fraction: float = 0.1
    eval_episodes: int = 1
    eval_max_steps: int = 5_000
    """Cap on one evaluation episode's steps (Pong episodes can be long)."""
    seed: int = 1
    device: str = "cpu"
    torch_threads: int = 1


def make_env(game: str, seed: int):
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import FrameStackObservation, RecordEpisodeStatistics, TransformObservation

    gym.register_envs(ale_py)

    def thunk():
        env = gym.make(game)
        env = RecordEpisodeStatistics(env)
        space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
        env = TransformObservation(env, preprocess_frame, space)
        env = FrameStackObservation(env, STACK)
        env.action_space.seed(seed)
        return env

    return thunk


def evaluate(net, game: str, episodes: int, max_steps: int, seed: int) -> list[float]:
    """Greedy episodes on the unclipped game reward."""
    import torch

    env = make_env(game, seed + 1000)()
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + 1000 + ep)
        total, done, steps = 0.0, False, 0
        while not done and steps < max_steps:
            with torch.no_grad():
                action = int(net(torch.as_tensor(np.asarray(obs)[None], dtype=torch.float32)).argmax())
            obs, r, term, trunc, _ = env.step(action)
            total += float(r)
            done = term or trunc
            steps += 1
        returns.append(total)
    env.close()
    return returns


def train(cfg: TrainConfig, out: str | Path, progress: Callable[[int, int], None] | None = None) -> dict:
    import gymnasium as gym
    import torch

    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    envs = gym.vector.SyncVectorEnv([make_env(cfg.game, cfg.seed + i) for i in range(cfg.num_envs)])
    n_actions = int(envs.single_action_space.n)
    net = nature_cnn(n_actions, cfg.algo).to(cfg.device)
    log_path = out.with_name(out.name + ".log.jsonl")
    t0 = time.time()
    with open(log_path, "w") as log:
        def emit(row: dict) -> None:
            log.write(json.dumps({"t_s": round(time.time() - t0, 2), **row}) + "\n")
            log.flush()

        if cfg.algo == "ppo":
            _train_ppo(cfg, envs, net, emit, progress)
        elif cfg.algo == "dqn":
            _train_dqn(cfg, envs, net, n_actions, emit, progress)
        else:
            raise ValueError(f"algo must be ppo or dqn, not {cfg.algo!r}")
    envs.close()
    train_s = time.time() - t0
    net = net.cpu().eval()
    returns = evaluate(net, cfg.game, cfg.eval_episodes, cfg.eval_max_steps, cfg.seed)
    torch.save(net.state_dict(), out)
    meta = {"env_id": cfg.game, "algo": cfg.algo, "n_actions": n_actions, "steps": cfg.steps,
            "frames": cfg.steps * 4, "train_seconds": round(train_s, 1), "eval_returns": returns,
            "eval_mean": float(np.mean(returns)), "config": asdict(cfg), "log": log_path.name,
            "format": "CleanRL state dict (torch.save(agent.state_dict()))"}
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=2))
    return meta


def _train_ppo(cfg, envs, agent, emit, progress) -> None:
    import torch
    import torch.nn as nn

    batch = cfg.num_envs * cfg.num_steps
    minibatch = batch // cfg.num_minibatches
    iterations = max(1, cfg.steps // batch)
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    obs_buf = torch.zeros((cfg.num_steps, cfg.num_envs, STACK, 84, 84), dtype=torch.uint8)
    act_buf = torch.zeros((cfg.num_steps, cfg.num_envs), dtype=torch.long)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros((cfg.num_steps, cfg.num_envs)) for _ in range(4))
    obs, _ = envs.reset(seed=cfg.seed)
    next_obs = torch.as_tensor(np.asarray(obs))
    next_done = torch.zeros(cfg.num_envs)
    step = 0

    def policy(x):
        feat = agent.network(x.float() / 255.0)
        return torch.distributions.Categorical(logits=agent.actor(feat)), agent.critic(feat).squeeze(-1)

    for it in range(iterations):
        opt.param_groups[0]["lr"] = cfg.learning_rate * (1.0 - it / iterations)
        episode_returns = []
        for t in range(cfg.num_steps):
            obs_buf[t], done_buf[t] = next_obs, next_done
            with torch.no_grad():
                dist, value = policy(next_obs)
                action = dist.sample()
            act_buf[t], logp_buf[t], val_buf[t] = action, dist.log_prob(action), value
            obs, reward, term, trunc, info = envs.step(action.numpy())
            rew_buf[t] = torch.as_tensor(np.sign(reward), dtype=torch.float32)
            next_obs, next_done = torch.as_tensor(np.asarray(obs)), torch.as_tensor(term | trunc, dtype=torch.float32)
            if "episode" in info:
                episode_returns += [float(r) for r, m in zip(info["episode"]["r"], info["_episode"]) if m]
            step += cfg.num_envs
        with torch.no_grad():
            _, next_value = policy(next_obs)
            adv = torch.zeros_like(rew_buf)
            last = 0.0
            for t in reversed(range(cfg.num_steps)):
                nonterm = 1.0 - (next_done if t == cfg.num_steps - 1 else done_buf[t + 1])
                nv = next_value if t == cfg.num_steps - 1 else val_buf[t + 1]
                delta = rew_buf[t] + cfg.gamma * nv * nonterm - val_buf[t]
                adv[t] = last = delta + cfg.gamma * cfg.gae_lambda * nonterm * last
            ret = adv + val_buf
        b_obs, b_act, b_logp = obs_buf.reshape(-1, STACK, 84, 84), act_buf.reshape(-1), logp_buf.reshape(-1)
        b_adv, b_ret = adv.reshape(-1), ret.reshape(-1)
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(batch).split(minibatch):
                dist, value = policy(b_obs[idx])
                ratio = (dist.log_prob(b_act[idx]) - b_logp[idx]).exp()
                a = b_adv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                v_loss = 0.5 * ((value - b_ret[idx]) ** 2).mean()
                loss = pg - cfg.ent_coef * dist.entropy().mean() + cfg.vf_coef * v_loss
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                opt.step()
        emit({"iteration": it + 1, "steps": step, "policy_loss": pg.item(), "value_loss": v_loss.item(),
              "episodes": len(episode_returns),
              "episode_return_mean": float(np.mean(episode_returns)) if episode_returns else None})
        if progress:
            progress(step, iterations * batch)


def _train_dqn(cfg, envs, q, n_actions, emit, progress) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=1e-4)
    size = min(cfg.buffer_size, max(cfg.steps, cfg.batch_size))
    obs_b = np.zeros((size, STACK, 84, 84), np.uint8)
    next_b = np.zeros_like(obs_b)
    act_b, rew_b, done_b = np.zeros(size, np.int64), np.zeros(size, np.float32), np.zeros(size, np.float32)
    pos, full = 0, False
    rng = np.random.default_rng(cfg.seed)
    obs, _ = envs.reset(seed=cfg.seed)
    obs = np.asarray(obs)
    total = cfg.steps // cfg.num_envs
    episode_returns, loss = [], None
    for it in range(total):
        step = it * cfg.num_envs
        eps = max(cfg.eps_end, 1.0 - (1.0 - cfg.eps_end) * step / max(1, cfg.eps_fraction * cfg.steps))
        if rng.random() < eps:
            actions = rng.integers(n_actions, size=cfg.num_envs)
        else:
            with torch.no_grad():
                actions = q(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()
        nxt, reward, term, trunc, info = envs.step(actions)
        nxt = np.asarray(nxt)
        for e in range(cfg.num_envs):  # autoreset envs return the reset obs on the next step: fine for DQN
            obs_b[pos], next_b[pos], act_b[pos] = obs[e], nxt[e], actions[e]
            rew_b[pos], done_b[pos] = np.sign(reward[e]), float(term[e])
            pos = (pos + 1) % size
            full = full or pos == 0
        if "episode" in info:
            episode_returns += [float(r) for r, m in zip(info["episode"]["r"], info["_episode"]) if m]
        obs = nxt
        n = size if full else pos
        if step >= cfg.learning_starts and it % cfg.train_frequency == 0 and n >= cfg.batch_size:
            idx = rng.integers(n, size=cfg.batch_size)
            with torch.no_grad():
                tq = target(torch.as_tensor(next_b[idx], dtype=torch.float32)).max(-1).values
                y = torch.as_tensor(rew_b[idx]) + cfg.gamma * tq * (1 - torch.as_tensor(done_b[idx]))
            pred = q(torch.as_tensor(obs_b[idx], dtype=torch.float32)).gather(1, torch.as_tensor(act_b[idx])[:, None])
            loss = F.mse_loss(pred.squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if it % max(1, cfg.target_update // cfg.num_envs) == 0:
            target.load_state_dict(q.state_dict())
        if it % 100 == 0 or it == total - 1:
            emit({"steps": step + cfg.num_envs, "epsilon": eps, "loss": loss.item() if loss is not None else None,
                  "episodes": len(episode_returns),
                  "episode_return_mean": float(np.mean(episode_returns[-10:])) if episode_returns else None})
            if progress:
                progress(step + cfg.num_envs, total * cfg.num_envs)
