"""Pipeline config files (TOML): one file keeps and shares a lab's whole setup.

Two kinds of tables, in one file:

- **Command defaults** — a table named after a command sets its options' defaults, with the
  option names as the command's ``--help`` shows them, underscores or dashes alike:
  ``[emulator] game = "ALE/Breakout-v5"``; sub-commands nest: ``[bench.transport] frames = 500``.
  Options given on the command line still win.
- **The pipeline** — tables under ``[pipeline]``: ``[pipeline.game]``, ``[[pipeline.agents]]``,
  ``[pipeline.scanner]``, ``[pipeline.encoder]``, ``[pipeline.dashboard]``, ``[pipeline.outputs]``
  describe the closed loop that ``demo``, ``live`` and ``replay-session`` run.

A command table naming no command, or a key naming no option of its command, is an error: a typo
in a shared setup must not pass silently.

Every command takes it: ``neuroarcade --config lab.toml <command> …``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

PIPELINE = "pipeline"


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None


def default_map(config: dict[str, Any]) -> dict[str, Any]:
    """Click ``default_map`` from the command tables (pipeline tables are left out)."""

    def norm(table: dict[str, Any]) -> dict[str, Any]:
        return {k.replace("-", "_") if not isinstance(v, dict) else k: (norm(v) if isinstance(v, dict) else v)
                for k, v in table.items()}

    return {name: norm(table) for name, table in config.items() if isinstance(table, dict) and name != PIPELINE}


def check_command_tables(defaults: dict[str, Any], group, ctx, where: str = "") -> None:
    """Raise ConfigError for a table that names no command or a key that names no option."""
    for name, table in defaults.items():
        cmd = group.get_command(ctx, name)
        if cmd is None:
            raise ConfigError(f"config table [{where}{name}] names no neuroarcade command")
        sub = getattr(cmd, "commands", None)
        if sub is not None:  # a command group: its tables nest
            check_command_tables(table, cmd, ctx, f"{where}{name}.")
            continue
        if (getattr(cmd, "context_settings", None) or {}).get("allow_extra_args"):
            continue  # parses its own arguments and checks its table itself (extract, fit-subjects)
        options = {p.name for p in cmd.params}
        unknown = sorted(set(table) - options)
        if unknown:
            raise ConfigError(f"config table [{where}{name}]: no option {', '.join(unknown)} "
                              f"(options: {', '.join(sorted(o for o in options if o))})")
