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

Several feature spaces (--features plus --space NAME F1 F2 …, or several spaces in --bids) are fitted
jointly with banded ridge; with two spaces --partition adds variance partitioning."""


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroarcade fit", description=FIT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bold", nargs="+", type=Path, default=[], help="4D BOLD runs (NIfTI), one per run")
    p.add_argument("--features", nargs="+", type=Path, default=[],
                   help="feature matrices (.npy, one row per TR), one per run, same order as --bold")
    p.add_argument("--space", nargs="+", action="append", default=[], metavar=("NAME", "F"),
                   help="another feature space: its name then one .npy per run (repeatable)")
    p.add_argument("--bids", type=Path, help="BIDS dataset root (instead of --bold/--features)")
    p.add_argument("--sub", help="BIDS subject label (with --bids)")
    p.add_argument("--task", help="BIDS task label (with --bids)")
    p.add_argument("--spaces", nargs="+", help="with --bids: which feature spaces to fit (default all)")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--tr", type=float, help="repetition time in s (default: sidecar JSON / NIfTI header)")
    p.add_argument("--mask", type=Path, help="brain mask NIfTI (default: voxels varying in every run)")
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

    from encoders.data import FitInputError, bids_runs, load_atlas, load_bold, load_feature_runs
    from encoders.fit import FitConfig, fit_encoding, partition_variance

    console = Console(stderr=True)
    if args.bids:
        bold_paths, space_files = bids_runs(args.bids, args.sub, args.task)
        if args.spaces:
            missing = set(args.spaces) - set(space_files)
            if missing:
                raise FitInputError(f"--spaces {sorted(missing)} not found; dataset has {sorted(space_files)}")
            space_files = {k: space_files[k] for k in args.spaces}
    else:
        if not args.bold or not args.features:
            raise FitInputError("give --bold and --features (or --bids)")
        bold_paths = args.bold
        space_files = {"": args.features}
        for name, *files in args.space:
            space_files[name] = [Path(f) for f in files]
    if args.partition and len(space_files) != 2:  # before the fit, not after it
        raise FitInputError(f"--partition needs exactly two feature spaces, have {len(space_files)}")
    bold = load_bold(bold_paths, args.mask, args.tr)
    if args.partition and len(bold.runs) < 2:
        raise FitInputError("--partition needs ≥2 runs (its scores are leave-one-run-out)")
    features: dict[str, list[np.ndarray]] = {}
    provenance: dict[str, dict] = {}
    for name, files in space_files.items():
        try:
            runs, meta = load_feature_runs(files, bold)
        except FitInputError as e:
            if args.bids:  # the message names the dataset's files
                raise
            raise FitInputError(f"{f'--space {name}' if name else '--features'}: {e}") from None
        name = name or meta.get("space") or "features"
        features[name] = runs
        provenance[name] = {
            "model": args.model if args.model is not None else meta.get("model", ""),
            "layer": args.layer if args.layer is not None else meta.get("layer"),
            "condition": args.condition if args.condition is not None else meta.get("condition", ""),
            "pooling": args.pooling if args.pooling is not None else meta.get("pooling", ""),
        }
    roi_labels, roi_names = (None, {})
    if args.atlas:
        roi_labels, roi_names = load_atlas(args.atlas, args.atlas_labels, bold.mask, bold.affine)
    cfg = FitConfig(delays=args.delays, pca=args.pca, backend=args.backend, blas_threads=args.threads,
                    score=not args.no_score, n_permutations=args.permutations, fdr_q=args.fdr,
                    progress=not args.quiet, **({"alphas": np.asarray(args.alphas)} if args.alphas else {}))
    res = fit_encoding(bold.runs, features, cfg, mask=bold.mask, affine=bold.affine, tr=bold.tr,
                       provenance=provenance, roi_labels=roi_labels, roi_names=roi_names,
                       atlas=args.atlas.name if args.atlas else "",
                       extra_provenance={"bold": [str(p) for p in bold.paths],
                                         "features": {k: [str(f) for f in v] for k, v in space_files.items()}})
    for warning in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    try:
        out = res.weights.save(args.out)
    except OSError as e:  # a read-only folder, a full disk: the reports beside it would fail alike
        raise FitInputError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    rows = roi_summary(res, roi_labels, roi_names)
    partition = None
    if args.partition:
        (na, ra), (nb, rb) = features.items()
        parts = partition_variance(bold.runs, (na, ra), (nb, rb), cfg)
        partition = {f"unique_{na}": parts["unique_a"], f"unique_{nb}": parts["unique_b"], "shared": parts["shared"]}
        for row, idx in zip(rows, _roi_indices(roi_labels, roi_names, len(bold.runs[0][0]))):
            row.update({k: float(v[idx].mean()) for k, v in partition.items()})
    written = [out, *write_fit_reports(out, res, rows, partition)]
    table = Table(title=f"fit: {len(bold.runs)} runs, {bold.runs[0].shape[1]} voxels, TR {bold.tr:g} s")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)
    for p in written:
        console.print(f"wrote {p}")


def _roi_indices(roi_labels, roi_names, n_vox):
    import numpy as np

    out = [np.arange(n_vox)]
    if roi_labels is not None:
        for label in sorted(int(v) for v in np.unique(roi_labels) if v != 0):
            out.append(np.flatnonzero(roi_labels == label))
    return out


def roi_summary(res, roi_labels, roi_names) -> list[dict]:
    """Per ROI ('all' first): voxels, mean CV r and R², share significant, noise ceiling."""
    import numpy as np

    names = ["all"]
    if roi_labels is not None:
        names += [roi_names.get(label, f"roi{label}") for label in sorted(int(v) for v in np.unique(roi_labels) if v)]
    rows = []
    for name, idx in zip(names, _roi_indices(roi_labels, roi_names, res.weights.n_voxels)):
        row: dict = {"roi": name, "n_voxels": len(idx)}
        if res.cv_r is not None:
            row["cv_r"] = float(res.cv_r[idx].mean())
            row["cv_r2"] = float(res.cv_r2[idx].mean())
        if res.significant is not None:
            row["frac_significant"] = float(res.significant[idx].mean())
        if res.noise_ceiling is not None:
            row["noise_ceiling"] = float(res.noise_ceiling[idx].mean())
        rows.append(row)
    return rows


def write_fit_reports(weights_path: Path, res, rows: list[dict], partition) -> list[Path]:
    """Beside the weights: ROI table (TSV) and per-voxel maps (NIfTI) of the CV scores."""
    import nibabel as nib

    stem = weights_path.with_suffix("")
    written = []
    tsv = Path(f"{stem}_scores.tsv")
    cols = list(rows[0])
    for r in rows:
        cols += [c for c in r if c not in cols]
    tsv.write_text("\t".join(cols) + "\n" + "".join(
        "\t".join(f"{r.get(c, float('nan')):.6g}" if not isinstance(r.get(c), str) else r[c] for c in cols) + "\n"
        for r in rows))
    written.append(tsv)
    w = res.weights
    maps = {"cv_r": res.cv_r, "cv_r2": res.cv_r2, "q": res.q_values, "noise_ceiling": res.noise_ceiling}
    if partition is not None:
        maps |= partition
    for name, values in maps.items():
        if values is not None:
            path = Path(f"{stem}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(w.to_volume(values), w.affine), path)
            written.append(path)
    return written


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
    ) -> None:
        """Stream BOLD volumes over ZMQ from a recorded run, a live export folder, or a simulated scanner."""
        import threading

        import zmq

        from services.scanner import (FolderSource, RecordedSource, SimulatedScannerConfig, publish_stream,
                                      run_simulated_scanner)

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
                                              wait_subscribers=wait_subscribers, curve=curve)
                sim = threading.Thread(target=run_simulated_scanner, args=(scfg, ctx), daemon=True)
                sim.start()
            src = FolderSource(folder, tr=(tr or 2.0) / (speed or 1.0), n_volumes=n_volumes)
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
        import logging

        curve = _curve_or_exit(curve_secret, curve_allow, curve_server_key, binds=[predictions],
                               connects=[*activations, *bold])

        from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service
        from services.plumbing.metrics import JsonFormatter

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if log_json:
            for handler in logging.getLogger().handlers:
                handler.setFormatter(JsonFormatter())
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

        session = generate(SynthConfig(n_runs=runs, n_trs=trs, tr=tr, voxel_mm=voxel_mm, repeat_runs=repeat_runs,
                                       seed=seed))
        paths = write_bids(session, out, record=record_run if record else None)
        typer.echo(f"wrote {out}: {len(paths['bold'])} runs × {trs} TRs, {int(session.mask.sum())} voxels; "
                   f"truth in {out / 'derivatives' / 'truth'}")
