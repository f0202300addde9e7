"""Encoding commands: fit, predict, scanner, encode, synth. Heavy imports stay inside the functions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

FIT_HELP = """Fit a voxelwise encoding model (ridge, alpha per voxel by leave-one-run-out CV) and save WEIGHTS.

  neuroarcade fit --bold R1.nii.gz R2.nii.gz … --features F1.npy F2.npy … --tr 2.0 --out W.safetensors
  neuroarcade fit --bids DATASET --out W.safetensors            (runs + derivatives/features/*_desc-<space>)
  neuroarcade fit --bids DATASET --derivatives DATASET/derivatives/fmriprep --subject 01 --task x \
      --output-space MNI152NLin2009cAsym --confounds motion24,acompcor --out W.safetensors

The BOLD can be cleaned before the ridge (--preprocess offline: per run, regression of the constant, a
cosine drift basis at --high-pass and the --confounds, then z-score; causal: as live; default none =
per-run z-score only, until the features are filtered the same way); the weights file records the mode
and every setting.

Several feature spaces (--features plus --space NAME F1 F2 …, or several spaces in --bids) are fitted
jointly with banded ridge; with two spaces --partition adds variance partitioning."""


FAULTS_HELP = ("Scanner-room faults on every volume: a preset (realistic: 1.5 mm/1.5° slow drift + 2 jerks of "
               "1.5 mm/1.5°, capped at 3 mm/3°, 3 % gain drift, physiology, 2 spikes) and/or key=value pairs, "
               "comma-separated: motion_mm, motion_deg, jerks, jerk_mm, jerk_deg, max_mm, max_deg, drift_linear, "
               "drift_quadratic, physio, spikes, spike_size, spike_slices, interp_order, seed (e.g. "
               "realistic,spikes=0 or motion_mm=2,jerks=1). The true per-TR motion is written beside the outputs "
               "(fMRIPrep columns). Default: none.")


def _faults_or_exit(text: str):
    """``--faults`` as an ``encoders.faults.FaultConfig``; a bad setting is one error line, exit 2."""
    from encoders.faults import FaultConfig, FaultError

    try:
        return FaultConfig.parse(text)
    except FaultError as e:
        _fail(e)


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroarcade fit", description=FIT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bold", nargs="+", type=Path, default=[], help="4D BOLD runs (NIfTI), one per run")
    p.add_argument("--features", nargs="+", type=Path, default=[],
                   help="feature matrices (.npy, one row per TR), one per run, same order as --bold")
    p.add_argument("--space", nargs="+", action="append", default=[], metavar=("NAME", "F"),
                   help="another feature space: its name then one .npy per run (repeatable)")
    p.add_argument("--bids", type=Path, help="BIDS dataset root (instead of --bold/--features)")
    p.add_argument("--sub", "--subject", dest="sub", help="BIDS subject label (with --bids)")
    p.add_argument("--task", help="BIDS task label (with --bids)")
    p.add_argument("--derivatives", type=Path,
                   help="with --bids: fMRIPrep's output folder; fit its *_desc-preproc_bold runs (brain masks and "
                        "confounds from beside them; features still from DATASET/derivatives/features)")
    p.add_argument("--ses", "--session", dest="ses", help="BIDS session label (with --derivatives)")
    p.add_argument("--output-space", help="fMRIPrep output space, e.g. MNI152NLin2009cAsym (with --derivatives; "
                                          "default: the only one)")
    p.add_argument("--preprocess", choices=["none", "offline", "causal"], default="none",
                   help="cleaning of the BOLD before the ridge: none (default) = per-run z-score only; offline = per run, regress the constant, "
                        "cosine drift and --confounds out, then z-score; causal = as live, each volume on the "
                        "volumes up to it (warm-up volumes 0)")
    p.add_argument("--confounds", nargs="+", default=None, metavar="SET",
                   help="fMRIPrep confound sets to regress: motion6, motion12, motion24, acompcor, wm_csf, "
                        "global_signal, cosine (combine: motion24,acompcor), none, or auto (default: motion6 for "
                        "fMRIPrep *_desc-preproc_bold runs, none otherwise)")
    p.add_argument("--high-pass", type=float, default=1 / 128,
                   help="cut-off of the cosine drift basis in Hz (default 1/128; 0 = no drift regressors)")
    p.add_argument("--spaces", nargs="+", help="with --bids: which feature spaces to fit (default all)")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--tr", type=float, help="repetition time in s (default: sidecar JSON / NIfTI header)")
    p.add_argument("--mask", type=Path, help="brain mask NIfTI (default: with --derivatives the runs' brain "
                                             "masks, else voxels varying in every run)")
    p.add_argument("--delays", nargs="+", type=int, default=[1, 2, 3, 4], help="FIR delays in TRs")
    p.add_argument("--pca", type=int, help="reduce each feature space to K principal components")
    p.add_argument("--atlas", type=Path, help="ROI atlas NIfTI (integer labels)")
    p.add_argument("--atlas-labels", type=Path, help="TSV with columns index, name")
    p.add_argument("--alphas", nargs="+", type=float, help="ridge penalties (default logspace(-2, 8, 21))")
    p.add_argument("--backend", default="numpy", choices=["numpy", "torch", "torch_cuda", "cupy"])
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads during the fit")
    p.add_argument("--no-score", action="store_true", help="skip the nested leave-one-run-out CV scores")
    p.add_argument("--permutations", type=int, default=0, help="block permutations for significance (FDR)")
    p.add_argument("--fdr", type=float, default=0.05, help="FDR level")
    p.add_argument("--partition", action="store_true", help="variance partitioning of two feature spaces")
    p.add_argument("--model", help="provenance: model name (overrides sidecars)")
    p.add_argument("--layer", type=int, help="provenance: layer index (overrides sidecars)")
    p.add_argument("--condition", help="provenance: prompt condition (overrides sidecars)")
    p.add_argument("--pooling", help="provenance: pooling (overrides sidecars)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _fail(message: object) -> NoReturn:
    """A domain error as one line on stderr and exit status 2 (a bug still shows its traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def fit_main(argv: list[str]) -> None:
    """The `neuroarcade fit` command body (argparse: the flags take several values each)."""
    from encoders.data import FitInputError

    args = _fit_parser().parse_args(argv)
    try:
        _fit(args)
    except FitInputError as e:
        _fail(e)


def _fit(args: argparse.Namespace) -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from encoders.data import FitInputError, FitPreprocess, parse_confound_sets
    from encoders.fit import FitConfig
    from pipelines.fit import FitRunConfig, SpaceFiles, run_fit

    console = Console(stderr=True)
    if not args.bids and (not args.bold or not args.features):
        raise FitInputError("give --bold and --features (or --bids)")
    preprocess = FitPreprocess(mode=args.preprocess, confounds=parse_confound_sets(args.confounds),
                               high_pass_hz=args.high_pass)
    spaces = [SpaceFiles("", list(args.features), "--features"),
              *(SpaceFiles(name, [Path(f) for f in files], f"--space {name}") for name, *files in args.space)]
    fit = FitConfig(delays=args.delays, pca=args.pca, backend=args.backend, blas_threads=args.threads,
                    score=not args.no_score, n_permutations=args.permutations, fdr_q=args.fdr,
                    progress=not args.quiet, **({"alphas": np.asarray(args.alphas)} if args.alphas else {}))
    summary = run_fit(FitRunConfig(
        out=args.out, bold=list(args.bold), spaces=[] if args.bids else spaces, bids=args.bids, subject=args.sub,
        derivatives=args.derivatives, session=args.ses, output_space=args.output_space, preprocess=preprocess,
        task=args.task, select=tuple(args.spaces) if args.spaces else None, mask=args.mask, tr=args.tr, fit=fit,
        atlas=args.atlas, atlas_labels=args.atlas_labels, partition=args.partition, model=args.model,
        layer=args.layer, condition=args.condition, pooling=args.pooling),
        warn=lambda w: console.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True))
    rows = summary.rows
    table = Table(title=f"fit: {summary.runs} runs, {summary.voxels} voxels, TR {summary.tr:g} s")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)
    for p in summary.written:
        console.print(f"wrote {p}")


def _curve_or_exit(secret: str, allow: str = "", server_key: str = "", binds=(), connects=()):
    """The command's CurveConfig, its endpoints checked first: exposed without keys = a clear error, exit 2."""
    from services.plumbing.security import CurveConfig, SecurityError, preflight

    curve = CurveConfig(secret_key=secret, allowed_clients=allow, server_public_key=server_key)
    try:
        preflight(curve, binds=binds, connects=connects)
    except SecurityError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    return curve


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False, help=FIT_HELP + "\n\nRun `neuroarcade fit --help` for all flags.")
    def fit(ctx: typer.Context) -> None:
        fit_main(list(ctx.args))

    @app.command()
    def predict(
        weights: Path = typer.Option(..., help="Weights file written by `neuroarcade fit`."),
        features: List[Path] = typer.Option(..., help="Feature matrix .npy (one row per TR); repeat per space."),
        out: Path = typer.Option(..., help="Predicted 4D NIfTI (fit space, zeros outside the mask)."),
    ) -> None:
        """Offline prediction: one predicted volume per feature row."""
        import nibabel as nib

        from encoders.data import FitInputError, load_features
        from encoders.weights import EncodingWeights, WeightsError

        try:
            w = EncodingWeights.load(weights)
            pred = w.predict([load_features(f)[0] for f in features])
        except (WeightsError, FitInputError) as e:
            _fail(e)
        img = nib.Nifti1Image(w.to_volume(pred), w.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = w.tr
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, out)
        typer.echo(f"wrote {out}: {pred.shape[0]} volumes × {pred.shape[1]} voxels")

    @app.command()
    def scanner(
        source: str = typer.Argument(..., help="recorded | live | simulated"),
        bold: Optional[Path] = typer.Argument(None, help="4D NIfTI run (recorded, simulated)."),
        folder: Optional[Path] = typer.Option(None, help="Export folder to watch (live) or to write (simulated)."),
        tr: Optional[float] = typer.Option(None, help="TR in s (default: from the NIfTI)."),
        speed: float = typer.Option(1.0, help="Time compression (recorded/simulated); 0 = as fast as possible."),
        start_s: float = typer.Option(0.0, help="Recorded: start the replay at this time into the run."),
        endpoint: str = typer.Option("tcp://127.0.0.1:5558", help="PUB endpoint for BoldVolume messages."),
        trigger_endpoint: str = typer.Option("tcp://127.0.0.1:5560", help="PUB endpoint for Trigger (simulated)."),
        n_volumes: Optional[int] = typer.Option(None, help="Stop after this many volumes."),
        wait_subscribers: int = typer.Option(0, help="Wait for this many subscribers before streaming."),
        curve_secret: str = typer.Option("", help="CURVE: our *.key_secret file (required off loopback)."),
        curve_allow: str = typer.Option("", help="CURVE: folder of *.key files allowed to subscribe."),
        metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port (127.0.0.1)."),
        slices_per_volume: Optional[int] = typer.Option(None, min=1, help="Single-slice DICOM series (one file per slice: GE, Philips, non-mosaic Siemens): slices per volume. Only an override: by default it comes from the headers (ImagesInAcquisition) or is learned from the instance numbers' period."),
        faults: str = typer.Option("", help="Simulated: " + FAULTS_HELP + " Truth: FOLDER/truth_motion.tsv."),
    ) -> None:
        """Stream BOLD volumes over ZMQ from a recorded run, a live export folder, or a simulated scanner."""
        import threading

        import zmq

        from services.scanner import (FolderSource, RecordedSource, SimulatedScannerConfig, publish_stream,
                                      run_simulated_scanner)

        if faults and source != "simulated":
            _fail(f"--faults: only the simulated scanner adds faults (source {source!r})")
        curve = _curve_or_exit(curve_secret, curve_allow,
                               binds=[endpoint, trigger_endpoint if source == "simulated" else ""])
        ctx = zmq.Context()
        if source == "recorded":
            if bold is None:
                raise typer.BadParameter("recorded needs a BOLD file")
            src = RecordedSource(bold, tr=tr, start_s=start_s, speed=speed)
        elif source in ("live", "simulated"):
            if folder is None:
                raise typer.BadParameter(f"{source} needs --folder")
            sim = None
            if source == "simulated":
                if bold is None:
                    raise typer.BadParameter("simulated needs a BOLD file")
                import nibabel as nib

                tr = tr or float(nib.load(str(bold)).header.get_zooms()[3])
                scfg = SimulatedScannerConfig(bold=str(bold), folder=str(folder), tr=tr, speed=speed or 1.0,
                                              n_volumes=n_volumes, trigger_endpoint=trigger_endpoint,
                                              wait_subscribers=wait_subscribers, curve=curve,
                                              faults=_faults_or_exit(faults))
                sim = threading.Thread(target=run_simulated_scanner, args=(scfg, ctx), daemon=True)
                sim.start()
            src = FolderSource(folder, tr=(tr or 2.0) / (speed or 1.0), n_volumes=n_volumes,
                               slices_per_volume=slices_per_volume)
        else:
            raise typer.BadParameter(f"source must be recorded, live or simulated, not {source!r}")
        try:
            sent = publish_stream(src, endpoint, ctx, wait_subscribers=wait_subscribers, curve=curve,
                                  metrics_port=metrics_port)
        except KeyboardInterrupt:
            sent = -1
        for ev in getattr(src, "events", []):
            typer.echo(f"{ev.kind}: TR {ev.tr_index} {ev.path} {ev.detail}", err=True)
        typer.echo(f"published {sent} volumes on {endpoint}")

    @app.command()
    def encode(
        weights: Path = typer.Option(..., help="Weights file written by `neuroarcade fit`."),
        activations: List[str] = typer.Option(["tcp://127.0.0.1:5557"], help="Agent PUB endpoints (repeatable)."),
        bold: List[str] = typer.Option(["tcp://127.0.0.1:5558", "tcp://127.0.0.1:5560"],
                                       help="Scanner PUB endpoints: volumes and triggers (repeatable)."),
        predictions: str = typer.Option("tcp://127.0.0.1:5559", help="PUB endpoint for Prediction messages."),
        out_dir: Optional[Path] = typer.Option(None, help="Write the predicted NIfTI and scores TSV here."),
        n_trs: Optional[int] = typer.Option(None, help="Stop after this many TRs are scored."),
        idle_timeout_s: Optional[float] = typer.Option(None, help="Stop after this long without input."),
        agent_id: str = typer.Option("", help="Follow only this agent ('' = first matching)."),
        grace_s: float = typer.Option(0.5, help="Wait this long after a TR ends for late activations."),
        metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port (127.0.0.1)."),
        log_json: bool = typer.Option(False, help="Structured logs: one JSON object per line."),
        curve_secret: str = typer.Option("", help="CURVE: our *.key_secret file (required off loopback)."),
        curve_allow: str = typer.Option("", help="CURVE: folder of *.key files allowed to subscribe to predictions."),
        curve_server_key: str = typer.Option("", help="CURVE: the agents' and scanner's *.key file, or a folder "
                                                      "of HOST.key files (one per server host)."),
    ) -> None:
        """Encoding service: activations + BOLD in, per-TR predictions and running scores out."""

        curve = _curve_or_exit(curve_secret, curve_allow, curve_server_key, binds=[predictions],
                               connects=[*activations, *bold])

        from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service
        from services.plumbing.metrics import setup_logging

        setup_logging(verbose=True, json_logs=log_json)
        cfg = EncodingServiceConfig(weights=str(weights), activations=activations, bold=bold,
                                    predictions=predictions, out_dir=str(out_dir or ""), n_trs=n_trs,
                                    idle_timeout_s=idle_timeout_s, metrics_port=metrics_port,
                                    core=CoreConfig(agent_id=agent_id, grace_s=grace_s), curve=curve)
        try:
            report = run_encoding_service(cfg)
        except KeyboardInterrupt:
            return
        typer.echo(json.dumps(report.__dict__, default=str, indent=2))

    @app.command()
    def synth(
        out: Path = typer.Argument(..., help="Directory of the BIDS dataset to create."),
        runs: int = typer.Option(4, help="Runs."),
        trs: int = typer.Option(200, help="Volumes per run."),
        tr: float = typer.Option(2.0, help="Repetition time, s."),
        voxel_mm: float = typer.Option(8.0, help="Voxel size of the coarse MNI grid (mm)."),
        repeat_runs: int = typer.Option(0, help="Extra runs repeating run 1's stimulus (noise ceiling)."),
        seed: int = typer.Option(0, help="Random seed."),
        record: bool = typer.Option(False, help="Also record gameplay per run (headless emulator, random agent)."),
        game: str = typer.Option("ALE/Pong-v5", help="Game of the recorded gameplay (with --record)."),
        faults: str = typer.Option("", help=FAULTS_HELP
                                   + " Truth: derivatives/truth/*_desc-truemotion_timeseries.tsv."),
    ) -> None:
        """Synthetic participant session: BIDS BOLD from a planted encoding model, features, atlas, truth."""
        from encoders.synth import SynthConfig, generate, write_bids

        def record_run(path: Path, seconds: float, run_seed: int) -> Path:
            # the headless recorder: a random controller plays, TR triggers every `tr` s of game time
            from services.emulator import record_headless
            from services.plumbing.game import GameSettings

            settings = GameSettings(game=game, seed=run_seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            record_headless(settings, int(seconds * 60 / settings.frameskip), path, controller="random",
                            controller_seed=run_seed, tr_s=tr, meta={"synthetic": "true", "run": path.name})
            return path

        fault_cfg = _faults_or_exit(faults)
        session = generate(SynthConfig(n_runs=runs, n_trs=trs, tr=tr, voxel_mm=voxel_mm, repeat_runs=repeat_runs,
                                       seed=seed))
        paths = write_bids(session, out, record=record_run if record else None, faults=fault_cfg)
        typer.echo(f"wrote {out}: {len(paths['bold'])} runs × {trs} TRs, {int(session.mask.sum())} voxels; "
                   f"truth in {out / 'derivatives' / 'truth'}")

    app.command()(preprocess)


def preprocess(
    bold: Path = typer.Argument(..., help="4-D BOLD run (NIfTI)."),
    out: Path = typer.Option(..., help="Folder for <run>_desc-realigned_bold.nii.gz, _desc-preproc_bold.nii.gz "
                                       "and _desc-confounds_timeseries.tsv."),
    reference: Optional[Path] = typer.Option(None, help="Reference volume on the run's grid (3-D NIfTI, or a 4-D "
                                                        "one's first volume); default: the first after the dummies."),
    causal: bool = typer.Option(False, help="Regress confounds causally, as live (each volume on the volumes "
                                            "up to it); default: on the whole run."),
    tr: Optional[float] = typer.Option(None, help="TR in s (default: the NIfTI header)."),
    dummy_scans: int = typer.Option(0, help="Volumes at the start to drop."),
    high_pass: float = typer.Option(1 / 128, help="Cut-off of the cosine drift basis, Hz (0 = no drift regressors)."),
    motion_correction: bool = typer.Option(True, help="Realign the volumes."),
    motion_regressors: bool = typer.Option(False, help="Also regress the 6 motion parameters (off by default: "
                                                       "fitted causally they remove signal; encoders/README.md)."),
    motion_derivatives: bool = typer.Option(False, help="Also regress the motion parameters' derivatives."),
    fwhm: float = typer.Option(0.0, help="Gaussian smoothing FWHM, mm (0 = off)."),
    standardize: bool = typer.Option(True, help="Standardise each voxel's residuals."),
    warmup: int = typer.Option(15, help="Causal: volumes after the dummies that are never scored."),
    fd_threshold: float = typer.Option(0.5, help="Censor volumes with framewise displacement above this, mm (0 = off)."),
    dvars_threshold: float = typer.Option(1.5, help="Censor volumes with DVARS above this multiple of the usual (0 = off)."),
    reslice_order: int = typer.Option(1, help="Spline order of the reslice (1 trilinear, 3 cubic)."),
) -> None:
    """Realign, censor and clean one BOLD run (offline; the same core as live)."""
    from encoders.data import FitInputError
    from encoders.preprocess import PreprocessConfig, preprocess_file

    confounds = ["constant"] + (["drift"] if high_pass > 0 else [])
    confounds += (["motion"] if motion_regressors else []) + (["motion_derivatives"] if motion_derivatives else [])
    try:
        cfg = PreprocessConfig(motion_correction=motion_correction, reference="given" if reference else "first",
                               dummy_scans=dummy_scans, high_pass_hz=high_pass, confounds=tuple(confounds),
                               smoothing_fwhm_mm=fwhm, standardize=standardize, warmup_trs=warmup,
                               fd_threshold_mm=fd_threshold, dvars_threshold=dvars_threshold,
                               reslice_order=reslice_order)
        result, written = preprocess_file(bold, out, cfg, reference=reference, causal=causal, tr=tr)
    except FitInputError as e:
        _fail(e)
    typer.echo(result.summary())
    for p in written:
        typer.echo(f"wrote {p}")
