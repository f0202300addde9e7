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
