"""`neuroarcade bench …`: each benchmark lives in benchmarks/<name>.py with a ``main(**opts)``
that prints a table and, last, one JSON line of figures and ratios."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def transport(
    frames: int = typer.Option(5000, help="Round trips to time, each of ours and raw (after warm-up)."),
    publish_seconds: float = typer.Option(6.0, help="Seconds for each side of the publish-rate comparison."),
    publish_rounds: int = typer.Option(20, help="Alternating rounds the publish seconds are split into."),
    game: str = typer.Option("ALE/Pong-v5", help="Game for the publish-rate comparison."),
) -> None:
    """Frame→action round trip through our protocol vs raw pyzmq; emulator publish rate vs raw ALE."""
    from benchmarks.transport import main

    main(frames=frames, publish_seconds=publish_seconds, game=game, publish_rounds=publish_rounds)


@app.command()
def agent(
    model: str = typer.Option("", help="VLM dir or hub name ('' = build the tiny Qwen2.5-VL in a temp dir)."),
    seconds: float = typer.Option(20.0, help="Seconds the agent service runs against the emulator."),
    conditions: str = typer.Option("action", help="Prompt conditions, comma-separated (batched in one forward)."),
    game: str = typer.Option("ALE/Pong-v5", help="Game."),
    backend: str = typer.Option("transformers", help="VLM runtime: transformers or vllm (run it in .venv-vllm on CPU)."),
    vllm_url: str = typer.Option("", help="vLLM: http://host:port of a `vllm serve` ('' = engine in the agent process)."),
) -> None:
    """Decision latency through the agent service vs the bare model forward + scoring, same frames."""
    from agents.vlm import BACKENDS

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from agents.vllm_backend import VllmUnavailable, require_vllm

        try:
            require_vllm(remote=bool(vllm_url))
        except VllmUnavailable as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
    from agents.families import ModelError
    from benchmarks.agent import main

    try:
        main(model=model or None, seconds=seconds, conditions=conditions, game=game, backend=backend,
             vllm_url=vllm_url or None)
    except ModelError as err:  # a model the agent cannot run: one line, no traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def encode(
    predict_features: int = typer.Option(1024, help="Raw feature dim of the predict test (× 4 delays)."),
    predict_voxels: int = typer.Option(50_000, help="Voxels of the predict test."),
    predict_trs: int = typer.Option(30, help="TRs timed (after 3 warm-up TRs)."),
    fit_runs: int = typer.Option(4, help="Runs of the fit test (leave-one-run-out)."),
    fit_trs: int = typer.Option(250, help="TRs per run of the fit test."),
    fit_features: int = typer.Option(128, help="Raw feature dim of the fit test (× 4 delays)."),
    fit_voxels: int = typer.Option(10_000, help="Voxels of the fit test."),
    repeats: int = typer.Option(3, help="Fit repetitions (best kept; who goes first alternates)."),
    threads: int = typer.Option(1, help="BLAS threads for both fits."),
    backend: str = typer.Option("numpy", help="numpy (CPU) or torch_cuda (GPU fit and per-TR product)."),
) -> None:
    """Per-TR streaming prediction vs bare x @ W; our fit vs a direct himalaya RidgeCV on the same data."""
    from benchmarks.encode import main

    main(predict_features=predict_features, predict_voxels=predict_voxels, predict_trs=predict_trs,
         fit_runs=fit_runs, fit_trs=fit_trs, fit_features=fit_features, fit_voxels=fit_voxels, repeats=repeats,
         threads=threads, backend=backend)


@app.command()
def e2e(
    seconds: float = typer.Option(10.0, help="Measured seconds of the main run (RL controller + tiny VLM + encoder)."),
    fps: float = typer.Option(15.0, help="Emulator frame rate of the main run and of the agents curve."),
    point_seconds: float = typer.Option(3.0, help="Measured seconds of each scaling point."),
    agents_curve: str = typer.Option("1,2,4,8", help="RL agent counts of the scaling curve ('' = skip)."),
    fps_curve: str = typer.Option("15,30,60", help="Frame rates of the scaling curve, one RL agent ('' = skip)."),
    vlm: bool = typer.Option(True, help="Run the tiny VLM observer in the main run."),
    tr_s: float = typer.Option(0.5, help="Simulated scanner TR (time-compressed), seconds."),
    grace_s: float = typer.Option(0.3, help="Encoder grace after trigger t+1 before TR t closes."),
    game: str = typer.Option("ALE/Pong-v5", help="Game."),
    out_dir: str = typer.Option("benchmarks/results", help="Results go to <out_dir>/<timestamp>/."),
) -> None:
    """Per-stage latency frame→agent→action/activation→encoder and TR→prediction→score; scaling curves."""
    from benchmarks.e2e import main

    main(seconds=seconds, fps=fps, point_seconds=point_seconds, agents_curve=agents_curve, fps_curve=fps_curve,
         vlm=vlm, tr_s=tr_s, grace_s=grace_s, game=game, out_dir=out_dir)


@app.command()
def train(
    game: str = typer.Option("ALE/Breakout-v5", help="Game both loops train on."),
    rounds: int = typer.Option(3, help="Alternating rounds (floor, ours)."),
    iterations: int = typer.Option(5, help="PPO iterations (8 envs × 128 steps each) per side and round."),
) -> None:
    """`train-rl` throughput vs a bare CleanRL-style PPO loop, same env, network and settings."""
    from benchmarks.train import main

    main(game=game, rounds=rounds, iterations=iterations)


@app.command()
def preprocess(
    volumes: int = typer.Option(200, help="Volumes of the EPI run (the causal GLM's cost grows with the run)."),
    shape: str = typer.Option("64,64,36", help="Voxel grid of the EPI run."),
    voxel_mm: str = typer.Option("3,3,3.5", help="Voxel size of the EPI run, mm."),
    large_volumes: int = typer.Option(60, help="Volumes of the whole-brain run (0 = skip it)."),
    large_shape: str = typer.Option("97,115,97", help="Voxel grid of the whole-brain run (MNI 2 mm)."),
    large_voxel_mm: str = typer.Option("2,2,2", help="Voxel size of the whole-brain run, mm."),
    order: int = typer.Option(1, help="Spline order of our reslice and of the bare one."),
) -> None:
    """Per-volume preprocessing (realign + reslice + causal GLM + standardisation) vs one bare scipy reslice."""
    from benchmarks.preprocess import main

    main(volumes=volumes, shape=shape, voxel_mm=voxel_mm, large_volumes=large_volumes, large_shape=large_shape,
         large_voxel_mm=large_voxel_mm, order=order)


@app.command()
def study(
    subjects: int = typer.Option(3, help="Subjects of the synthetic study (recorded and extracted once, untimed)."),
    runs: int = typer.Option(3, help="Runs per subject."),
    trs: int = typer.Option(24, help="Volumes per run (TR 1 s)."),
    num_cpus: int = typer.Option(2, help="Ray CPUs, and the threads of the sequential run's fits."),
    keep: str = typer.Option("", help="Keep the dataset and both runs in this folder ('' = a temp folder)."),
) -> None:
    """A small study on local Ray vs the same tasks sequentially in one process (same total threads)."""
    from benchmarks.study import main

    main(subjects=subjects, runs=runs, trs=trs, num_cpus=num_cpus, keep=keep)
