"""Training benchmark: ``neuroarcade train-rl`` throughput vs a bare CleanRL-style PPO loop.

Both sides train the same Nature-CNN with the same settings (CleanRL's Atari recipe: 8 envs × 128
steps, 4 epochs × 4 minibatches; the precision and memory format train-rl picks for this machine)
on the same ale-py vector env. The floor is a plain loop in CleanRL's shape (sample, step, GAE,
update, nothing else); ours is :func:`agents.train_rl.train` with its logging, progress callback
and resumable state files (one state write per round: more often than the default, so the figure
is conservative). Rounds alternate (floor, ours; reversed every other round) because this VM's
speed drifts; frames/s per side are pooled over the rounds.

Last line: one JSON object with ``throughput_ratio`` (target ≥ 0.9).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bare_ppo_loop(cfg, iterations: int) -> float:
    """CleanRL-shaped PPO, nothing but the algorithm; returns frames/s over ``iterations``."""
    import torch
    from torch import nn

    from agents.rl import STACK, nature_cnn
    from agents.train_rl import env_threads, make_train_env

    envs = make_train_env(cfg.game, cfg.num_envs, cfg.sticky, threads=env_threads(cfg.num_envs))
    agent = nature_cnn(int(envs.single_action_space.n), "ppo")
    cl = torch.channels_last if cfg.channels_last else torch.contiguous_format
    agent = agent.to(memory_format=cl)
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.use_bf16 else None
    T, N = cfg.num_steps, cfg.num_envs
    obs_b = torch.zeros((T, N, STACK, 84, 84), dtype=torch.uint8)
    act_b = torch.zeros((T, N), dtype=torch.long)
    logp_b, rew_b, done_b, val_b = (torch.zeros((T, N)) for _ in range(4))

    def policy(x):
        x = (x.float() / 255.0).contiguous(memory_format=cl)
        if amp:
            with amp():
                h = agent.network(x)
                logits, v = agent.actor(h), agent.critic(h)
        else:
            h = agent.network(x)
            logits, v = agent.actor(h), agent.critic(h)
        return torch.distributions.Categorical(logits=logits.float()), v.float().squeeze(-1)

    o, _ = envs.reset(seed=cfg.seed)
    next_obs, next_done = torch.from_numpy(o), torch.zeros(N)
    t0 = 0.0
    for it in range(iterations + 1):  # the first iteration is warm-up, as on our side
        if it == 1:
            t0 = time.perf_counter()
        for t in range(T):
            obs_b[t], done_b[t] = next_obs, next_done
            with torch.no_grad():
                dist, v = policy(next_obs)
                a = dist.sample()
            act_b[t], logp_b[t], val_b[t] = a, dist.log_prob(a), v
            o, r, term, trunc, _ = envs.step(a.numpy().astype(np.int32))
            rew_b[t] = torch.from_numpy(np.sign(r).astype(np.float32))
            next_obs, next_done = torch.from_numpy(o), torch.from_numpy((term | trunc).astype(np.float32))
        with torch.no_grad():
            _, nv = policy(next_obs)
            adv, last = torch.zeros_like(rew_b), 0.0
            for t in reversed(range(T)):
                nonterm = 1.0 - (next_done if t == T - 1 else done_b[t + 1])
                nxt = nv if t == T - 1 else val_b[t + 1]
                last = rew_b[t] + cfg.gamma * nxt * nonterm - val_b[t] + cfg.gamma * cfg.gae_lambda * nonterm * last
                adv[t] = last
            ret = adv + val_b
        bo, ba, bl = obs_b.reshape(-1, STACK, 84, 84), act_b.reshape(-1), logp_b.reshape(-1)
        badv, bret, bval = adv.reshape(-1), ret.reshape(-1), val_b.reshape(-1)
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(T * N).split(T * N // cfg.num_minibatches):
                dist, v = policy(bo[idx])
                ratio = (dist.log_prob(ba[idx]) - bl[idx]).exp()
                mb = (badv[idx] - badv[idx].mean()) / (badv[idx].std() + 1e-8)
                pg = torch.max(-mb * ratio, -mb * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                vc = bval[idx] + (v - bval[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
                vl = 0.5 * torch.max((v - bret[idx]) ** 2, (vc - bret[idx]) ** 2).mean()
                loss = pg - cfg.ent_coef * dist.entropy().mean() + cfg.vf_coef * vl
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                opt.step()
    seconds = time.perf_counter() - t0
    envs.close()
    return iterations * T * N * 4 / seconds


def ours(cfg, iterations: int, out: Path) -> float:
    """train-rl's loop for ``iterations`` (timed from its first to its last progress report:
    both sides leave out env and model construction)."""
    from dataclasses import replace

    from agents.train_rl import train

    stamps: list[tuple[float, int]] = []
    run = replace(cfg, frames=(iterations + 1) * cfg.batch * 4, checkpoint_every=iterations)
    train(run, out, progress=lambda p: stamps.append((time.perf_counter(), p.frames)))
    (t_a, f_a), (t_b, f_b) = stamps[0], stamps[-1]
    return (f_b - f_a) / (t_b - t_a)


def main(game: str = "ALE/Breakout-v5", rounds: int = 3, iterations: int = 5) -> dict:
    import torch

    from agents.train_rl import TrainConfig

    torch.set_num_threads(torch.get_num_threads())
    cfg = TrainConfig(game=game)
    floor_fps, our_fps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for side in (("floor", "ours") if r % 2 == 0 else ("ours", "floor")):
                if side == "floor":
                    floor_fps.append(bare_ppo_loop(cfg, iterations))
                else:
                    out = Path(tmp) / f"r{r}.cleanrl_model"
                    our_fps.append(ours(cfg, iterations, out))
            print(f"round {r + 1}/{rounds}: floor {floor_fps[-1]:.0f} frames/s, train-rl {our_fps[-1]:.0f} frames/s",
                  flush=True)
    floor, ourv = float(np.mean(floor_fps)), float(np.mean(our_fps))
    result = {"game": game, "bf16": cfg.use_bf16, "channels_last": cfg.channels_last, "rounds": rounds,
              "iterations_per_round": iterations, "floor_frames_per_s": round(floor, 1),
              "train_rl_frames_per_s": round(ourv, 1), "throughput_ratio": round(ourv / floor, 3),
              "round_ratios": [round(o / f, 3) for o, f in zip(our_fps, floor_fps)]}
    print(f"train-rl {ourv:.0f} frames/s vs bare CleanRL-style loop {floor:.0f} frames/s: ratio {ourv / floor:.3f}")
    print(json.dumps(result))
    return result
