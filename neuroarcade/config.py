"""Pipeline config files (TOML): one file keeps and shares a lab's whole setup.

Two kinds of tables, in one file:

- **Command defaults** — a table named after a command sets its options' defaults, with the
  option names as the command's ``--help`` shows them, underscores or dashes alike:
  ``[emulator] game = "ALE/Breakout-v5"``; sub-commands nest: ``[bench.transport] frames = 500``.
  Options given on the command line still win.
- **The pipeline** — ``[game]``, ``[[agents]]``, ``[scanner]``, ``[encoder]``, ``[outputs]``,
  ``[dashboard]`` describe the closed loop that ``demo``, ``live`` and ``replay-session`` run.

Every command takes it: ``neuroarcade --config lab.toml <command> …``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

PIPELINE_TABLES = ("game", "agents", "scanner", "encoder", "outputs", "dashboard")


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

    return {name: norm(table) for name, table in config.items()
            if isinstance(table, dict) and name not in PIPELINE_TABLES}
