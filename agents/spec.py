"""One description of an agent (:class:`AgentSpec`) and the one factory that builds it (:func:`build_agent`).

Every caller builds its agents here: the ``neuroarcade agent`` command, the closed loop's agent processes
(``pipelines.closed_loop``, the demo's session), offline extraction (``pipelines.batch``) and the RL
evaluation (``pipelines.evaluate_rl``). A spec is plain data (picklable into a spawned process); the
model is loaded by :func:`build_agent` in the process that will run it. Heavy imports (torch,
transformers, vLLM) stay inside :func:`build_agent`.

The agent a spec builds, innermost first::

    Recorder(RateLimiter(AddedLatency(FrameWindow(RLAgent | VLMAgent | RandomAgent)))), each wrapper only
    when its setting asks for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agents.vlm import POOLINGS

AGENT_KINDS = ("rl", "vlm", "random")
"""``rl``: Nature-CNN policy; ``vlm``: VLM/LAM; ``random``: uniformly random legal actions (the floor)."""
MODEL_KINDS = ("rl", "vlm")
"""Kinds with a model and activations (what ``neuroarcade agent`` and extraction run)."""


@dataclass(frozen=True)
class AgentSpec:
    """One agent: which model, how it is run, and how it joins a session."""

    agent_id: str
    """Client id of a live agent (``rl-0``); in extraction, the label in its file names (``rl``, ``qwen7b``)."""
    kind: str
    """One of :data:`AGENT_KINDS`."""
    role: str = "observer"
    """Live: ``controller`` (its actions step the game) or ``observer``."""
    model: str = ""
    """VLM: model directory or hub name; RL: checkpoint path ('' = the checkpoint shipped for ``game``,
    else a seeded random Nature-CNN; ``random`` = the random network regardless)."""
    algo: str = "ppo"
    """RL architecture without a checkpoint: ``ppo`` or ``dqn``."""
    game: str = ""
    """Gymnasium ALE id the agent plays ('' = unknown): picks the shipped RL checkpoint and is checked
    against a checkpoint's recorded game."""
    seed: int = 0
    """Seed of a random-initialised RL network and of its action draws; of the random policy."""
    torch_threads: int = 1
    """torch intra-op threads (1 for small models: 2 threads was 60× slower on 2-core boxes)."""
    rl_layers: tuple[str, ...] = ("penultimate",)
    """RL activations to publish: penultimate, conv1, conv2, conv3."""
    conditions: tuple[str, ...] = ("action",)
    """VLM prompt conditions (all run in one batched forward)."""
    prompts_file: str = ""
    """VLM: TOML/JSON file of extra prompt conditions ('' = built-ins only)."""
    layers: tuple[int, ...] | None = None
    """VLM hidden-state entries to publish (0 = embeddings; None = all)."""
    poolings: tuple[str, ...] = POOLINGS
    """VLM poolings to publish: ``last_token`` and/or ``mean_image``."""
    device: str = "cpu"
    """torch device of the VLM."""
    dtype: str = "float32"
    """VLM weights dtype (bfloat16 on GPU for 7B models)."""
    activation_dtype: str = "float16"
    """VLM activations on the wire: float16 or float32."""
    backend: str = "transformers"
    """VLM runtime: ``transformers`` or ``vllm`` (in the agent's process, or at ``vllm_url``)."""
    vllm_url: str = ""
    """vLLM: ``http://host:port`` of a ``vllm serve`` ('' = engine in the agent's process)."""
    vllm_transport: str = "shm"
    """vLLM remote: how activations come back, ``shm`` (same host) or ``rpc`` (over HTTP, any host)."""
    vllm_activations_dir: str = ""
    """vLLM remote + shm: directory shared with the server's worker ('' = the vLLM backend's default)."""
    frame_window: int = 1
    """Frames per decision (>1 wraps the agent in FrameWindow over ``window_s``)."""
    window_s: float = 1.5
    """Emulator seconds the frame window spans."""
    added_latency_s: float = 0.0
    """Extra sleep per decision (emulates a slower model)."""
    max_hz: float = 0.0
    """Decision-rate limit (0 = as fast as frames and the model allow)."""
    record_dir: str = ""
    """Directory to record decisions and activations into ('' = none)."""
    activations_endpoint: str = ""
    """Live: endpoint the agent's Activation PUB binds ('' = none)."""

    @property
    def starts_engine_process(self) -> bool:
        """An in-process vLLM engine runs its core in a child process (so the agent's may not be daemonic)."""
        return self.kind == "vlm" and self.backend == "vllm" and not self.vllm_url

    @staticmethod
    def parse(text: str, transport: str = "rpc", **settings) -> "AgentSpec":
        """``KIND``, ``KIND:MODEL``, ``LABEL=KIND:MODEL`` or ``…:MODEL@SERVER_URL`` (a ``vllm serve``).

        E.g. ``rl``, ``vlm:/models/tiny``, ``lam=vlm:/m/uitars``, ``vlm:Qwen/Qwen2.5-VL-7B-Instruct@http://vllm:8000``.
        ``transport``: with ``@SERVER``, how activations come back (``rpc`` or ``shm``). ``settings``: other
        fields; those that do not apply to the kind are reset, so they do not tell two equal agents apart.
        """
        label, sep, rest = text.partition("=")
        if not sep or "://" in label:
            label, rest = "", text
        kind, _, model = rest.partition(":")
        model, _, server = model.partition("@")
        if kind not in MODEL_KINDS:
            raise ValueError(f"agent {text!r}: kind must be one of {MODEL_KINDS}, not {kind!r}")
        if kind == "vlm" and not model:
            raise ValueError(f"agent {text!r}: a vlm agent needs a model (vlm:/path/or/hub-name)")
        label = label or kind
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise ValueError(f"agent label {label!r}: use letters, digits, '_', '-', '.'")
        if kind == "rl":  # prompt and VLM settings do not apply
            if server:
                raise ValueError(f"agent {text!r}: an rl agent runs in the task; @SERVER is for vlm agents")
            settings = {**settings, "conditions": (), "layers": None, "poolings": (), "device": "cpu"}
        else:
            settings = {**settings, "rl_layers": ()}
        return AgentSpec(agent_id=label, kind=kind, model=model, backend="vllm" if server else "transformers",
                         vllm_url=server, vllm_transport=transport if server else "rpc", **settings)


def build_agent(spec: AgentSpec):
    """Build the agent a spec names, in the process that will run it (loads the model).

    Raises ValueError for an unknown kind or setting, :class:`agents.rl.CheckpointError` for a checkpoint
    that cannot be used, and :class:`agents.vllm_backend.VllmUnavailable` when vLLM is asked for but missing.
    """
    from agents.base import AddedLatency, FrameWindow, RateLimiter, Recorder

    if spec.kind == "rl":
        from agents.rl import RLAgent, RLConfig

        agent = RLAgent(RLConfig(checkpoint=spec.model or None, algo=spec.algo, game=spec.game or None,
                                 activation_layers=tuple(spec.rl_layers), seed=spec.seed,
                                 torch_threads=spec.torch_threads))
    elif spec.kind == "vlm":
        from agents.vlm import VLMAgent, VLMConfig, build_backend

        cfg = VLMConfig(model=spec.model, conditions=list(spec.conditions), prompts_file=spec.prompts_file or None,
                        device=spec.device, dtype=spec.dtype, layers=None if spec.layers is None else list(spec.layers),
                        poolings=tuple(spec.poolings), activation_dtype=spec.activation_dtype,
                        torch_threads=spec.torch_threads)
        runtime = build_backend(cfg, spec.backend, vllm_url=spec.vllm_url or None, vllm_transport=spec.vllm_transport,
                                vllm_activations_dir=spec.vllm_activations_dir or None)
        try:
            agent = VLMAgent(cfg, runtime)
        except BaseException:
            getattr(runtime, "close", lambda: None)()  # an in-process vLLM engine must not outlive a bad config
            raise
    elif spec.kind == "random":
        from agents.rl import RandomAgent

        agent = RandomAgent(spec.seed)
    else:
        raise ValueError(f"unknown agent kind {spec.kind!r} (one of {', '.join(AGENT_KINDS)})")
    if spec.frame_window > 1:
        agent = FrameWindow(agent, k=spec.frame_window, span_s=spec.window_s)
    if spec.added_latency_s > 0:
        agent = AddedLatency(agent, spec.added_latency_s)
    if spec.max_hz > 0:
        agent = RateLimiter(agent, spec.max_hz)
    if spec.record_dir:
        agent = Recorder(agent, spec.record_dir)
    return agent
