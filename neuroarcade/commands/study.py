"""Study commands: `study` (the whole group analysis as one resumable Ray pipeline) and `synth-study` (a
multi-subject synthetic dataset with planted group effects and its truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(study)
    app.command("synth-study")(synth_study)


def study(
    config: Path = typer.Argument(..., help="The study's TOML (pipelines/study.py: tables study, extract, fit, "
                                            "agents, partition, comparisons, stats)."),
    out: Path = typer.Option(Path("runs/study"), help="Output folder: scores.tsv, group.tsv, summary.json, "
                                                      "report.html, figures/, study.json, ledger.jsonl."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray instance)."),
    num_cpus: int = typer.Option(2, help="CPUs of the local Ray instance."),
    cache: Optional[Path] = typer.Option(None, help="Task cache (default: the config's study.cache, else OUT/cache)."),
    sequential: bool = typer.Option(False, help="Run the same tasks in this process, in order (no Ray)."),
    quiet: bool = typer.Option(False, help="No progress view."),
) -> None:
    """Run (or resume) a study: replay and extract every recording, fit every subject × feature space × PCA dim
    (held-out runs), partition the variance of the pairs asked for, then group statistics and the report.
    Prints one JSON line last; exit 1 when a task failed or an input was skipped, 2 on an unreadable config."""
    from rich.console import Console

    from pipelines.study import StudyConfigError, load_study_config, run_study

    console = Console(stderr=True)
    try:
        cfg = load_study_config(config)
    except StudyConfigError as e:
        console.print(f"error: {e}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    res = run_study(cfg, out, address=address, sequential=sequential, num_cpus=num_cpus, progress=not quiet,
                    cache=cache, say=lambda s: console.print(s, markup=False, soft_wrap=True))
    for p in res.problems:
        console.print(f"problem: {p.where}: {p.message} → {p.action}", markup=False, soft_wrap=True)
    for f in res.failures:
        console.print(f"failed: {f['stage']} {f['key']}: {f['error']} (inputs: {json.dumps(f['inputs'])}; "
                      f"{f['tries']} tries, {f['action']})", markup=False, soft_wrap=True)
    summary = {"out": str(res.out), "report": str(res.report.html) if res.report else None,
               "subjects": int(res.scores["subject"].nunique()) if len(res.scores) else 0,
               "tests": int(len(res.group)) if res.group is not None else 0,
               "significant": int(res.group["significant"].sum()) if res.group is not None else 0,
               "stages": {k: {"tasks": v.tasks, "executed": v.executed, "cached": v.cached, "failed": v.failed,
                              "seconds": round(v.seconds, 2)} for k, v in res.stages.items()},
               "problems": len(res.problems), "failures": len(res.failures), "recovery": res.recovery}
    print(json.dumps(summary))
    if res.problems or res.failures or res.group is None:
        raise typer.Exit(1)


def synth_study(
    out: Path = typer.Argument(..., help="Folder for the dataset (BIDS-like), its study.toml and truth."),
    subjects: int = typer.Option(..., help="Participants (≥ 8 for group statistics; 10 gives exact sign-flip p "
                                           "down to 0.002)."),
    seed: int = typer.Option(0, help="Seed of everything (each subject's games, planted factors and noise)."),
    runs: int = typer.Option(3, help="Runs per subject (≥ 3: each is held out in turn)."),
    trs: int = typer.Option(36, help="Volumes per run (TR 1 s)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for the recording and extraction tasks."),
    sequential: bool = typer.Option(False, help="Record and extract in this process (no Ray)."),
    quiet: bool = typer.Option(False, help="No progress view."),
) -> None:
    """Write a multi-subject synthetic study: gameplay recordings, derivatives-layout BOLD planted per ROI on the
    tiny VLM's and LAM's action/reasoning features, atlas, a ready study.toml and truth.tsv (planted signs)."""
    from rich.console import Console

    from pipelines.synth_study import SynthStudyConfig, make_synth_study

    console = Console(stderr=True)
    if subjects < 2 or runs < 3:
        console.print("error: --subjects ≥ 2 and --runs ≥ 3 (each run is held out in turn)")
        raise typer.Exit(2)
    toml = make_synth_study(out, SynthStudyConfig(subjects=subjects, runs=runs, trs=trs, seed=seed),
                            sequential=sequential, address=address, progress=not quiet,
                            say=lambda s: console.print(s, markup=False, soft_wrap=True))
    print(json.dumps({"out": str(out), "study": str(toml), "truth": str(out / "derivatives" / "truth" / "truth.tsv"),
                      "subjects": subjects, "runs": runs, "trs": trs, "seed": seed}))
