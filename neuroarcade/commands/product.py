"""Product commands: `demo` (the one-command tour)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    seconds: float = typer.Option(10.0, help="How long the closed loop runs."),
    game: str = typer.Option("ALE/Pong-v5", help="Gymnasium id of an ALE game."),
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the recording and outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Offline tour: the emulator in real time with a built-in controller, recorded, then verified."""
    from services.demo import run_builtin_demo

    summary = run_builtin_demo(game=game, seconds=seconds, out=out)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"neuroarcade demo — {game}, {seconds:.0f} s")
    for col in ("client", "role", "actions", "round trip p50 (ms)", "round trip p99 (ms)", "frames skipped"):
        table.add_column(col)
    for cid, c in summary["clients"].items():
        table.add_row(cid, c["role"], str(c["actions"]), _ms(c["rt_p50_ms"]), _ms(c["rt_p99_ms"]),
                      str(c.get("frames_skipped", "")))
    console = Console()
    console.print(table)
    console.print(f"emulator: {summary['steps']} steps, {summary['episodes']} episodes, "
                  f"{summary['rejected']} rejected messages; recording {summary['recording']} "
                  f"→ replay verify: {summary['replay_verified']}")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"
