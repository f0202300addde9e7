"""Game commands: `emulator` (the service), `record` (headless recording), `replay` (verify/inspect)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.plumbing.transport import DEFAULT_CONTROL, DEFAULT_FRAMES


def register(app: typer.Typer) -> None:
    app.command()(emulator)
    app.command()(record)
    app.command()(replay)
    keys_app = typer.Typer(no_args_is_help=True, help="CURVE keys for endpoints off loopback.")
    keys_app.command("generate")(keys_generate)
    keys_app.command("allow")(keys_allow)
    app.add_typer(keys_app, name="keys")


def keys_generate(
    folder: Path = typer.Argument(..., help="Folder to write NAME.key (public) and NAME.key_secret into."),
    name: str = typer.Option("server", help="Key name (e.g. server, vlm-agent, encoder)."),
) -> None:
    """Generate a CURVE key pair."""
    from services.plumbing.security import generate_keys

    public, secret = generate_keys(folder, name)
    typer.echo(f"public: {public}\nsecret: {secret} (keep private; mode 600)")


def keys_allow(
    public_key: Path = typer.Argument(..., exists=True, dir_okay=False, help="A client's NAME.key public key file."),
    allow_dir: Path = typer.Option(..., "--dir", help="The server's allow-list folder."),
) -> None:
    """Add a client's public key to a server's allow-list."""
    import shutil

    if public_key.suffix != ".key":
        raise typer.BadParameter("give the public NAME.key file, never the secret")
    allow_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(public_key, allow_dir / public_key.name)
    typer.echo(f"allowed {public_key.name} in {allow_dir}")


def emulator(
    game: str = typer.Option("ALE/Pong-v5", help="Gymnasium id of an ALE game."),
    mode: str = typer.Option("realtime", help="realtime | lockstep | replay."),
    seed: int = typer.Option(0, help="Seed of the first reset."),
    frameskip: int = typer.Option(4, help="Emulator frames per step (stream rate 60/frameskip Hz)."),
    sticky: float = typer.Option(0.25, help="Sticky-action probability (repeat_action_probability)."),
    full_action_space: bool = typer.Option(False, help="Use all 18 ALE actions."),
    frames: str = typer.Option(DEFAULT_FRAMES, help="PUB endpoint for frames (bind)."),
    control: str = typer.Option(DEFAULT_CONTROL, help="ROUTER endpoint for clients (bind)."),
    fps: Optional[float] = typer.Option(None, help="Realtime steps/s (default 60/frameskip; 0 = unthrottled)."),
    controller: str = typer.Option("", help="Client id reserved as controller ('' = first to ask)."),
    step_timeout: float = typer.Option(5.0, help="Lockstep: seconds to wait for the controller's action."),
    on_timeout: str = typer.Option("repeat", help="Lockstep timeout policy: repeat | noop | wait."),
    replay_path: str = typer.Option("", "--recording", help="Replay mode: recording to play back."),
    speed: float = typer.Option(1.0, help="Replay pace (1 = recorded, 0 = as fast as possible)."),
    record_path: str = typer.Option("", "--record", help="Recording path (default runs/<session>.narec)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps."),
    duration: Optional[float] = typer.Option(None, help="Stop after N seconds."),
    max_episodes: Optional[int] = typer.Option(None, help="Stop after N episodes."),
    meta: list[str] = typer.Option([], help="KEY=VALUE labels for the recording header (repeatable)."),
    curve_secret: str = typer.Option("", help="CURVE: this server's *.key_secret file (required off loopback)."),
    curve_allow: str = typer.Option("", help="CURVE: folder of client *.key files allowed to connect."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port (127.0.0.1)."),
    log_json: bool = typer.Option(False, help="Structured logs: one JSON object per line."),
    verbose: bool = typer.Option(False, "-v", help="Log client joins and rejections."),
    pooled_gray: bool = typer.Option(True, help="Publish the RL observation's pooled grayscale screen "
                                                "(--no-pooled-gray: no RL agent watches; saves ≈15 % per step)."),
) -> None:
    """Run the emulator service: publish frames, take actions, record the session."""
    from services.emulator import EmulatorConfig
    from services.plumbing.game import GameSettings
    from services.plumbing.metrics import setup_logging
    from services.plumbing.security import CurveConfig

    setup_logging(verbose, log_json)
    cfg = EmulatorConfig(
        game=GameSettings(game=game, seed=seed, frameskip=frameskip, repeat_action_probability=sticky,
                          full_action_space=full_action_space),
        mode=mode, frames_endpoint=frames, control_endpoint=control, fps=fps, controller=controller,
        step_timeout_s=step_timeout, on_timeout=on_timeout, replay_path=replay_path, speed=speed,
        record_path=record_path, max_steps=max_steps, duration_s=duration, max_episodes=max_episodes,
        meta=_parse_meta(meta), curve=CurveConfig(secret_key=curve_secret, allowed_clients=curve_allow),
        metrics_port=metrics_port, pooled_gray=pooled_gray,
    )
    _serve(cfg)


def _serve(cfg) -> None:
    """Run one emulator session until it stops; print its summary as JSON; exit 1 on a hash mismatch."""
    from services.emulator import Emulator, install_signal_handlers

    emu = Emulator(cfg)
    install_signal_handlers(emu)
    typer.echo(f"emulator {emu.session_id}: {cfg.mode} {emu.game.settings.game} frames on {cfg.frames_endpoint}, "
               f"control on {cfg.control_endpoint}")
    summary = emu.run()
    typer.echo(json.dumps({
        "session_id": summary.session_id, "mode": summary.mode, "steps": summary.steps,
        "episodes": summary.episodes, "reason": summary.reason, "record": summary.record_path,
        "rejected": summary.counters.rejected, "hash_mismatches": summary.hash_mismatches,
        "clients": summary.clients,
    }))
    if summary.hash_mismatches:
        raise typer.Exit(1)


def record(
    game: str = typer.Option("ALE/Pong-v5", help="Gymnasium id of an ALE game."),
    steps: int = typer.Option(1000, help="Steps to play."),
    out: Path = typer.Option(..., help="Recording file to write (*.narec)."),
    seed: int = typer.Option(0, help="Seed of the first reset."),
    controller: str = typer.Option("random", help="Built-in controller: random (seeded) | cycle (scripted)."),
    controller_seed: int = typer.Option(0, help="Seed of the random controller."),
    frameskip: int = typer.Option(4, help="Emulator frames per step."),
    sticky: float = typer.Option(0.25, help="Sticky-action probability."),
    full_action_space: bool = typer.Option(False, help="Use all 18 ALE actions."),
    tr: Optional[float] = typer.Option(None, help="Also write scanner triggers every TR seconds of game time."),
    meta: list[str] = typer.Option([], help="KEY=VALUE labels for the header (repeatable)."),
) -> None:
    """Play headless with a built-in controller and record the session (no sockets)."""
    from rich.progress import Progress

    from services.emulator import record_headless
    from services.plumbing.game import GameSettings

    settings = GameSettings(game=game, seed=seed, frameskip=frameskip, repeat_action_probability=sticky,
                            full_action_space=full_action_space)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"recording {game}", total=steps)
        rec = record_headless(settings, steps, out, controller=controller, controller_seed=controller_seed, tr_s=tr,
                              meta=_parse_meta(meta), progress=lambda n: bar.update(task, completed=n))
    typer.echo(f"{out}: {len(rec.steps)} steps, {len(rec.resets)} episodes, {len(rec.triggers)} triggers")


def replay(
    path: Path = typer.Argument(..., help="Recording to check or play back."),
    verify: bool = typer.Option(False, help="Re-run headless; exit 0 only if every frame hash matches."),
    serve: bool = typer.Option(False, help="Play it back as an emulator session on the sockets."),
    speed: float = typer.Option(1.0, help="With --serve: pace (1 = recorded, 0 = as fast as possible)."),
    frames: str = typer.Option(DEFAULT_FRAMES, help="With --serve: PUB endpoint."),
    control: str = typer.Option(DEFAULT_CONTROL, help="With --serve: ROUTER endpoint."),
    bids_events: Optional[Path] = typer.Option(None, help="Write a BIDS _events.tsv pointing at the recording."),
) -> None:
    """Inspect, verify (bit-exact) or serve a recorded session."""
    from services.plumbing.recording import RecordingError, read_recording, write_bids_events

    try:
        rec = read_recording(path)
    except (OSError, RecordingError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    h = rec.header
    state = "complete" if rec.complete else ("truncated (writer killed?)" if rec.truncated else "no end record")
    typer.echo(f"{path}: {h.game} seed={h.seed} frameskip={h.frameskip} sticky={h.repeat_action_probability} "
               f"{len(rec.steps)} steps, {len(rec.resets)} episodes, {len(rec.triggers)} triggers, {state}")
    if bids_events is not None:
        write_bids_events(rec, bids_events)
        typer.echo(f"wrote {bids_events}")
    if verify:
        from rich.progress import Progress

        from services.emulator import verify_replay

        with Progress(transient=True) as bar:
            task = bar.add_task("verifying", total=None)
            result = verify_replay(path, progress=lambda n, total: bar.update(task, completed=n, total=total))
        if not result.ok:
            typer.echo(f"MISMATCH: first mismatching step at seq {result.first_mismatch_seq}: {result.detail}", err=True)
            raise typer.Exit(1)
        typer.echo(f"OK: {result.detail}")
    if serve:
        from services.emulator import EmulatorConfig
        from services.plumbing.game import settings_from_header
        from services.plumbing.metrics import setup_logging

        setup_logging()
        _serve(EmulatorConfig(game=settings_from_header(h), mode="replay", replay_path=str(path), speed=speed,
                              frames_endpoint=frames, control_endpoint=control))


def _parse_meta(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--meta wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out
