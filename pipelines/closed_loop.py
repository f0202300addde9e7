"""Emulator + agents on loopback: the one runner of a live game with agent processes.

The emulator runs in a thread of this process; every agent runs in its own spawned process
(one small model per process, 1 torch thread, built by :func:`agents.spec.build_agent`), so a slow
model never holds the GIL of the emulator or of another agent. :func:`run_closed_loop` runs a live
game (real time or lockstep, a recording that can be kept, no participant) and returns one JSON-ready
summary dict: per agent and prompt condition ``decisions``, ``latency_p50_ms``, ``latency_p99_ms``,
``activations``, ``stale_skipped``. ``neuroarcade eval-rl --path service`` plays its games through it
(lockstep, the RL agent as controller, returns read from the kept recording). ``neuroarcade demo`` and
``replay-session`` replay a participant's run through ``pipelines.session.ClosedLoop`` instead (replay,
BOLD and encoders too), which starts the same :class:`AgentProcesses`.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from agents.spec import AgentSpec, build_agent
from services.agent import AgentFailure, AgentSummary
from services.emulator import EmulatorConfig
from services.plumbing.game import GameSettings
from services.plumbing.transport import free_tcp_endpoint


def _agent_process(spec: AgentSpec, game: str, frames: str, control: str, ready, stop, results) -> None:
    from services.agent import AgentService, AgentServiceConfig

    agent = None
    try:
        agent = build_agent(replace(spec, game=spec.game or game))
        service = AgentService(agent, AgentServiceConfig(
            agent_id=spec.agent_id, role=spec.role, frames_endpoint=frames, control_endpoint=control,
            activations_endpoint=spec.activations_endpoint or None))
        threading.Thread(target=lambda: (stop.wait(), service.stop()), daemon=True).start()
        threading.Thread(target=lambda: (service.ready.wait(), ready.set()), daemon=True).start()
        results.put((spec.agent_id, service.run()))
    except Exception as err:  # report instead of dying silently
        ready.set()
        results.put((spec.agent_id, AgentFailure(spec.agent_id, f"{type(err).__name__}: {err}")))
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

    def stop(self) -> dict[str, AgentSummary | AgentFailure]:
        """Stop every service; return each reporting agent's summary, or its failure (a process that raised).

        A process that died without reporting is absent (:func:`summarize_loop` reports it as failed)."""
        self._stop.set()
        summaries: dict[str, AgentSummary | AgentFailure] = {}
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


@dataclass
class LoopConfig:
    """One emulator + agents run on loopback (:func:`run_closed_loop`)."""

    emulator: EmulatorConfig = field(default_factory=lambda: EmulatorConfig(game=GameSettings("ALE/Pong-v5")))
    """Game (seed, sticky actions), mode (``realtime`` or ``lockstep``) and the emulator's own limits
    (``max_episodes``, ``max_steps``); its endpoints are set by the run, its recording goes to ``record_path``."""
    agents: list[AgentSpec] | None = None
    """The agents, each in its own spawned process. None: an RL controller (the game's shipped checkpoint,
    else a random Nature-CNN PPO) and a tiny-VLM observer with conditions ``action`` and ``reasoning``."""
    model_dir: str | None = None
    """VLM of the default agents (None: a tiny Qwen2.5-VL built into a temporary folder)."""
    duration_s: float | None = 20.0
    """Seconds to run once every agent joined; None: until the emulator stops by itself (its limits)."""
    min_actions: int = 0
    """Then keep running until the emulator accepted at least this many actions from every agent: a count
    to wait on, where a loaded machine can make a model's first decisions take longer than ``duration_s``."""
    min_actions_timeout_s: float = 300.0
    """At most this much longer for ``min_actions``."""
    startup_timeout_s: float = 120.0
    """How long to wait for the agents to join."""
    publish_activations: bool = True
    """Give every agent without an activations endpoint one (its activations are counted in the summary)."""
    record_path: str = ""
    """Keep the session's recording here ('' = a temporary file, removed after the run)."""


def run_closed_loop(cfg: LoopConfig | None = None) -> dict:
    """Start the emulator (a thread) and the agents (a spawned process each) on loopback, run, return the summary.

    Runs ``cfg.duration_s`` once all agents joined (then up to ``min_actions``), or until the emulator stops
    by itself. Summary: ``game``, ``duration_s``, ``emulator`` (``steps``, ``steps_per_s``,
    ``frames_published``), ``agents`` (one entry per agent and prompt condition: ``decisions``,
    ``latency_p50_ms``, ``latency_p99_ms``, ``activations``, ``stale_skipped`` …) and ``specs``.
    Raises RuntimeError when the emulator does not start.
    """
    from services.emulator import Emulator

    cfg = cfg or LoopConfig()
    game = cfg.emulator.game.game
    with tempfile.TemporaryDirectory(prefix="neuroarcade-loop-") as tmp:
        agents = cfg.agents
        if agents is None:
            model_dir = cfg.model_dir
            if model_dir is None:
                from agents.tiny import build_tiny

                model_dir = str(build_tiny(Path(tmp) / "tiny-vlm", "vlm"))
            agents = [AgentSpec("rl-0", "rl", role="controller"),
                      AgentSpec("vlm-0", "vlm", model=model_dir, conditions=("action", "reasoning"))]
        if cfg.publish_activations:
            agents = [replace(spec, activations_endpoint=spec.activations_endpoint or free_tcp_endpoint())
                      for spec in agents]
        frames, control = free_tcp_endpoint(), free_tcp_endpoint()
        emulator = Emulator(replace(cfg.emulator, frames_endpoint=frames, control_endpoint=control,
                                    record_path=cfg.record_path or str(Path(tmp) / "loop.narec")))
        emu_result: dict = {}
        emu_thread = threading.Thread(target=lambda: emu_result.update(summary=emulator.run()), name="emulator",
                                      daemon=True)
        emu_thread.start()
        if not emulator.ready.wait(30):
            emulator.stop()
            raise RuntimeError("emulator did not start")
        pool = AgentProcesses(agents, game, frames, control)
        pool.wait_ready(cfg.startup_timeout_s)
        steps_at_start = emulator.steps
        t0 = time.monotonic()
        if cfg.duration_s is None:
            emu_thread.join()
        else:
            time.sleep(cfg.duration_s)
        deadline = time.monotonic() + cfg.min_actions_timeout_s
        while cfg.min_actions and emu_thread.is_alive() and time.monotonic() < deadline and not all(
                _accepted_actions(emulator).get(spec.agent_id, 0) >= cfg.min_actions for spec in agents):
            time.sleep(0.05)
        run_s = time.monotonic() - t0
        steps_in_run = emulator.steps - steps_at_start
        summaries = pool.stop()
        emulator.stop()
        emu_thread.join(10)
        emu = emu_result.get("summary")
    return summarize_loop(agents, summaries, run_s, steps_in_run, game, emu)


def _accepted_actions(emulator) -> dict[str, int]:
    """client_id → actions accepted, read from the emulator thread's table (retried on a concurrent change)."""
    for _ in range(10):
        try:
            return {c.client_id: c.actions for c in list(emulator.clients.values())}
        except RuntimeError:  # the table changed size while it was copied
            time.sleep(0.001)
    return {}


def summarize_loop(agents: list[AgentSpec], summaries: dict[str, AgentSummary | AgentFailure], run_s: float,
                   steps: int, game: str, emu) -> dict:
    """The closed loop's summary (JSON-ready): one entry per agent and prompt condition (decisions, latency,
    activations); an agent that failed or never reported gets one entry with its ``error``."""
    entries = []
    for spec in agents:
        s = summaries.get(spec.agent_id) or AgentFailure(spec.agent_id, "no summary (agent process died)")
        if isinstance(s, AgentFailure):
            entries.append({"agent_id": spec.agent_id, "kind": spec.kind, "condition": "", "error": s.error,
                            "decisions": 0, "latency_p50_ms": 0.0, "latency_p99_ms": 0.0, "activations": 0,
                            "stale_skipped": 0})
            continue
        for cond, c in s.conditions.items():
            entries.append({"agent_id": spec.agent_id, "kind": spec.kind, "model": s.model, "role": s.role,
                            "condition": cond, **asdict(c), "stale_skipped": s.stale_skipped,
                            "frame_age_max_ms": s.frame_age_max_ms, "errors": s.errors_total})
    return {
        "game": game, "duration_s": round(run_s, 3),
        "emulator": {"steps": steps, "steps_per_s": round(steps / run_s, 2) if run_s else 0.0,
                     "frames_published": getattr(emu, "frames_published", None)},
        "agents": entries,
        "specs": [asdict(a) for a in agents],
    }
