"""Evaluate an RL agent the way the product plays: whole games (every life), sticky actions.

Example::

    neuroarcade eval-rl agents/checkpoints/breakout.cleanrl_model --episodes 10 --sticky 0.25

Two paths, same games: ``headless`` steps :class:`services.plumbing.game.GameEnv` (the emulator's own game
core, with the frames it publishes, ``pooled_gray`` included) and calls the agent's ``infer``
directly — fast, for many episodes; ``service`` runs the real emulator in lockstep and the agent
service as its controller over loopback ZeroMQ, and reads the returns back from the session's
recording. A uniformly random policy plays the same seeds in the same run as the floor.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from agents.base import FrameRef, Observation
from agents.spec import AgentSpec, build_agent
from services.plumbing.game import GameEnv, GameSettings

PATHS = ("headless", "service")


@dataclass
class EvalConfig:
    """One evaluation."""

    game: str = "ALE/Breakout-v5"
    checkpoint: str | None = None
    """None: the checkpoint that ships for ``game``."""
    episodes: int = 5
    sticky: float = 0.25
    """Sticky-action probability (0.25: the v5 default and the emulator's)."""
    seed: int = 0
    """Episode i is a new game seeded ``seed + i`` (the random floor plays the same seeds)."""
    path: str = "headless"
    """``headless`` (GameEnv + infer) or ``service`` (emulator + agent service on loopback)."""
    max_steps: int = 27_000
    """Steps per game at most (108,000 frames: v5's own limit)."""


@dataclass
class EvalSummary:
    """Returns of the agent and of a random policy on the same games."""

    game: str
    checkpoint: str
    path: str
    sticky: float
    seed: int
    episodes: int
    mean_return: float
    std_return: float
    """Sample standard deviation (ddof 1; 0 for one episode)."""
    random_mean_return: float
    random_std_return: float
    returns: list[float] = field(default_factory=list)
    random_returns: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    """Agent steps of each of the agent's games."""


def _std(x: list[float]) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def play_headless(agent, settings: GameSettings, max_steps: int) -> tuple[float, int]:
    """One whole game: the agent decides on every frame the emulator would publish.
    Returns (raw return, steps)."""
    game = GameEnv(settings)
    try:
        pixels, _ = game.reset()
        agent.reset()
        meanings = tuple(game.action_meanings)
        total, seq = 0.0, 0
        for step in range(max_steps):
            frame = FrameRef(seq, 0, pixels, game.pooled_gray, game.step_in_episode)
            action = agent.infer(Observation((frame,), meanings)).action
            pixels, reward, terminated, truncated = game.step(action)
            seq += 1
            total += reward
            if terminated or truncated:
                return total, step + 1
        return total, max_steps
    finally:
        game.close()


def play_service(spec: AgentSpec, settings: GameSettings, episodes: int, max_steps: int,
                 record_dir: Path) -> list[tuple[float, int]]:
    """``episodes`` whole games through the real emulator (lockstep) with the agent ``spec`` names as its
    controller (the agent service in a process of its own: ``pipelines.closed_loop.run_closed_loop``);
    returns (raw return, steps) per game, read from the session's recording. The controller has 120 s to
    join (a spawned process loads torch and the model first)."""
    from pipelines.closed_loop import LoopConfig, run_closed_loop
    from services.emulator import EmulatorConfig
    from services.plumbing.recording import read_recording

    record = record_dir / f"eval-{settings.seed}.narec"
    run_closed_loop(LoopConfig(
        emulator=EmulatorConfig(game=settings, mode="lockstep", max_episodes=episodes, max_steps=episodes * max_steps,
                                step_timeout_s=30.0, on_timeout="wait", wait_for_controller_s=120.0),
        agents=[replace(spec, role="controller", game=settings.game)], duration_s=None, publish_activations=False,
        record_path=str(record)))
    rec = read_recording(record)
    by_episode: dict[int, list[float]] = {}
    for s in rec.steps:
        by_episode.setdefault(s.episode, []).append(s.reward)
    # the last episode counts only when it ended (the emulator stops after max_episodes endings)
    ended = {s.episode for s in rec.steps if s.terminated or s.truncated}
    return [(float(sum(r)), len(r)) for e, r in sorted(by_episode.items()) if e in ended or len(r) >= max_steps]


def evaluate(cfg: EvalConfig, progress: Callable[[str], None] | None = None) -> EvalSummary:
    """Play ``cfg.episodes`` games with the agent, then the same seeds with a random policy."""
    if cfg.path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {cfg.path!r}")
    if cfg.episodes < 1:
        raise ValueError("episodes must be at least 1")
    rl = AgentSpec("eval-rl", "rl", role="controller", model=cfg.checkpoint or "", game=cfg.game, seed=cfg.seed)
    agent = build_agent(rl)  # in this process: its name, and the headless games
    results: dict[str, list[tuple[float, int]]] = {}
    for name, spec in (("agent", rl), ("random", AgentSpec("eval-random", "random", role="controller"))):
        out = []
        if cfg.path == "headless":
            for ep in range(cfg.episodes):
                settings = GameSettings(cfg.game, seed=cfg.seed + ep, repeat_action_probability=cfg.sticky)
                player = agent if name == "agent" else build_agent(replace(spec, seed=cfg.seed + ep))
                out.append(play_headless(player, settings, cfg.max_steps))
                if progress:
                    progress(f"{name} game {ep + 1}/{cfg.episodes}: return {out[-1][0]:g} in {out[-1][1]} steps")
        else:
            settings = GameSettings(cfg.game, seed=cfg.seed, repeat_action_probability=cfg.sticky)
            with tempfile.TemporaryDirectory() as tmp:
                out = play_service(replace(spec, seed=cfg.seed), settings, cfg.episodes, cfg.max_steps, Path(tmp))
            if progress:
                progress(f"{name}: returns {[r for r, _ in out]}")
        results[name] = out
    returns = [r for r, _ in results["agent"]]
    floor = [r for r, _ in results["random"]]
    return EvalSummary(cfg.game, agent.name, cfg.path, cfg.sticky, cfg.seed, len(returns),
                       float(np.mean(returns)), _std(returns), float(np.mean(floor)), _std(floor),
                       returns, floor, [n for _, n in results["agent"]])


# --- model card --------------------------------------------------------------------------------


def training_logs(checkpoint: str | Path) -> list[tuple[int, Path]]:
    """(frames before the stage, log path) per training stage of ``checkpoint``, oldest first: the stages
    its sidecar lists (a warm-started run continues an earlier one), logs beside the checkpoint."""
    from agents.train_rl import training_stages

    ckpt = Path(checkpoint)
    stages = training_stages(str(ckpt)) or [{"frames": 0, "log": ckpt.name + ".log.jsonl"}]
    out, before = [], 0
    for st in stages:
        out.append((before, ckpt.with_name(Path(st["log"]).name)))
        before += int(st["frames"])
    return out


def plot_training_curve(checkpoint: str | Path, png: str | Path, title: str) -> Path:
    """Mean raw return of the last 20 training games against frames, from the training logs of every
    stage of ``checkpoint`` (``training_logs``); a dotted line marks where a warm-started stage began."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for k, (before, log) in enumerate(training_logs(checkpoint)):
        if not log.is_file():
            continue
        rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        pts = [((before + r["frames"]) / 1e6, r["episode_return_mean"]) for r in rows
               if r.get("episode_return_mean") is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, color="C0")
        if k:
            ax.axvline(before / 1e6, color="0.5", ls=":", lw=1)
    ax.set_xlabel("emulator frames (millions)")
    ax.set_ylabel("return (mean of last 20 games)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def record_in_card(summary: EvalSummary, command: str, curve_png: str | Path | None = None) -> Path:
    """Store this evaluation in the checkpoint's sidecar (one entry per path × sticky × seed ×
    episodes) and rewrite its model card ``<checkpoint>.md`` from the sidecar."""
    import json
    from dataclasses import asdict

    ckpt = Path(summary.checkpoint)
    sidecar = ckpt.with_name(ckpt.name + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    key = (summary.path, summary.sticky, summary.seed, summary.episodes)
    evals = [e for e in meta.get("evaluations", [])
             if (e["path"], e["sticky"], e["seed"], e["episodes"]) != key]
    evals.append({**asdict(summary), "checkpoint": ckpt.name, "command": command})
    meta["evaluations"] = sorted(evals, key=lambda e: (e["path"], -e["sticky"], e["seed"]))
    if curve_png:  # a link the card (beside the checkpoint) can follow
        meta["curve"] = os.path.relpath(Path(curve_png).resolve(), ckpt.parent.resolve())
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    card = ckpt.with_name(ckpt.name.split(".")[0] + ".md")
    card.write_text(_card_text(ckpt.name, meta))
    return card


def _card_text(name: str, meta: dict) -> str:
    cfg = meta.get("config", {})
    minutes = sum((st.get("train_seconds") or 0) for st in meta.get("stages", [])) / 60 \
        if meta.get("stages") else meta.get("train_seconds", 0) / 60
    lines = [
        f"# {name}: PPO Nature-CNN for {meta.get('env_id', '?')}", "",
        "Trained here with `neuroarcade train-rl` (CleanRL's Atari PPO recipe on ale-py's vector env); "
        "the RL agent service loads it by default for this game.", "",
        "| | |", "|---|---|",
        f"| game | {meta.get('env_id')} ({meta.get('n_actions')} actions), ale-py {meta.get('ale_py_version')} |",
        f"| frames | {meta.get('total_frames', meta.get('frames', 0)):,} in all; this stage "
        f"{meta.get('frames', 0):,} ({meta.get('iterations')} iterations of "
        f"{cfg.get('num_envs')} envs × {cfg.get('num_steps')} steps × frameskip 4"
        + (f", stopped early: {meta['planned_iterations']} planned" if meta.get("planned_iterations", meta.get(
            "iterations")) != meta.get("iterations") else "") + ") |",
        f"| seed | {meta.get('seed')} |",
        f"| play | sticky actions {cfg.get('sticky')}, no FIRE on reset, whole games (a lost life cuts the "
        f"value bootstrap only), up to {meta.get('observation', {}).get('noop_max')} NOOPs at reset |",
        f"| precision | {'bf16 autocast' if meta.get('bf16') else 'fp32'}, channels-last "
        f"{cfg.get('channels_last')}; weights stored fp16 |",
        *([f"| stage {k + 1} | `{st.get('command')}` ({st.get('frames', 0):,} frames, seed {st.get('seed')}, "
           f"{(st.get('train_seconds') or 0) / 60:.0f} min) |" for k, st in enumerate(meta["stages"])]
          if len(meta.get("stages", [])) > 1 else [f"| command | `{meta.get('command')}` |"]),
        *(["| warm start | each stage starts from the previous stage's weights (`--init`, a copy of its "
           "output) with a fresh optimiser and learning-rate schedule |"] if len(meta.get("stages", [])) > 1 else []),
        f"| wall time | {minutes:.0f} min on {meta.get('machine')} (torch {meta.get('torch_version')}) |",
        f"| training return | {meta.get('episode_return_last')} (mean of the last 20 training games) |", "",
    ]
    if meta.get("curve"):
        lines += [f"![training curve]({meta['curve']})", ""]
    if meta.get("evaluations"):
        lines += ["## Evaluation (`neuroarcade eval-rl`)", "",
                  "Whole games (every life) on seeds `seed … seed + episodes − 1`; the random policy plays "
                  "the same seeds in the same run.", "",
                  "| path | sticky | games | return (mean ± sd) | random (mean ± sd) | command |",
                  "|---|---|---|---|---|---|"]
        for e in meta["evaluations"]:
            lines.append(f"| {e['path']} | {e['sticky']} | {e['episodes']} | {e['mean_return']:.1f} ± "
                         f"{e['std_return']:.1f} | {e['random_mean_return']:.1f} ± {e['random_std_return']:.1f} | "
                         f"`{e['command']}` |")
        lines += ["", "Output of each (JSON last line of the command):", ""]
        for e in meta["evaluations"]:
            quoted = {k: e[k] for k in ("episodes", "mean_return", "std_return", "random_mean_return", "returns",
                                        "random_returns")}
            lines.append(f"- {e['path']}, sticky {e['sticky']}: `{__import__('json').dumps(quoted)}`")
        lines.append("")
    return "\n".join(lines)
