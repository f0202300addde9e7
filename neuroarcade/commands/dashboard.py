"""`neuroarcade dashboard` (live view in the browser) and `neuroarcade report` (HTML report of a run)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(dashboard)
    app.command()(report)


TRIGGER_KEY_HELP = ("Browser key the scanner's sync box types at each TR pulse on the participant's page (5; t is "
                    "also common; '' = none). Stamped on arrival, sent to the emulator as a Trigger; never a game action.")
KEYMAP_HELP = ("Button box: KEY=ACTION pairs, e.g. \"1=LEFT,2=RIGHT,3=FIRE,4=NOOP\" or \"b=LEFT,y=RIGHT,g=FIRE,r=NOOP\" "
               "(ALE action names; shown on the participant's page). Default: arrows/WASD + space.")
SERIAL_PORT_HELP = "Serial port of the sync box (e.g. /dev/ttyUSB0): each --serial-char read there is a TR trigger."


def participant_inputs(trigger_key: str, keymap: str, serial_port: str, serial_baud: int, serial_char: str,
                       min_trigger_interval: float):
    """``ParticipantInputs`` from the command-line options (typer.BadParameter naming the option on bad input)."""
    from services.dashboard import ParticipantInputs, parse_keymap
    from services.plumbing.serial_trigger import SerialTriggerConfig

    try:
        parsed = parse_keymap(keymap)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--keymap") from None
    inputs = ParticipantInputs(trigger_key=trigger_key, keymap=parsed, min_trigger_interval_s=min_trigger_interval,
                               serial=SerialTriggerConfig(port=serial_port, baud=serial_baud, char=serial_char,
                                                          min_interval_s=min_trigger_interval))
    try:
        inputs.check()
    except ValueError as e:
        hint = "--serial-char" if "serial" in str(e) else "--min-trigger-interval" if "interval" in str(e) \
            else "--trigger-key/--keymap"
        raise typer.BadParameter(str(e), param_hint=hint) from None
    return inputs


def dashboard(
    frames: str = typer.Option("tcp://127.0.0.1:5555", help="Emulator frames PUB (frames + status); '' for none."),
    control: str = typer.Option("tcp://127.0.0.1:5556", help="Emulator control ROUTER (game info; joined with --play)."),
    activations: List[str] = typer.Option([], help="An agent's PUB endpoint (activations, decisions); repeat per agent."),
    bold: List[str] = typer.Option([], help="Scanner PUB endpoint (BOLD volumes, TR triggers); repeatable."),
    predictions: List[str] = typer.Option([], help="Encoder PUB endpoint (predictions, running scores); repeatable."),
    host: str = typer.Option("127.0.0.1", help="Interface to serve on; anything but loopback needs --token."),
    port: int = typer.Option(8000, help="HTTP port."),
    token: str = typer.Option("", envvar="NEUROARCADE_TOKEN", help="Access token browsers must give (?token=...)."),
    play: bool = typer.Option(False, "--play", help="Join the emulator as controller 'human': play with the "
                                                    "browser's arrow keys and space (FIRE)."),
    atlas: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="ROI label NIfTI for the brain map."),
    atlas_labels: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TSV index<TAB>name of the atlas labels."),
    weights: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="Encoding weights: brain map from their mask and ROI labels."),
    max_fps: float = typer.Option(20.0, help="Frames pushed to each browser per second at most."),
    curve_secret: str = typer.Option("", help="CURVE: our *.key_secret file (required for endpoints off loopback)."),
    curve_server_key: str = typer.Option("", help="CURVE: the servers' *.key file, or a folder of HOST.key files "
                                                  "(one per server host)."),
    trigger_key: str = typer.Option("5", help=TRIGGER_KEY_HELP + " Taken from the page with --play."),
    keymap: str = typer.Option("", help=KEYMAP_HELP),
    serial_port: str = typer.Option("", help=SERIAL_PORT_HELP),
    serial_baud: int = typer.Option(115200, help="Serial line speed of --serial-port."),
    serial_char: str = typer.Option("5", help="Character that marks a pulse on --serial-port (one byte; \\x35 allowed)."),
    min_trigger_interval: float = typer.Option(0.1, help="Trigger pulses closer than this (s) to the previous one "
                                                         "are dropped and counted."),
) -> None:
    """Live dashboard: game, agents' decisions, predicted vs measured BOLD per ROI, brain map, TR clock, scanner
    quality (motion, FD, excluded TRs, time per volume); with --play the participant's keyboard and trigger key."""
    from services.dashboard import Dashboard, DashboardConfig
    from services.plumbing.security import CurveConfig, SecurityError
    from services.plumbing.serial_trigger import SerialTriggerError

    inputs = participant_inputs(trigger_key, keymap, serial_port, serial_baud, serial_char, min_trigger_interval)
    cfg = DashboardConfig(frames=frames, control=control, activations=list(activations), bold=list(bold),
                          predictions=list(predictions), host=host, port=port, token=token, play=play,
                          atlas=str(atlas or ""), atlas_labels=str(atlas_labels or ""), weights=str(weights or ""),
                          max_fps=max_fps, curve=CurveConfig(secret_key=curve_secret, server_public_key=curve_server_key),
                          inputs=inputs)
    try:
        dash = Dashboard(cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--token") from None
    except SecurityError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"dashboard: open {dash.url}")
    try:
        dash.run()
    except SerialTriggerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def report(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Run folder with the encoding outputs."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default RUN_DIR/report.html)."),
    title: str = typer.Option("", help="Report title (default: the run folder's name)."),
) -> None:
    """Self-contained HTML report of a run: ROI scores, variance partitioning, brain maps, latencies."""
    from pipelines.report import write_report

    path = write_report(run_dir, out=out, title=title or None)
    typer.echo(f"wrote {path}")
