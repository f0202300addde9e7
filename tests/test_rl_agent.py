"""RL baseline: preprocessing, CleanRL/SB3 checkpoints (and their refusal), short local training."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from agents.base import FrameRef, Observation
from agents.rl import CheckpointError, RLAgent, RLConfig, nature_cnn, preprocess_frame, read_checkpoint


@pytest.fixture(scope="module")
def pong_frames():
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", repeat_action_probability=0.0)
    obs, _ = env.reset(seed=0)
    frames = [obs.copy()]
    for t in range(12):
        obs, *_ = env.step(2 if t % 2 else 3)
        frames.append(obs.copy())
    meanings = tuple(env.unwrapped.get_action_meanings())
    env.close()
    return frames, meanings


def _obs(frames, meanings, i):
    return Observation((FrameRef(i, i * 66_666_667, frames[i]),), meanings)


def _save_cleanrl(path, algo, n_actions, seed=3, env_id=None):
    import torch

    torch.manual_seed(seed)
    net = nature_cnn(n_actions, algo)
    torch.save(net.state_dict(), path)
    if env_id:
        path.with_name(path.name + ".json").write_text(json.dumps({"env_id": env_id}))
    return net


def test_preprocess_is_84x84_gray(pong_frames):
    frames, _ = pong_frames
    x = preprocess_frame(frames[0])
    assert x.shape == (84, 84) and x.dtype == np.uint8
    assert 0 < x.mean() < 255 and len(np.unique(x)) > 2


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_cleanrl_checkpoint_round_trip(tmp_path, pong_frames, algo):
    import torch

    frames, meanings = pong_frames
    net = _save_cleanrl(tmp_path / f"{algo}.cleanrl_model", algo, len(meanings))
    agent = RLAgent(RLConfig(checkpoint=str(tmp_path / f"{algo}.cleanrl_model"),
                             activation_layers=("penultimate", "conv3")), len(meanings))
    assert agent.algo == algo
    for i in range(6):
        d = agent.infer(_obs(frames, meanings, i))
    # the agent's 4-stack is the last 4 preprocessed frames, oldest first
    stack = np.stack([preprocess_frame(f) for f in frames[2:6]])
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
    agent = RLAgent(RLConfig(), len(meanings))
    agent.infer(_obs(frames, meanings, 0))
    obs = Observation((FrameRef(9, 0, frames[9]),), meanings,
                      skipped=tuple(FrameRef(i, 0, frames[i]) for i in range(1, 9)))
    stack = agent.stack(obs)
    np.testing.assert_array_equal(stack, np.stack([preprocess_frame(frames[i]) for i in range(6, 10)]))


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


def test_train_rl_short_run_writes_a_loadable_checkpoint(tmp_path, pong_frames):
    from agents.train_rl import TrainConfig, train

    frames, meanings = pong_frames
    out = tmp_path / "pong.cleanrl_model"
    meta = train(TrainConfig(steps=128, num_envs=2, num_steps=32, update_epochs=1, eval_max_steps=50), out)
    assert meta["env_id"] == "ALE/Pong-v5" and meta["n_actions"] == 6
    assert json.loads(out.with_name(out.name + ".json").read_text())["eval_returns"] == meta["eval_returns"]
    log = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    assert [row["steps"] for row in log] == [64, 128]
    agent = RLAgent(RLConfig(checkpoint=str(out), game="ALE/Pong-v5"))
    assert 0 <= agent.infer(_obs(frames, meanings, 0)).action < 6
    with pytest.raises(CheckpointError, match="another game"):
        RLAgent(RLConfig(checkpoint=str(out), game="ALE/Breakout-v5"))
