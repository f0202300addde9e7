"""The RL checkpoints that ship: each plays whole games (every life, sticky actions) well above a
random policy of the same run, and the product path (emulator + agent service over ZeroMQ) plays
exactly the game the headless evaluation plays."""

from __future__ import annotations

import json

import pytest

from agents.rl import CHECKPOINTS, RLAgent, RLConfig
from pipelines.evaluate_rl import EvalConfig, evaluate

SHIPPED = sorted(CHECKPOINTS.glob("*.cleanrl_model"))
# Return above the same run's random floor that each checkpoint clears on every seed set tried
# (model cards list the evaluations); a broken checkpoint, observation or action map falls to ≈ 0.
MARGIN = {"breakout": 10.0, "pong": 15.0}


def _game(ckpt) -> str:
    return json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["env_id"]


def test_breakout_ships_with_a_model_card():
    ckpt = CHECKPOINTS / "breakout.cleanrl_model"
    assert ckpt.is_file() and (CHECKPOINTS / "breakout.md").is_file()
    meta = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())
    assert meta.get("total_frames", meta["frames"]) >= 5_000_000 and meta["env_id"] == "ALE/Breakout-v5"
    assert all((CHECKPOINTS / st["log"]).is_file() for st in meta["stages"]), "every stage's training log ships"
    assert RLAgent(RLConfig(game="ALE/Breakout-v5")).name == str(ckpt), "loaded by default for its game"


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", SHIPPED, ids=lambda p: p.name.split(".")[0])
def test_shipped_checkpoint_beats_random(ckpt):
    summary = evaluate(EvalConfig(game=_game(ckpt), episodes=5, sticky=0.25, seed=1000))
    assert summary.checkpoint == str(ckpt)
    assert summary.mean_return >= summary.random_mean_return + MARGIN[ckpt.name.split(".")[0]], summary


@pytest.mark.slow
def test_product_path_plays_the_headless_game():
    """Lockstep emulator + agent service as controller, real sockets: the same seed gives the same
    whole game, step for step, as the agent stepping the emulator's game core directly."""
    cfg = EvalConfig(game="ALE/Breakout-v5", episodes=1, sticky=0.25, seed=7)
    headless = evaluate(cfg)
    service = evaluate(EvalConfig(**{**cfg.__dict__, "path": "service"}))
    assert service.steps == headless.steps and service.returns == headless.returns
    assert service.random_returns == headless.random_returns
    assert headless.returns[0] > headless.random_returns[0]
