"""RL baseline: train/serve observation equality, CleanRL/SB3 checkpoints (and their refusal), training
with resume after SIGKILL."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from agents.base import FrameRef, Observation
from agents.rl import CheckpointError, RLAgent, RLConfig, nature_cnn, observe_frame, read_checkpoint
from services.plumbing.game import GameEnv, GameSettings


def play(game: str, actions, sticky: float = 0.0, seed: int = 0) -> tuple[list[FrameRef], tuple[str, ...]]:
    """Frames as the emulator makes them (GameEnv, with pooled_gray), reset frame first."""
    env = GameEnv(GameSettings(game, seed=seed, repeat_action_probability=sticky))
    pixels, _ = env.reset()
    frames = [FrameRef(0, 0, pixels, env.pooled_gray, 0)]
    for t, a in enumerate(actions):
        pixels, _, term, trunc = env.step(int(a))
        frames.append(FrameRef(t + 1, (t + 1) * 66_666_667, pixels, env.pooled_gray, env.step_in_episode))
        assert not (term or trunc)
    meanings = tuple(env.action_meanings)
    env.close()
    return frames, meanings


@pytest.fixture(scope="module")
def pong_frames():
    return play("ALE/Pong-v5", [2 if t % 2 else 3 for t in range(12)])


def _obs(frames, meanings, i):
    return Observation((frames[i],), meanings)


def _save_cleanrl(path, algo, n_actions, seed=3, env_id=None):
    import torch

    torch.manual_seed(seed)
    net = nature_cnn(n_actions, algo)
    torch.save(net.state_dict(), path)
    if env_id:
        path.with_name(path.name + ".json").write_text(json.dumps({"env_id": env_id}))
    return net


@pytest.mark.parametrize("game,steps", [("ALE/Breakout-v5", 150), ("ALE/Pong-v5", 400)])
def test_served_stacks_equal_the_training_env(game, steps):
    """The same game steps through ale-py's vector env (training) and through the emulator's frames +
    the agent's stacking (serving) give identical 84×84×4 uint8 tensors, reset included."""
    from agents.train_rl import make_train_env

    actions = np.random.default_rng(5).integers(0, 4, steps)
    frames, meanings = play(game, actions)
    venv = make_train_env(game, 1, sticky=0.0, noop_max=0)
    trained, _ = venv.reset(seed=1)
    agent = RLAgent(RLConfig(checkpoint="random"), len(meanings))
    served = agent.stack(_obs(frames, meanings, 0))
    assert served.shape == (4, 84, 84) and served.dtype == np.uint8
    np.testing.assert_array_equal(served, trained[0])
    assert not served[:3].any(), "a new episode's stack is zero-padded, as in training"
    differing = 0
    for t, a in enumerate(actions):
        trained, *_ = venv.step(np.array([a], dtype=np.int32))
        served = agent.stack(_obs(frames, meanings, t + 1))
        np.testing.assert_array_equal(served, trained[0], err_msg=f"step {t + 1}")
        differing += int(not np.array_equal(frames[t + 1].pooled_gray, frames[t].pooled_gray))
    venv.close()
    assert differing > steps // 4, "the game moved: the comparison covered changing screens"


def test_pooled_gray_is_the_flicker_max_not_the_last_screen():
    frames, _ = play("ALE/Breakout-v5", [1] + [3] * 30)
    last = [observe_frame(f.pooled_gray) for f in frames]
    assert all(f.pooled_gray.shape == (210, 160) and f.pooled_gray.dtype == np.uint8 for f in frames)
    assert all(l.shape == (84, 84) for l in last)
    env = GameEnv(GameSettings("ALE/Breakout-v5", repeat_action_probability=0.0))
    env.reset()
    env.step(1)
    # max of the last two screens ≥ the last screen's grey, everywhere
    last_gray = env._ale.getScreenGrayscale()
    assert (env.pooled_gray >= last_gray).all()
    env.close()


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_cleanrl_checkpoint_round_trip(tmp_path, pong_frames, algo):
    import torch

    frames, meanings = pong_frames
    net = _save_cleanrl(tmp_path / f"{algo}.cleanrl_model", algo, len(meanings))
    agent = RLAgent(RLConfig(checkpoint=str(tmp_path / f"{algo}.cleanrl_model"), greedy=True,
                             activation_layers=("penultimate", "conv3")), len(meanings))
    assert agent.algo == algo
    for i in range(6):
        d = agent.infer(_obs(frames, meanings, i))
    # the agent's 4-stack is the last 4 preprocessed frames, oldest first
    stack = np.stack([observe_frame(f.pooled_gray) for f in frames[2:6]])
    with torch.no_grad():
        x = torch.from_numpy(stack).float()[None]
        logits = net(x)[0]
        feat = net.network[:9](x / 255.0)[0] if algo == "dqn" else net.network(x / 255.0)[0]
    assert d.action == int(logits.argmax())
    np.testing.assert_allclose(d.choices[0].probs, torch.softmax(logits.double(), -1).numpy(), atol=1e-6)
    pen = [a for a in d.activations if a.pooling == "penultimate"][0]
    assert pen.vectors.shape == (1, 512)
    np.testing.assert_allclose(pen.vectors[0], feat.numpy(), atol=1e-5)
    assert [a.vectors.shape for a in d.activations if a.pooling == "conv3"] == [(1, 64 * 7 * 7)]


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_sb3_zip_checkpoint_loads(tmp_path, pong_frames, algo):
    import torch

    frames, meanings = pong_frames
    net = nature_cnn(len(meanings), algo)
    sd = net.state_dict()
    # SB3 CnnPolicy key layout (NatureCNN features extractor + heads)
    if algo == "dqn":
        names = {"network.0": "q_net.features_extractor.cnn.0", "network.2": "q_net.features_extractor.cnn.2",
                 "network.4": "q_net.features_extractor.cnn.4", "network.7": "q_net.features_extractor.linear.0",
                 "network.9": "q_net.q_net.0"}
    else:
        names = {"network.0": "features_extractor.cnn.0", "network.2": "features_extractor.cnn.2",
                 "network.4": "features_extractor.cnn.4", "network.7": "features_extractor.linear.0",
                 "actor": "action_net", "critic": "value_net"}
    sb3 = {}
    for k, v in sd.items():
        for ours, theirs in names.items():
            if k.startswith(ours + "."):
                sb3[theirs + k[len(ours):]] = v
    if algo == "dqn":  # the target network is stored too
        sb3.update({k.replace("q_net.", "q_net_target.", 1): v for k, v in list(sb3.items())})
    buf = io.BytesIO()
    torch.save(sb3, buf)
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as z:
        z.writestr("policy.pth", buf.getvalue())
        z.writestr("data", json.dumps({"action_space": {"n": len(meanings)}}))
    ckpt = read_checkpoint(tmp_path / "model.zip")
    assert ckpt.algo == algo and ckpt.n_actions == len(meanings)
    agent = RLAgent(RLConfig(checkpoint=str(tmp_path / "model.zip")), len(meanings))
    for key, value in agent.net.state_dict().items():
        assert torch.equal(value, sd[key])
    assert 0 <= agent.infer(_obs(frames, meanings, 0)).action < len(meanings)


def test_frame_stack_uses_skipped_frames(pong_frames):
    """An RL agent that skipped frames still stacks the 4 consecutive newest frames it was trained on."""
    frames, meanings = pong_frames
    agent = RLAgent(RLConfig(checkpoint="random"), len(meanings))
    agent.infer(_obs(frames, meanings, 0))
    obs = Observation((frames[9],), meanings, skipped=tuple(frames[1:9]))
    stack = agent.stack(obs)
    np.testing.assert_array_equal(stack, np.stack([observe_frame(frames[i].pooled_gray) for i in range(6, 10)]))


def test_corrupt_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.cleanrl_model"
    _save_cleanrl(good, "ppo", 6)
    truncated = tmp_path / "truncated.cleanrl_model"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*truncated"):
        RLAgent(RLConfig(checkpoint=str(truncated)))
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        RLAgent(RLConfig(checkpoint=str(garbage)))
    with pytest.raises(CheckpointError, match="does not exist"):
        RLAgent(RLConfig(checkpoint=str(tmp_path / "missing.cleanrl_model")))


def test_wrong_architecture_is_refused(tmp_path):
    import torch

    wide = tmp_path / "wide.cleanrl_model"
    sd = nature_cnn(6, "ppo").state_dict()
    sd["network.7.weight"] = torch.zeros(256, 3136)  # a different hidden width
    torch.save(sd, wide)
    with pytest.raises(CheckpointError, match="wrong architecture"):
        RLAgent(RLConfig(checkpoint=str(wide)), 6)
    mlp = tmp_path / "mlp.cleanrl_model"
    torch.save({"fc1.weight": torch.zeros(64, 4), "fc2.weight": torch.zeros(2, 64)}, mlp)
    with pytest.raises(CheckpointError, match="wrong architecture"):
        RLAgent(RLConfig(checkpoint=str(mlp)), 6)
    notdict = tmp_path / "list.cleanrl_model"
    torch.save([torch.zeros(3)], notdict)
    with pytest.raises(CheckpointError, match="wrong architecture"):
        RLAgent(RLConfig(checkpoint=str(notdict)), 6)


def test_other_game_is_refused(tmp_path, pong_frames):
    frames, meanings = pong_frames
    breakout = tmp_path / "breakout.cleanrl_model"
    _save_cleanrl(breakout, "ppo", 4)  # Breakout's 4 actions vs Pong's 6
    with pytest.raises(CheckpointError, match="another game.*4 actions.*6"):
        RLAgent(RLConfig(checkpoint=str(breakout)), len(meanings))
    lazy = RLAgent(RLConfig(checkpoint=str(breakout)))  # built on the first observation instead
    with pytest.raises(CheckpointError, match="another game"):
        lazy.infer(_obs(frames, meanings, 0))
    same_n = tmp_path / "spaceinvaders.cleanrl_model"
    _save_cleanrl(same_n, "ppo", 6, env_id="ALE/SpaceInvaders-v5")  # same action count, recorded game differs
    with pytest.raises(CheckpointError, match="another game: trained on ALE/SpaceInvaders-v5, emulator runs ALE/Pong-v5"):
        RLAgent(RLConfig(checkpoint=str(same_n), game="ALE/Pong-v5"), 6)
    ok = RLAgent(RLConfig(checkpoint=str(same_n), game="SpaceInvadersNoFrameskip-v4"), 6)
    assert ok.algo == "ppo"


def test_train_rl_resumes_after_sigkill_on_the_same_schedule(tmp_path, pong_frames):
    """A killed run, rerun with the same command, continues from its last state file: the log has
    every iteration once, the learning rate keeps annealing on the original schedule, and the
    result is a loadable fp16 CleanRL checkpoint refused for another game."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "pong.cleanrl_model"
    code = ("from agents.train_rl import TrainConfig, train; "
            f"train(TrainConfig(game='ALE/Pong-v5', frames=4 * 2 * 16 * 12, num_envs=2, num_steps=16, "
            f"update_epochs=1, num_minibatches=2, checkpoint_every=2, torch_threads=1), {str(out)!r})")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    state = out.with_name(out.name + ".state.pt")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.is_file() and torch.load(state, weights_only=True)["iteration"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["iteration"]
    assert 4 <= killed_at < 12 and not out.exists(), "killed mid-run, before the final checkpoint"
    from agents.train_rl import export_state

    early = export_state(out)  # a run stopped early can still ship what it learnt, saying so
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert early.iterations == meta["iterations"] == killed_at and meta["planned_iterations"] == 12
    assert "train-rl" in meta["stages"][0]["command"] and "--export" not in meta["stages"][0]["command"]
    out.unlink()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    log = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in log] == list(range(1, 13))
    assert log[-1]["frames"] == 4 * 2 * 16 * 12
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["env_id"] == "ALE/Pong-v5" and meta["n_actions"] == 6 and meta["iterations"] == 12
    final = torch.load(state, weights_only=True)
    assert final["iteration"] == 12
    # Adam's lr after the last update is the schedule's value for iteration 12 (1 - 11/12 of 2.5e-4)
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2.5e-4 / 12)
    sd = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    frames, meanings = pong_frames
    agent = RLAgent(RLConfig(checkpoint=str(out), game="ALE/Pong-v5"))
    assert 0 <= agent.infer(_obs(frames, meanings, 0)).action < 6
    with pytest.raises(CheckpointError, match="another game"):
        RLAgent(RLConfig(checkpoint=str(out), game="ALE/Breakout-v5"))
    with pytest.raises(ValueError, match="other settings"):
        from agents.train_rl import TrainConfig, train
        train(TrainConfig(game="ALE/Pong-v5", frames=4 * 2 * 16 * 12, num_envs=2, num_steps=16, seed=7), out)
    # a warm start continues from the weights with a new schedule; the sidecar chains both stages
    more = tmp_path / "more.cleanrl_model"
    train(TrainConfig(game="ALE/Pong-v5", frames=4 * 2 * 16, num_envs=2, num_steps=16, update_epochs=1,
                      num_minibatches=2, torch_threads=1, init=str(out)), more)
    chained = json.loads(more.with_name(more.name + ".json").read_text())
    assert [st["frames"] for st in chained["stages"]] == [4 * 2 * 16 * 12, 4 * 2 * 16]
    assert chained["total_frames"] == 4 * 2 * 16 * 13
