"""The one `neuroarcade` command. Each job's subcommands live in neuroarcade/commands/<area>.py,
which import nothing heavy at module level so that `neuroarcade --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from neuroarcade.commands import agents, bench, dashboard, deploy, encoding, game, product, study

app = typer.Typer(
    name="neuroarcade",
    help="Real-time closed-loop Atari gameplay with AI agents and fMRI encoding models, side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", envvar="NEUROARCADE_CONFIG", exists=True, dir_okay=False,
        help="Pipeline config (TOML): a table named after a command sets that command's option defaults; "
             "the tables under 'pipeline' describe the closed loop.",
    ),
) -> None:
    """neuroarcade: run `neuroarcade COMMAND --help` for each job."""
    from neuroarcade.config import ConfigError, check_command_tables, default_map, load_config

    ctx.obj = {"config": {}, "config_path": None}
    if config is not None:
        try:
            cfg = load_config(config)
            defaults = default_map(cfg)
            check_command_tables(defaults, ctx.command, ctx)
        except ConfigError as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
        ctx.obj = {"config": cfg, "config_path": config}
        ctx.default_map = {**(ctx.default_map or {}), **defaults}


for area in (game, agents, encoding, product, dashboard, deploy, study):
    area.register(app)
app.add_typer(bench.app, name="bench", help="Benchmarks: each prints ratios against a floor measured in the same run.")


if __name__ == "__main__":
    app()
