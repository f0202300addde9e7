"""`neuroarcade agent`, `neuroarcade models build-tiny`, `neuroarcade train-rl`.

Heavy imports (torch, transformers, gymnasium) stay inside the command functions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import typer

from services.plumbing.transport import DEFAULT_ACTIVATIONS, DEFAULT_CONTROL, DEFAULT_FRAMES

models_app = typer.Typer(no_args_is_help=True, help="Local models: build an offline tiny VLM/LAM of any supported family.")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def agent(
    kind: str = typer.Option(..., help="rl or vlm."),
    model: str = typer.Option("", help="VLM: hub name, local dir (e.g. from `models build-tiny`) or preset "
                                       "(qwen2.5-vl-7b, internvl3-8b, ui-tars-7b-dpo, os-atlas-pro-7b)."),
    checkpoint: str = typer.Option("", help="RL: CleanRL .cleanrl_model or SB3 zip ('' = random Nature-CNN)."),
    algo: str = typer.Option("ppo", help="RL architecture without a checkpoint: ppo or dqn."),
    agent_id: str = typer.Option("", help="Client id (default: '<kind>-0')."),
    role: str = typer.Option("observer", help="controller or observer."),
    conditions: str = typer.Option("action", help="VLM prompt conditions, comma-separated (none,action,reasoning,…)."),
    prompts_file: Optional[str] = typer.Option(None, help="TOML/JSON file of extra prompt conditions."),
    layers: str = typer.Option("", help="VLM hidden-state layers to publish, comma-separated ('' = all)."),
    rl_layers: str = typer.Option("penultimate", help="RL activations: penultimate,conv1,conv2,conv3."),
    device: str = typer.Option("cpu", help="torch device."),
    dtype: str = typer.Option("float32", help="VLM weights dtype (bfloat16 on GPU for 7B models)."),
    backend: str = typer.Option("transformers", help="VLM runtime: transformers or vllm."),
    vllm_url: str = typer.Option("", help="vLLM: http://host:port of a `vllm serve` ('' = engine in this process)."),
    vllm_transport: str = typer.Option("shm", help="vLLM remote activations: shm (same host) or rpc (any host)."),
    vllm_activations_dir: str = typer.Option("", help="vLLM remote + shm: directory shared with the server's worker."),
    activation_dtype: str = typer.Option("float16", help="float16 or float32 activations on the wire."),
    frame_window: int = typer.Option(1, help="Frames per VLM decision (paper: 4)."),
    window_s: float = typer.Option(1.5, help="Seconds the frame window spans."),
    max_hz: float = typer.Option(0.0, help="Decision-rate limit (0 = as fast as frames and the model allow)."),
    record: str = typer.Option("", help="Directory to record decisions and activations into."),
    game: str = typer.Option("", help="Game the emulator runs (checks an RL checkpoint's recorded game)."),
    frames: str = typer.Option(DEFAULT_FRAMES, help="Emulator frame PUB endpoint."),
    control: str = typer.Option(DEFAULT_CONTROL, help="Emulator control ROUTER endpoint."),
    activations: str = typer.Option(DEFAULT_ACTIVATIONS, help="Endpoint our Activation PUB binds ('' = none)."),
    duration: Optional[float] = typer.Option(None, help="Seconds to run (default: until Ctrl-C)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port (127.0.0.1)."),
    log_json: bool = typer.Option(False, help="Structured logs: one JSON object per line."),
    curve_secret: str = typer.Option("", help="CURVE: our *.key_secret file (required off loopback)."),
    curve_allow: str = typer.Option("", help="CURVE: folder of *.key files allowed to subscribe to our activations."),
    curve_server_key: str = typer.Option("", help="CURVE: the emulator's *.key file, or a folder of HOST.key files."),
) -> None:
    """Run an RL or VLM/LAM agent against the emulator: act on the newest frame, publish activations."""
    import signal

    from services.plumbing.security import CurveConfig, SecurityError, preflight

    curve = CurveConfig(secret_key=curve_secret, allowed_clients=curve_allow, server_public_key=curve_server_key)
    try:  # before a model is loaded
        preflight(curve, binds=[activations], connects=[frames, control])
    except SecurityError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

    if log_json:
        from services.plumbing.metrics import setup_logging

        setup_logging(verbose=True, json_logs=True)

    from agents.families import ModelError
    from agents.spec import AgentSpec, build_agent
    from agents.vlm import BACKENDS
    from agents.vllm_backend import VllmUnavailable
    from services.agent import AgentService, AgentServiceConfig

    if kind not in ("rl", "vlm"):
        raise typer.BadParameter("--kind must be rl or vlm")
    if kind == "vlm":
        if not model:
            raise typer.BadParameter("--model is required for --kind vlm")
        if backend not in BACKENDS:
            raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}")
        if vllm_transport not in ("shm", "rpc"):
            raise typer.BadParameter("--vllm-transport must be shm or rpc")
    spec = AgentSpec(agent_id or f"{kind}-0", kind, role=role, model=checkpoint if kind == "rl" else model, algo=algo,
                     game=game, rl_layers=tuple(_csv(rl_layers)), conditions=tuple(_csv(conditions)),
                     prompts_file=prompts_file or "", layers=tuple(int(x) for x in _csv(layers)) or None,
                     device=device, dtype=dtype, activation_dtype=activation_dtype, backend=backend,
                     vllm_url=vllm_url, vllm_transport=vllm_transport, vllm_activations_dir=vllm_activations_dir,
                     frame_window=frame_window if kind == "vlm" else 1, window_s=window_s, max_hz=max_hz,
                     record_dir=record, activations_endpoint=activations)
    try:
        built = build_agent(spec)
    except (VllmUnavailable, ModelError) as err:  # a missing vLLM install, a model we cannot run: one line
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    service = AgentService(built, AgentServiceConfig(
        agent_id=spec.agent_id, role=spec.role, frames_endpoint=frames, control_endpoint=control,
        activations_endpoint=spec.activations_endpoint or None, duration_s=duration, metrics_port=metrics_port,
        curve=curve))
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    try:
        summary = service.run()
    finally:
        if hasattr(built, "close"):
            built.close()
    if as_json:
        print(json.dumps(asdict(summary)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.agent_id} ({summary.model}, {summary.role})")
    for col in ("condition", "decisions", "latency p50 ms", "latency p99 ms", "activations"):
        table.add_column(col)
    for cond, c in summary.conditions.items():
        table.add_row(cond or "-", str(c.decisions), f"{c.latency_p50_ms:.1f}", f"{c.latency_p99_ms:.1f}",
                      str(c.activations))
    console = Console()
    console.print(table)
    console.print(f"stale frames skipped {summary.stale_skipped}, rejoins {summary.rejoins}, "
                  f"errors {len(summary.errors)}")


@models_app.command("build-tiny")
def build_tiny_cmd(
    out_dir: str = typer.Argument(..., help="Directory to write the model into."),
    family: str = typer.Option("", help="Model family: qwen2_5_vl, qwen2_vl, internvl, llava_onevision, idefics3, "
                                        "gemma3 (transformers model_type names)."),
    variant: str = typer.Option("vlm", help="Alias kept for old scripts: vlm (= qwen2_5_vl) or lam (= qwen2_vl, "
                                            "stands in for UI-TARS/OS-Atlas); --family wins."),
    seed: int = typer.Option(0, help="Weight seed (same seed → identical files)."),
) -> None:
    """Build a tiny random-weight VLM offline that loads like a hub checkpoint of its family."""
    from agents.tiny import TinyConfig, build_tiny, resolve_family

    try:
        name = resolve_family(family or variant)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    path = build_tiny(out_dir, name, TinyConfig(seed=seed))
    print(path)


def train_rl(
    game: str = typer.Option("ALE/Breakout-v5", help="Gymnasium ALE id."),
    frames: int = typer.Option(10_000_000, help="Emulator frames to train for (agent steps × 4, all envs)."),
    out: str = typer.Option(..., help="Checkpoint path (X.cleanrl_model; X.json, X.log.jsonl, X.state.pt beside it)."),
    num_envs: int = typer.Option(8, help="Parallel games in ale-py's vector env."),
    seed: int = typer.Option(1),
    sticky: float = typer.Option(0.25, help="Sticky-action probability (the emulator's default)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="Precision (default: bf16 where the hardware has it)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(0, help="torch threads (0: one per core)."),
    checkpoint_every: int = typer.Option(20, help="Iterations between resumable state files."),
    init: Optional[str] = typer.Option(None, help="Warm start from this checkpoint's weights (new optimiser and schedule)."),
    export: bool = typer.Option(False, help="Write OUT from OUT.state.pt now (a run stopped early) and exit."),
) -> None:
    """Train a Nature-CNN PPO agent (CleanRL's Atari recipe on ale-py's vector env); rerun to resume after a kill."""
    import shlex
    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from agents.train_rl import TrainConfig, export_state, train

    if export:
        try:
            summary = export_state(out)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--out") from None
        print(json.dumps({k: v for k, v in asdict(summary).items() if k != "config"}))
        return

    cfg = TrainConfig(game=game, frames=frames, num_envs=num_envs, seed=seed, sticky=sticky, bf16=bf16,
                      device=device, torch_threads=threads, checkpoint_every=checkpoint_every,
                      init=init)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(f"PPO {game}", total=cfg.iterations, status="")

        def show(p) -> None:
            ret = "–" if p.episode_return is None else f"{p.episode_return:.1f}"
            bar.update(task, completed=p.iteration,
                       status=f"{p.frames / 1e6:.2f}M frames · {p.frames_per_s:.0f} frames/s · return {ret}")

        try:
            summary = train(cfg, out, progress=show, command=shlex.join(["neuroarcade", *sys.argv[1:]]))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    print(json.dumps({k: v for k, v in asdict(summary).items() if k != "config"}))


def eval_rl(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint (default: the one shipped for --game)."),
    game: str = typer.Option("ALE/Breakout-v5", help="Gymnasium ALE id."),
    episodes: int = typer.Option(5, min=1, help="Whole games (every life) for the agent and for the random floor."),
    sticky: float = typer.Option(0.25, help="Sticky-action probability (0.25: v5 default; 0: deterministic)."),
    seed: int = typer.Option(0, help="Game i is seeded seed + i."),
    path: str = typer.Option("headless", help="headless (the emulator's game core + the agent) or service "
                                              "(emulator + agent service over loopback ZeroMQ)."),
    card: bool = typer.Option(False, help="Record this evaluation in the checkpoint's sidecar and model card."),
    curve: Optional[str] = typer.Option(None, help="With --card: also plot the training log into this PNG."),
) -> None:
    """Play whole games with an RL checkpoint and with a random policy on the same seeds; JSON last."""
    from rich.console import Console

    from agents.rl import CheckpointError
    from pipelines.evaluate_rl import EvalConfig, evaluate

    console = Console(stderr=True)
    try:
        summary = evaluate(EvalConfig(game=game, checkpoint=checkpoint, episodes=episodes, sticky=sticky, seed=seed,
                                      path=path), progress=console.print)
    except (CheckpointError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    console.print(f"{summary.checkpoint}: {summary.mean_return:.1f} ± {summary.std_return:.1f} over "
                  f"{summary.episodes} games (random {summary.random_mean_return:.1f} ± {summary.random_std_return:.1f}), "
                  f"sticky {sticky}, {path}")
    if card:
        import shlex
        import sys

        from pipelines.evaluate_rl import plot_training_curve, record_in_card

        png = plot_training_curve(summary.checkpoint, curve, f"PPO {game}") if curve else None
        console.print(f"model card: {record_in_card(summary, shlex.join(['neuroarcade', *sys.argv[1:]]), png)}")
    print(json.dumps(asdict(summary)))


def register(app: typer.Typer) -> None:
    app.command("agent")(agent)
    app.command("train-rl")(train_rl)
    app.command("eval-rl")(eval_rl)
    app.add_typer(models_app, name="models")
