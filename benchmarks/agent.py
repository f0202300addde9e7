"""Agent benchmark: decision latency through the service vs the bare model forward, same inputs, same run.

Service: the real emulator (realtime, loopback TCP) in this process, the VLM agent service in a
spawned process as controller (1 torch thread). Its latency per decision is measured end to end
on the one host clock: the emulator's receive time of the Action (recording ``t_recv_ns``) minus the
frame's publish time (``Frame.t_ns``) — transport, decoding, the keep-newest hand-off, prompt and
image processing, forward, scoring, activation publishing and the Action's trip back.

Floor: the same model object in the same agent process, run bare on the very frames the service
decided on: image processing + forward + label scoring (``backend.run`` + softmax). With
``backend="vllm"`` the model is a vLLM engine (in the agent process, or a ``vllm serve`` at ``vllm_url``)
and the floor is ``VllmBackend.run`` on it: the same requests, activations included. The agent
alternates blocks of service decisions and bare runs (``Interleave``) so both see the same load.

Prints a table, then one JSON line with ``overhead_ratio`` = service p50 / bare p50 (target ≤ 1.15).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WARMUP = 5
BLOCK = 10
"""Frames per block: the agent process alternates a block of service decisions with a block of bare
runs on those same frames, so load drift on a shared machine hits both paths alike."""


class Interleave:
    """Agent wrapper: BLOCK frames decided through the service, then the same BLOCK frames run bare.

    In the bare block each arriving frame triggers one bare run (so both paths see the same
    background traffic) on a stored frame of the previous service block, and returns no decision.
    """

    def __init__(self, agent, block: int = BLOCK, content_cached: bool = False):
        self.inner, self.name, self.conditions = agent, agent.name, agent.conditions
        self.block = block
        self.content_cached = content_cached
        """The backend caches work by image content (vLLM: processed inputs, encoder outputs, prefix KV by
        hash): the bare re-run then gets a copy with one pixel's low bit flipped — same cost, new hash."""
        self.pending: list = []
        self.bare_ms: list[float] = []
        self.bare_seqs: list[int] = []
        self.service_seqs: list[int] = []
        self.bare_mode = False

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        self.inner.close()

    def infer(self, obs):
        from agents.prompts import label_probs

        if not self.bare_mode:
            decision = self.inner.infer(obs)
            self.pending.append(obs.newest)
            self.service_seqs.append(obs.newest.seq)
            self.bare_mode = len(self.pending) >= self.block
            return decision
        frame = self.pending.pop(0)
        agent = self.inner
        meanings = tuple(obs.action_meanings)
        prompts, labels = agent.prompts(1, meanings), agent.labels(meanings).token_ids
        t0 = time.perf_counter()
        pixels = frame.pixels
        if self.content_cached:
            pixels = pixels.copy()
            pixels.flat[0] ^= 1
        fwd = agent.backend.run([pixels], prompts, labels, agent.layers, tuple(agent.cfg.poolings))
        label_probs(fwd.label_logits)
        self.bare_ms.append((time.perf_counter() - t0) * 1e3)
        self.bare_seqs.append(frame.seq)
        self.bare_mode = bool(self.pending)
        return None


def _service_process(model: str, conditions: list[str], frames: str, control: str, activations: str,
                     seconds: float, results, backend: str = "transformers", vllm_url: str | None = None) -> None:
    from agents.vlm import VLMAgent, VLMConfig, build_backend
    from services.agent import AgentService, AgentServiceConfig

    cfg = VLMConfig(model=model, conditions=conditions)
    agent = Interleave(VLMAgent(cfg, build_backend(cfg, backend, vllm_url=vllm_url)), content_cached=backend == "vllm")
    try:
        service = AgentService(agent, AgentServiceConfig(agent_id="bench-vlm", role="controller",
                                                         frames_endpoint=frames, control_endpoint=control,
                                                         activations_endpoint=activations, duration_s=seconds))
        summary = service.run()
        results.put({"summary": summary, "bare_ms": agent.bare_ms, "bare_seqs": agent.bare_seqs})
    finally:
        agent.close()  # shuts an in-process vLLM engine down


def _wait_result(proc, results, timeout_s: float) -> dict:
    """The agent process's result; a process that died (e.g. its engine failed to start) fails fast."""
    import queue

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return results.get(timeout=2.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the agent process exited with {proc.exitcode} before reporting") from None
            if time.monotonic() > deadline:
                proc.terminate()
                raise TimeoutError(f"no result from the agent process after {timeout_s:.0f} s") from None


def _pcts(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main(model: str | None = None, seconds: float = 20.0, conditions: str = "action",
         game: str = "ALE/Pong-v5", backend: str = "transformers", vllm_url: str | None = None,
         family: str = "qwen2_5_vl") -> dict:
    """``model`` None builds a tiny model of ``family``. ``backend="vllm"``: the engine runs in the agent
    process (no ``vllm_url``) or at ``vllm_url``; the floor is then ``VllmBackend.run`` (the same engine,
    same requests) + softmax. A model the agent cannot run raises ``agents.families.ModelError`` here,
    before any process starts."""
    if backend == "vllm":
        from agents.vllm_backend import require_vllm

        require_vllm(remote=bool(vllm_url))  # before starting anything: clear advice, no traceback
    from services.emulator import Emulator, EmulatorConfig
    from services.plumbing.game import GameSettings
    from services.plumbing.recording import read_recording
    from services.plumbing.transport import free_tcp_endpoint

    conds = [c for c in conditions.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        from agents.families import family_of, preset_for

        built = model is None
        if built:
            from agents.tiny import build_tiny

            model = str(build_tiny(Path(tmp) / "tiny", family))
        preset = preset_for(model)
        fam, _ = family_of(preset.model if preset else model)  # unknown family / unreadable: a one-line error
        frames_ep, control_ep, act_ep = free_tcp_endpoint(), free_tcp_endpoint(), free_tcp_endpoint()
        emu = Emulator(EmulatorConfig(game=GameSettings(game=game, repeat_action_probability=0.0),
                                      frames_endpoint=frames_ep, control_endpoint=control_ep,
                                      record_path=str(Path(tmp) / "bench.narec")))
        summary_box: dict = {}
        emu_thread = threading.Thread(target=lambda: summary_box.update(s=emu.run()), daemon=True)
        emu_thread.start()
        emu.ready.wait(30)
        spawn = mp.get_context("spawn")
        results = spawn.Queue()
        in_process_engine = backend == "vllm" and not vllm_url  # its engine core is a child: not daemonic
        proc = spawn.Process(target=_service_process,
                             args=(model, conds, frames_ep, control_ep, act_ep, seconds, results, backend, vllm_url),
                             daemon=not in_process_engine)
        proc.start()
        out = _wait_result(proc, results, seconds + (400 if backend == "vllm" else 180))  # + model/engine start
        proc.join(60)
        emu.stop()
        emu_thread.join(30)
        rec = read_recording(summary_box["s"].record_path)

    frame_t = {s.seq: s.t_ns for s in rec.steps} | {r.seq: r.t_ns for r in rec.resets}
    # One Action per condition per decision: the first one received is the decision's latency.
    first_recv: dict[int, int] = {}
    for step in rec.steps:
        for a in step.actions:
            if a.agent_id == "bench-vlm":
                first_recv[a.frame_seq] = min(first_recv.get(a.frame_seq, a.t_recv_ns), a.t_recv_ns)
    seqs = sorted(s for s in first_recv if s in frame_t)[WARMUP:]
    service_ms = [(first_recv[s] - frame_t[s]) / 1e6 for s in seqs]
    bare_ms = out["bare_ms"][WARMUP:]
    same = len(set(seqs) & set(out["bare_seqs"]))
    service_summary = out["summary"]  # services.agent.AgentSummary

    model_name = model
    if built:  # the temp dir is gone: name the tiny model by its family
        model_name = "tiny-qwen2.5-vl" if fam.model_type == "qwen2_5_vl" else f"tiny-{fam.model_type}"
    svc50, svc99 = _pcts(service_ms)
    bare50, bare99 = _pcts(bare_ms)
    internal50 = float(np.median([c.latency_p50_ms for c in service_summary.conditions.values()]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent decision latency ({backend}), conditions {conds}, {len(seqs)} decisions / {len(bare_ms)} bare "
                        f"runs on the same frames, interleaved in blocks of {BLOCK}")
    for col in ("path", "p50 ms", "p99 ms"):
        table.add_column(col)
    table.add_row("service: frame published → action received", f"{svc50:.2f}", f"{svc99:.2f}")
    table.add_row("service: frame received → decision (in-agent)", f"{internal50:.2f}", "")
    table.add_row("bare backend.run + softmax (floor)", f"{bare50:.2f}", f"{bare99:.2f}")
    Console().print(table)
    result = {
        "bench": "agent", "backend": backend, "vllm": ("remote" if vllm_url else "in-process") if backend == "vllm" else None,
        "model": model_name, "family": fam.model_type, "conditions": conds,
        "decisions": len(seqs), "bare_runs": len(bare_ms), "bare_frames_also_decided": same,
        "service_p50_ms": round(svc50, 3), "service_p99_ms": round(svc99, 3),
        "service_internal_p50_ms": round(internal50, 3),
        "bare_p50_ms": round(bare50, 3), "bare_p99_ms": round(bare99, 3),
        "overhead_ratio": round(svc50 / bare50, 3), "overhead_ratio_p99": round(svc99 / bare99, 3),
        # Decision start minus the frame's emulator time: a model slower than the frame period picks up the
        # newest frame, which has waited on average half a period (8 ms at 60 fps) — part of service_p50_ms.
        "service_frame_age_p50_ms": round(service_summary.frame_age_p50_ms, 3),
        "service_stage_mean_ms": {k: round(v, 3) for k, v in service_summary.stage_mean_ms.items()},
        "stale_skipped": service_summary.stale_skipped,
        "activations": sum(c.activations for c in service_summary.conditions.values()),
        "cpu": platform.processor() or platform.machine(), "torch_threads": 1,
    }
    print(json.dumps(result))
    return result
