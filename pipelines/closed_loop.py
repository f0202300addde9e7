"""Closed-loop run on loopback: the emulator plus an RL agent plus a tiny-VLM agent.

The emulator runs in a thread of this process; every agent runs in its own spawned process
(one small model per process, 1 torch thread), so a slow model never holds the GIL of the
emulator or of another agent. ``run_closed_loop`` is a self-contained loop (a live game, a temporary
recording, no participant) that returns one summary dict: per agent and prompt condition
``decisions``, ``latency_p50_ms``, ``latency_p99_ms``, ``activations``, ``stale_skipped``. It is not
the demo's loop: ``neuroarcade demo`` and ``replay-session`` replay a participant's run through
``pipelines.session.ClosedLoop``, which starts the same :class:`AgentProcesses`.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.plumbing.transport import free_tcp_endpoint


@dataclass
class AgentSpec:
    """One agent process of a closed loop."""

    agent_id: str
    kind: str
    """``rl`` or ``vlm``."""
    role: str = "observer"
    model: str = ""
    """VLM: model dir/hub name; RL: checkpoint path ('' = random Nature-CNN)."""
    conditions: list[str] = field(default_factory=lambda: ["action"])
    """VLM prompt conditions (all run in one batched forward)."""
    frame_window: int = 1
    """Frames per decision (VLM; >1 wraps the agent in FrameWindow over window_s)."""
    window_s: float = 1.5
    added_latency_s: float = 0.0
    """Extra sleep per decision (emulates a slower model)."""
    activations_endpoint: str = ""
    backend: str = "transformers"
    """VLM runtime: ``transformers`` or ``vllm`` (in the agent's process, or at ``vllm_url``)."""
    vllm_url: str = ""
    """vLLM: ``http://host:port`` of a ``vllm serve`` ('' = engine in the agent's process)."""

    @property
    def starts_engine_process(self) -> bool:
        """An in-process vLLM engine runs its core in a child process (so the agent's may not be daemonic)."""
        return self.kind == "vlm" and self.backend == "vllm" and not self.vllm_url


def build_agent(spec: AgentSpec, game: str):
    """Build the agent a spec names (in the process that will run it)."""
    from agents.base import AddedLatency, FrameWindow

    if spec.kind == "rl":
        from agents.rl import RLAgent, RLConfig

        agent = RLAgent(RLConfig(checkpoint=spec.model or None, game=game))
    elif spec.kind == "vlm":
        from agents.vlm import VLMAgent, VLMConfig, build_backend

        cfg = VLMConfig(model=spec.model, conditions=list(spec.conditions))
        agent = VLMAgent(cfg, build_backend(cfg, spec.backend, vllm_url=spec.vllm_url or None))
        if spec.frame_window > 1:
            agent = FrameWindow(agent, k=spec.frame_window, span_s=spec.window_s)
    else:
        raise ValueError(f"unknown agent kind {spec.kind!r} (rl or vlm)")
    if spec.added_latency_s > 0:
        agent = AddedLatency(agent, spec.added_latency_s)
    return agent


def _agent_process(spec: AgentSpec, game: str, frames: str, control: str, ready, stop, results) -> None:
    from services.agent import AgentService, AgentServiceConfig

    agent = None
    try:
        agent = build_agent(spec, game)
        service = AgentService(agent, AgentServiceConfig(
            agent_id=spec.agent_id, role=spec.role, frames_endpoint=frames, control_endpoint=control,
            activations_endpoint=spec.activations_endpoint or None))
        threading.Thread(target=lambda: (stop.wait(), service.stop()), daemon=True).start()
        threading.Thread(target=lambda: (service.ready.wait(), ready.set()), daemon=True).start()
        results.put((spec.agent_id, service.run()))
    except Exception as err:  # report instead of dying silently
        ready.set()
        results.put((spec.agent_id, {"error": f"{type(err).__name__}: {err}"}))
    finally:
        if agent is not None and hasattr(agent, "close"):
            agent.close()  # shuts an in-process vLLM engine down


class AgentProcesses:
    """Agent services, each in its own spawned process (a model per process, 1 torch thread), so a slow
    model never holds the GIL of the emulator or of another agent. Started on construction."""

    def __init__(self, specs: list[AgentSpec], game: str, frames: str, control: str):
        ctx = mp.get_context("spawn")
        self.specs = specs
        self._stop, self._results = ctx.Event(), ctx.Queue()
        self._readies = [ctx.Event() for _ in specs]  # referenced until the children have unpickled them
        self._procs = []
        for spec, ready in zip(specs, self._readies):
            proc = ctx.Process(target=_agent_process, args=(spec, game, frames, control, ready, self._stop,
                                                            self._results),
                               name=spec.agent_id, daemon=not spec.starts_engine_process)
            proc.start()
            self._procs.append(proc)

    def wait_ready(self, timeout_s: float) -> None:
        t_end = time.monotonic() + timeout_s
        for ready in self._readies:
            ready.wait(max(0.0, t_end - time.monotonic()))

    def stop(self) -> dict[str, dict]:
        """Stop every service; return each agent's summary (an ``error`` entry for a process that died)."""
        self._stop.set()
        summaries = {}
        for _ in self._procs:
            try:
                agent_id, summary = self._results.get(timeout=30)
                summaries[agent_id] = summary
            except Exception:
                break
        for proc, spec in zip(self._procs, self.specs):
            proc.join(60 if spec.starts_engine_process else 10)  # vLLM shuts its engine core down first
            if proc.is_alive():
                proc.terminate()
        return summaries


def run_closed_loop(duration_s: float = 20.0, game: str = "ALE/Pong-v5", model_dir: str | None = None,
                    agents: list[AgentSpec] | None = None, startup_timeout_s: float = 120.0,
                    min_actions: int = 0, min_actions_timeout_s: float = 300.0) -> dict:
    """Start emulator + agents on loopback, run ``duration_s`` once all agents joined, return the summary.

    ``min_actions``: then keep running until the emulator accepted at least this many actions from every
    agent (at most ``min_actions_timeout_s`` more): a count to wait on, where a loaded machine can make a
    model's first decisions take longer than ``duration_s``.

    Without ``agents``: an RL controller (random Nature-CNN PPO unless a checkpoint is given) and a
    tiny-VLM observer with conditions ``action`` and ``reasoning`` (built into a temp dir when
    ``model_dir`` is None).
    """
    from services.emulator import Emulator, EmulatorConfig
    from services.plumbing.game import GameSettings

    with tempfile.TemporaryDirectory(prefix="neuroarcade-loop-") as tmp:
        if agents is None:
            if model_dir is None:
                from agents.tiny import build_tiny

                model_dir = str(build_tiny(Path(tmp) / "tiny-vlm", "vlm"))
            agents = [AgentSpec("rl-0", "rl", role="controller"),
                      AgentSpec("vlm-0", "vlm", model=model_dir, conditions=["action", "reasoning"])]
        for spec in agents:
            spec.activations_endpoint = spec.activations_endpoint or free_tcp_endpoint()
        frames, control = free_tcp_endpoint(), free_tcp_endpoint()
        emulator = Emulator(EmulatorConfig(game=GameSettings(game=game), frames_endpoint=frames,
                                           control_endpoint=control, record_path=str(Path(tmp) / "loop.narec")))
        emu_result: dict = {}
        emu_thread = threading.Thread(target=lambda: emu_result.update(summary=emulator.run()), daemon=True)
        emu_thread.start()
        emulator.ready.wait(30)
        pool = AgentProcesses(agents, game, frames, control)
        pool.wait_ready(startup_timeout_s)
        steps_at_start = emulator.steps
        t0 = time.monotonic()
        time.sleep(duration_s)
        deadline = time.monotonic() + min_actions_timeout_s
        while min_actions and time.monotonic() < deadline and not all(
                _accepted_actions(emulator).get(spec.agent_id, 0) >= min_actions for spec in agents):
            time.sleep(0.05)
        run_s = time.monotonic() - t0
        steps_in_run = emulator.steps - steps_at_start
        summaries = pool.stop()
        emulator.stop()
        emu_thread.join(10)
        emu = emu_result.get("summary")
    return _report(agents, summaries, run_s, steps_in_run, game, emu)


def _accepted_actions(emulator) -> dict[str, int]:
    """client_id → actions accepted, read from the emulator thread's table (retried on a concurrent change)."""
    for _ in range(10):
        try:
            return {c.client_id: c.actions for c in list(emulator.clients.values())}
        except RuntimeError:  # the table changed size while it was copied
            time.sleep(0.001)
    return {}


def _report(agents: list[AgentSpec], summaries: dict, run_s: float, steps: int, game: str, emu) -> dict:
    entries = []
    for spec in agents:
        s = summaries.get(spec.agent_id, {"error": "no summary (agent process died)"})
        if "error" in s:
            entries.append({"agent_id": spec.agent_id, "kind": spec.kind, "condition": "", "error": s["error"],
                            "decisions": 0, "latency_p50_ms": 0.0, "latency_p99_ms": 0.0, "activations": 0,
                            "stale_skipped": 0})
            continue
        for cond, c in s["conditions"].items():
            entries.append({"agent_id": spec.agent_id, "kind": spec.kind, "model": s["model"], "role": s["role"],
                            "condition": cond, **c, "stale_skipped": s["stale_skipped"],
                            "frame_age_max_ms": s["frame_age_max_ms"], "errors": s["errors_total"]})
    return {
        "game": game, "duration_s": round(run_s, 3),
        "emulator": {"steps": steps, "steps_per_s": round(steps / run_s, 2) if run_s else 0.0,
                     "frames_published": getattr(emu, "frames_published", None)},
        "agents": entries,
        "specs": [asdict(a) for a in agents],
    }
