"""The one `neuroarcade` command. Each job's subcommands live in neuroarcade/commands/<area>.py,
which import nothing heavy at module level so that `neuroarcade --help` stays instant."""

from __future__ import annotations

import typer

from neuroarcade.commands import agents, bench, encoding, game, product

app = typer.Typer(
    name="neuroarcade",
    help="Real-time closed-loop Atari gameplay with AI agents and fMRI encoding models, side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for area in (game, agents, encoding, product):
    area.register(app)
app.add_typer(bench.app, name="bench", help="Benchmarks: each prints ratios against a floor measured in the same run.")


if __name__ == "__main__":
    app()
