"""`neuroarcade bench …`: each benchmark lives in benchmarks/<name>.py with a ``main(**opts)``
that prints a table and, last, one JSON line of figures and ratios."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def transport(
    frames: int = typer.Option(3000, help="Round trips to time (after warm-up)."),
    publish_seconds: float = typer.Option(3.0, help="Seconds for each publish-rate measurement."),
    game: str = typer.Option("ALE/Pong-v5", help="Game for the publish-rate comparison."),
) -> None:
    """Frame→action round trip through our protocol vs raw pyzmq; emulator publish rate vs raw ALE."""
    from benchmarks.transport import main

    main(frames=frames, publish_seconds=publish_seconds, game=game)


@app.command()
def agent(
    model: str = typer.Option("", help="VLM dir or hub name ('' = build the tiny Qwen2.5-VL in a temp dir)."),
    seconds: float = typer.Option(20.0, help="Seconds the agent service runs against the emulator."),
    conditions: str = typer.Option("action", help="Prompt conditions, comma-separated (batched in one forward)."),
    game: str = typer.Option("ALE/Pong-v5", help="Game."),
) -> None:
    """Decision latency through the agent service vs the bare model forward + scoring, same frames."""
    from benchmarks.agent import main

    main(model=model or None, seconds=seconds, conditions=conditions, game=game)


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
