"""Verify the vLLM agent path with a real model and print decision latencies.

Runs the VLM agent (agents/vlm.py) on the vLLM backend (agents/vllm_backend.py) over real Atari frames:
in-process, then (``--server``) through a ``vllm serve`` it starts on loopback. For each setting it
reports p50/p99 decision latency (prompt build + engine + activations), and checks that actions are
legal and activations finite. ``--compare-transformers`` also runs the transformers backend on the same
observations and reports action agreement and activation differences (bf16 on GPU: not bit-equal).

    python deploy/gpu/check_vllm.py --model Qwen/Qwen2.5-VL-7B-Instruct            # GPU, bf16
    python deploy/gpu/check_vllm.py --model /tmp/tiny --dtype float32 --server      # CPU, tiny model

The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def frames_from_game(game: str, n: int, seed: int = 0):
    from agents.base import FrameRef

    try:
        import ale_py
        import gymnasium as gym
    except ImportError:  # a bare GPU host: random 210×160 frames, Breakout's action set
        print("ale-py/gymnasium missing: using random frames", flush=True)
        rng = np.random.default_rng(seed)
        frames = [FrameRef(seq=t, t_ns=t * 66_666_667, pixels=rng.integers(0, 256, (210, 160, 3), dtype=np.uint8))
                  for t in range(n)]
        return frames, ("NOOP", "FIRE", "RIGHT", "LEFT")

    gym.register_envs(ale_py)
    env = gym.make(game, repeat_action_probability=0.0)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(n * 8):
        obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        if term or trunc:
            obs, _ = env.reset()
        if t % 8 == 7:
            frames.append(FrameRef(seq=t, t_ns=t * 66_666_667, pixels=obs.copy()))
    meanings = tuple(env.unwrapped.get_action_meanings())
    env.close()
    return frames, meanings


def observations(frames, meanings, k: int):
    from agents.base import Observation

    return [Observation(tuple(frames[i - k + 1:i + 1]), meanings) for i in range(k - 1, len(frames))]


def time_agent(agent, obs_list, warmup: int) -> dict:
    for o in obs_list[:warmup]:
        agent.infer(o)
    lat, decisions = [], []
    for o in obs_list[warmup:]:
        t0 = time.perf_counter()
        d = agent.infer(o)
        lat.append((time.perf_counter() - t0) * 1e3)
        decisions.append(d)
        assert all(0 <= c.action < len(o.action_meanings) for c in d.choices)
        assert all(np.isfinite(a.vectors.astype(np.float32)).all() for a in d.activations)
    lat = np.asarray(lat)
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "n": len(lat), "decisions": decisions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="hub name or local directory (Qwen2.5-VL / Qwen2-VL family)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 on GPU; float32 on CPU")
    ap.add_argument("--game", default="ALE/Breakout-v5")
    ap.add_argument("--n", type=int, default=40, help="timed decisions per setting")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--server", action="store_true", help="also test through a vllm serve on loopback")
    ap.add_argument("--compare-transformers", action="store_true", help="also run the transformers backend")
    ap.add_argument("--load-format", default=None, help="e.g. 'dummy': random weights, config + tokenizer only")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()

    from agents.vlm import VLMAgent, VLMConfig
    from agents.vllm_backend import VllmBackend, VllmConfig, VllmServer

    frames, meanings = frames_from_game(args.game, args.n + args.warmup + 4)
    settings = [("1frame_1cond", 1, ["action"]), ("4frames_1cond", 4, ["action"]),
                ("4frames_2cond", 4, ["action", "reasoning"])]
    extra = {"load_format": args.load_format} if args.load_format else {}
    vcfg = VllmConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, extra_engine_args=extra)
    report: dict = {"model": args.model, "dtype": args.dtype, "game": args.game}

    def run_all(backend, label):
        for name, k, conds in settings:
            for poolings in (("last_token",), ("last_token", "mean_image")):
                agent = VLMAgent(VLMConfig(model=args.model, conditions=conds, poolings=poolings), backend)
                r = time_agent(agent, observations(frames, meanings, k)[: args.n + args.warmup], args.warmup)
                key = f"{label}/{name}/{'+'.join(poolings)}"
                report[key] = {k2: v for k2, v in r.items() if k2 != "decisions"}
                report[key]["layers"] = backend.num_layers
                print(f"{key:55s} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  (all {backend.num_layers} "
                      "hidden-state entries)", flush=True)
                if label == "in_process" and name == "4frames_1cond" and len(poolings) == 2:
                    report["_ref"] = r["decisions"]

    t0 = time.perf_counter()
    backend = VllmBackend(vcfg)
    report["engine_start_s"] = round(time.perf_counter() - t0, 1)
    try:
        run_all(backend, "in_process")
    finally:
        backend.close()

    if args.server:
        t0 = time.perf_counter()
        server = VllmServer(vcfg, log_path="vllm-serve-check.log")
        report["server_start_s"] = round(time.perf_counter() - t0, 1)
        try:
            remote = VllmBackend(VllmConfig(model=args.model, server_url=server.url))
            run_all(remote, "server_shm")
            remote.close()
        finally:
            server.close()

    ref = report.pop("_ref", None)
    if args.compare_transformers and ref:
        import torch

        from agents.vlm import TransformersBackend

        tcfg = VLMConfig(model=args.model, conditions=["action"], dtype=args.dtype,
                         device="cuda" if torch.cuda.is_available() else "cpu")
        tagent = VLMAgent(tcfg, TransformersBackend(tcfg))
        obs = observations(frames, meanings, 4)[args.warmup: args.warmup + len(ref)]
        same, rel = 0, []
        for o, want in zip(obs, ref):
            got = tagent.infer(o)
            same += got.action == want.action
            for g, w in zip(got.activations, want.activations):
                w32 = w.vectors.astype(np.float32)
                rel.append(float(np.abs(g.vectors.astype(np.float32) - w32).max() / (np.abs(w32).max() + 1e-12)))
        report["vs_transformers"] = {"action_agreement": same / len(ref), "max_rel_activation_diff": max(rel)}
        print(f"transformers vs vLLM: same action {same}/{len(ref)}, max relative activation diff {max(rel):.2e} "
              "(activations published as float16)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
