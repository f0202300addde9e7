"""Product commands: `demo`, `replay-session`, `synth-participant`, `live`.

Each reads its defaults from the pipeline config too (`neuroarcade --config lab.toml demo`): the
command tables set options, and `[pipeline.*]` tables describe the closed loop.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import typer

from neuroarcade.commands.dashboard import KEYMAP_HELP, SERIAL_PORT_HELP, TRIGGER_KEY_HELP, participant_inputs
from neuroarcade.commands.encoding import FAULTS_HELP


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command("replay-session")(replay_session)
    app.command("synth-participant")(synth_participant)
    app.command()(live)


def demo(
    seconds: float = typer.Option(0.0, help="How long the participant's held-out run is replayed (recorded pace; "
                                            "0 = all of it, 60 TRs = 2 min: enough TRs for a stable ROI ordering)."),
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the synthetic participant and this run's outputs."),
    model: str = typer.Option("", help="VLM by hub name or local dir ('' = the tiny offline Qwen2.5-VL), "
                                       "e.g. Qwen/Qwen2.5-VL-7B-Instruct when you have a hub."),
    game: str = typer.Option("ALE/Breakout-v5", help="Game of the synthetic participant."),
    participant: Optional[Path] = typer.Option(None, help="Use this participant folder (made by synth-participant)."),
    dashboard_port: int = typer.Option(8000, help="Serve the live dashboard on 127.0.0.1:PORT (0 = no dashboard)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object (keys in README)."),
) -> None:
    """Offline tour: a synthetic participant's session replayed with an RL agent and a VLM (action and reasoning
    prompts), the scanner's volumes arriving TR by TR, live encoding scores, the dashboard, then a report."""
    from pipelines.session import Participant, ParticipantConfig, ReplayPlan, make_participant, replay_session
    from services.plumbing.transport import free_tcp_endpoint

    say = _say(as_json)
    root = participant or out / "participant"
    if participant is None and (root / "derivatives" / "neuroarcade_session.json").exists() and \
            Participant.load(root).planted is None:
        say(f"{root} was made before participants recorded their planted parts: making it again")
        shutil.rmtree(root)
    if (root / "derivatives" / "neuroarcade_session.json").exists():
        p = Participant.load(root)
    else:
        say(f"making a synthetic participant in {root} (once; about a minute on a laptop CPU)")
        p = make_participant(root, ParticipantConfig(game=game, model=model), progress=say)
    held_out = p.runs[-1]["run"]
    tr = 2.0
    if dashboard_port and not _port_free(dashboard_port):
        busy, dashboard_port = dashboard_port, int(free_tcp_endpoint().rsplit(":", 1)[1])
        say(f"port {busy} is in use: the dashboard takes {dashboard_port}")
    plan = ReplayPlan(p, held_out, out / "run", max_trs=max(3, math.ceil(seconds / tr)) if seconds > 0 else None,
                      dashboard_port=dashboard_port or None,
                      on_dashboard=lambda url: say(f"dashboard: {url}"))
    summary = replay_session(plan, progress=say)
    _print_summary(summary, as_json)


def replay_session(
    participant: Path = typer.Argument(..., help="Participant folder: BIDS run(s), gamelogs, derivatives/weights."),
    run: str = typer.Option("", help="Run to replay (default: the held-out run)."),
    out: Path = typer.Option(Path("runs/replay"), help="Output folder."),
    batch: bool = typer.Option(False, help="As fast as possible, offline, over --runs (progress bar)."),
    runs: list[str] = typer.Option([], help="Batch mode: runs to replay (repeatable; default all)."),
    speed: float = typer.Option(1.0, help="Recorded-pace mode: 1 = as recorded."),
    max_trs: Optional[int] = typer.Option(None, help="Replay only the first N TRs."),
    dashboard_port: int = typer.Option(0, help="Serve the dashboard on 127.0.0.1:PORT while replaying (0 = no)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Replay a participant's session with model agents watching the bit-identical frames; score each agent's
    predicted BOLD against the participant's measured BOLD per ROI; write scores, maps and a report."""
    from pipelines.session import Participant, ReplayPlan, replay_batch
    from pipelines.session import replay_session as run_replay

    say = _say(as_json)
    try:
        p = Participant.load(participant)
    except FileNotFoundError:
        raise typer.BadParameter(f"{participant} has no derivatives/neuroarcade_session.json "
                                 "(make one with `neuroarcade synth-participant`)", param_hint="PARTICIPANT")
    if batch:
        summary = replay_batch(p, runs or [r["run"] for r in p.runs], out, progress=say)
    else:
        summary = run_replay(ReplayPlan(p, run or p.runs[-1]["run"], out, speed=speed, max_trs=max_trs,
                                        dashboard_port=dashboard_port or None,
                                        on_dashboard=lambda url: say(f"dashboard: {url}")), progress=say)
    _print_summary(summary, as_json)


def synth_participant(
    out: Path = typer.Argument(..., help="Folder to write the BIDS dataset into."),
    game: str = typer.Option("ALE/Breakout-v5", help="Game played in the recorded runs."),
    runs: int = typer.Option(4, help="Runs (the last is held out from the fit)."),
    trs: int = typer.Option(60, help="Volumes per run."),
    model: str = typer.Option("", help="VLM ('' = build the tiny offline Qwen2.5-VL)."),
    seed: int = typer.Option(0, help="Seed of everything random."),
    faults: str = typer.Option("", help="Scanner-room faults on the written runs (then the weights are fitted on "
                                        "them preprocessed as live, and record it). " + FAULTS_HELP
                                        + " Truth: derivatives/truth/*_desc-truemotion_timeseries.tsv."),
) -> None:
    """A synthetic participant whose BOLD is planted on a VLM's action/reasoning-prompt features (unique-action,
    unique-reasoning and shared parts per ROI), with fitted weights per agent and condition; `replay-session` then
    shows the planted beside the recovered scores."""
    from pipelines.session import ParticipantConfig, make_participant

    from neuroarcade.commands.encoding import _faults_or_exit

    p = make_participant(out, ParticipantConfig(game=game, runs=runs, trs=trs, model=model, seed=seed,
                                                faults=_faults_or_exit(faults)))
    typer.echo(f"{p.root}: {len(p.runs)} runs, weights {', '.join(p.weights)}; held-out {p.runs[-1]['run']}")


def live(
    participant: Path = typer.Argument(..., help="Participant folder with fitted weights (derivatives/weights)."),
    scanner_folder: Path = typer.Option(..., help="The scanner's export folder to watch (DICOM or NIfTI)."),
    simulate: Optional[Path] = typer.Option(None, help="Simulate the scanner: write this 4D NIfTI's volumes "
                                                       "into --scanner-folder at TR pace, with triggers."),
    duration: float = typer.Option(120.0, help="Seconds to run."),
    game: str = typer.Option("ALE/Breakout-v5", help="Game the participant plays."),
    out: Path = typer.Option(Path("runs/live"), help="Output folder."),
    dashboard_port: int = typer.Option(8000, help="Dashboard port (keyboard play for the participant)."),
    trigger_key: str = typer.Option("5", help=TRIGGER_KEY_HELP),
    keymap: str = typer.Option("", help=KEYMAP_HELP),
    serial_port: str = typer.Option("", help=SERIAL_PORT_HELP),
    serial_baud: int = typer.Option(115200, help="Serial line speed of --serial-port."),
    serial_char: str = typer.Option("5", help="Character that marks a pulse on --serial-port (one byte; \\x35 allowed)."),
    min_trigger_interval: float = typer.Option(0.1, help="Trigger pulses closer than this (s) to the previous one "
                                                         "are dropped and counted."),
    tr_fallback: bool = typer.Option(True, help="Time TRs from the export folder's arrival times while no trigger "
                                                "has come (reported beside the triggers either way)."),
    slices_per_volume: Optional[int] = typer.Option(None, min=1, help="Single-slice DICOM series (one file per slice: GE, Philips, non-mosaic Siemens): slices per volume. Only an override: by default it comes from the headers (ImagesInAcquisition) or is learned from the instance numbers' period."),
    faults: str = typer.Option("", help="With --simulate: " + FAULTS_HELP + " Truth: OUT/truth_motion.tsv."),
) -> None:
    """Scanner-side demo: the participant plays in the browser, the export folder is watched, agents run
    alongside, predictions and running scores appear live; a report at the end. TRs are timed by the scanner's
    triggers (the sync box's keypress on the page, a serial line, or --simulate's), else by the folder."""
    from pipelines.session import LivePlan, Participant, run_live
    from services.plumbing.serial_trigger import SerialTriggerError

    from neuroarcade.commands.encoding import _faults_or_exit

    if faults and simulate is None:
        typer.echo("error: --faults: only the simulated scanner adds faults (give --simulate RUN.nii.gz)", err=True)
        raise typer.Exit(2)
    fault_cfg = _faults_or_exit(faults)
    inputs = participant_inputs(trigger_key, keymap, serial_port, serial_baud, serial_char, min_trigger_interval)
    p = Participant.load(participant)
    try:
        summary = run_live(LivePlan(p, scanner_folder, out, game=game, duration_s=duration, simulate=simulate,
                                    dashboard_port=dashboard_port, inputs=inputs, tr_fallback=tr_fallback,
                                    slices_per_volume=slices_per_volume, faults=fault_cfg),
                           progress=typer.echo)
    except SerialTriggerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _print_summary(summary, False)
    timing = summary.get("tr_timing")
    if timing:
        ms = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
        typer.echo(f"TRs timed by {timing['timed_by']}: {timing['triggers']} triggers {timing['by_source']}, "
                   f"{timing['volumes']} volumes; export folder lag behind the triggers p50 "
                   f"{ms(timing['export_lag_ms_p50'])} ms, max {ms(timing['export_lag_ms_max'])} ms")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _say(quiet: bool):
    from rich.console import Console

    console = Console(stderr=True)
    return (lambda msg: console.print(f"[dim]{msg}[/dim]")) if quiet else (lambda msg: console.print(msg))


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        from pipelines.report import json_ready

        typer.echo(json.dumps(json_ready(summary), default=str))
        return
    from rich.console import Console
    from rich.table import Table

    from encoders.plant import PartitionRow, PlantedPattern, Recovery

    console = Console()
    if summary.get("agents"):
        t = Table(title="agents (decisions on the replayed frames)")
        for col in ("agent", "condition", "decisions", "latency p50 ms", "latency p99 ms", "activations",
                    "stale frames skipped"):
            t.add_column(col)
        for a in summary["agents"]:
            t.add_row(a["agent_id"], a.get("condition") or "policy", str(a["decisions"]),
                      f"{a['latency_p50_ms']:.1f}", f"{a['latency_p99_ms']:.1f}", str(a["activations"]),
                      str(a["stale_skipped"]))
        console.print(t)
    recovery = [Recovery(**row) for row in summary.get("recovery") or []]
    if recovery:
        first = recovery[0]
        known = any(math.isfinite(r.planted_fraction) for r in recovery)  # a synthetic participant
        console.print((f"[bold]planted vs recovered[/bold], per stream and ROI, over {first.n_trs} TRs. planted r: "
                       "what a perfect model of the stream scores on this run (— nothing planted on it); "
                       if known else f"[bold]scores beside chance[/bold], over {first.n_trs} TRs. ") +
                      "recovered r: predicted vs measured ROI means; chance: 95 % of r with the measured series "
                      f"shuffled in {first.block}-TR blocks ({first.permutations} permutations); * above chance.")
        for stream in dict.fromkeys(r.stream for r in recovery):
            t = Table(title=stream)
            for col in ("ROI", "planted R²", "planted r", "recovered r", "chance 95 %", "p"):
                t.add_column(col, justify="left" if col == "ROI" else "right")
            for r in (r for r in recovery if r.stream == stream):
                t.add_row(r.roi, _num(r.planted_fraction), _num(r.planted_r),
                          _num(r.r) + ("*" if r.above_chance else " "), f"{_num(r.null_lo)} … {_num(r.null_hi)}",
                          f"{r.p:.3f}" if math.isfinite(r.p) else "—")
            console.print(t)
        if any(not math.isfinite(r.planted_fraction) and r.above_chance for r in recovery):
            console.print("[dim]A stream nothing was planted on can still score: it sees the same frames, and the "
                          "planted sources are functions of them.[/dim]")
    elif summary.get("scores"):
        scores = summary["scores"]
        rois = list(next(iter(scores.values())))
        t = Table(title="Pearson r, predicted vs measured BOLD (ROI means)")
        t.add_column("stream")
        for roi in rois:
            t.add_column(roi)
        for stream, per_roi in scores.items():
            t.add_row(stream, *[f"{per_roi.get(r, float('nan')):.2f}" for r in rois])
        console.print(t)
    partition = [PartitionRow(**row) for row in summary.get("partition") or []]
    if partition:
        t = Table(title="variance partitioning, action vs reasoning prompt (held-out R², ROI voxel mean; "
                        "planted → recovered)")
        for col in ("ROI", "unique action", "unique reasoning", "shared"):
            t.add_column(col, justify="left" if col == "ROI" else "right")
        for r in partition:
            t.add_row(r.roi, *[f"{_num(planted)} → {_num(got)}" for planted, got in (
                (r.planted_unique_action, r.unique_action), (r.planted_unique_reasoning, r.unique_reasoning),
                (r.planted_shared, r.shared))])
        console.print(t)
    if summary.get("planted"):
        overlap = PlantedPattern.load_dict(summary["planted"]).overlap
        console.print(f"prompt conditions — {overlap.describe()}")
    console.print(f"report: {summary.get('report')}   replay bit-exact: {summary.get('replay_verified')}")


def _num(v: float | None) -> str:
    """Two decimals; — for a value that does not apply (nan / None)."""
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}"
