"""GPU check of the transformers VLM path (no vLLM needed): the tiny model on CUDA vs CPU.

Same frames, same prompts: actions must agree and last-token activations must agree within bf16/fp32
tolerance; prints per-decision latency on the GPU. Last line: JSON. Run: python deploy/gpu/check_transformers.py
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    from agents.base import FrameRef, Observation
    from agents.tiny import build_tiny
    from agents.vlm import VLMAgent, VLMConfig
    from services.plumbing.game import GameEnv, GameSettings

    game = GameEnv(GameSettings(game="ALE/Breakout-v5", repeat_action_probability=0.0))
    pixels, _ = game.reset()
    frames = []
    for i in range(40):
        pixels, *_ = game.step(i % game.n_actions)
        frames.append(pixels.copy())
    meanings = tuple(game.action_meanings)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny(f"{tmp}/tiny", "vlm"))
        out = {}
        for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
            agent = VLMAgent(VLMConfig(model=model, conditions=["action", "reasoning"], device=device, dtype=dtype,
                                       activation_dtype="float32"))
            acts, vecs, lat = [], [], []
            for k, px in enumerate(frames):
                t0 = time.perf_counter()
                d = agent.infer(Observation((FrameRef(k, k, px),), meanings, 0))
                if device == "cuda":
                    torch.cuda.synchronize()
                lat.append((time.perf_counter() - t0) * 1e3)
                acts.append([c.action for c in d.choices])
                vecs.append(np.concatenate([a.vectors.ravel() for a in d.activations if a.pooling == "last_token"]))
            out[f"{device}-{dtype}"] = (acts, np.stack(vecs), np.array(lat[5:]))
    ref_a, ref_v, _ = out["cpu-float32"]
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for key, (a, v, lat) in out.items():
        scale = np.abs(ref_v).max(axis=1, keepdims=True)
        result[key] = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                       "same_actions": float(np.mean(np.array(a) == np.array(ref_a))),
                       "max_rel_activation_diff": float((np.abs(v - ref_v) / scale).max())}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
