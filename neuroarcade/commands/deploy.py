"""Deployment and batch commands: `health` (container probes), `extract` and `fit-subjects` (Ray batches).

Heavy imports stay inside the functions so `neuroarcade --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import typer

HEALTH_CHECKS = ("heartbeat", "status", "handshake", "http")


def register(app: typer.Typer) -> None:
    app.command()(health)

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False, help=EXTRACT_HELP + "\n\nRun `neuroarcade extract --help` for all flags.")
    def extract(ctx: typer.Context) -> None:
        extract_main(list(ctx.args), defaults=ctx.default_map or {})

    @app.command("fit-subjects", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False,
                 help=FIT_SUBJECTS_HELP + "\n\nRun `neuroarcade fit-subjects --help` for all flags.")
    def fit_subjects(ctx: typer.Context) -> None:
        fit_subjects_main(list(ctx.args), defaults=ctx.default_map or {})


# --- health ------------------------------------------------------------------------------------


def health(
    endpoint: str = typer.Option(..., help="Endpoint of the service to probe (tcp://host:port, ipc://…, or an "
                                           "http(s):// URL with --check http)."),
    check: str = typer.Option("handshake", help="heartbeat: Heartbeat to a ROUTER, wait for its echo (emulator "
                                                "control); status: wait for a Status on the PUB's heartbeat topic "
                                                "(emulator frames); handshake: a ZMTP handshake completes with the "
                                                "PUB/XPUB (or ROUTER with --socket dealer) bound there; http: GET "
                                                "returns 2xx."),
    socket: str = typer.Option("sub", help="handshake: our socket type, sub (for PUB/XPUB) or dealer (for ROUTER)."),
    service: str = typer.Option("", help="status: require Status.service to be this name."),
    timeout: float = typer.Option(3.0, help="Seconds to wait for an answer."),
    curve_secret: str = typer.Option("", help="CURVE: our *.key_secret file (when the service runs CURVE)."),
    curve_server: str = typer.Option("", help="CURVE: the service's *.key public key file."),
    token: str = typer.Option("", envvar="NEUROARCADE_TOKEN", help="http: access token (x-neuroarcade-token)."),
    quiet: bool = typer.Option(False, help="Print nothing; the exit code says it (0 healthy, 1 not)."),
) -> None:
    """Probe a service (for container readiness/liveness): exit 0 when it answers within --timeout, else 1."""
    if check not in HEALTH_CHECKS:
        raise typer.BadParameter(f"--check must be one of {HEALTH_CHECKS}")
    if socket not in ("sub", "dealer"):
        raise typer.BadParameter("--socket must be sub or dealer")
    from services.plumbing.health import HealthError, probe

    try:
        detail = probe(endpoint, check, timeout_s=timeout, socket_kind=socket, service=service,
                       secret_key=curve_secret, server_key=curve_server, token=token)
    except HealthError as e:
        if not quiet:
            typer.echo(f"unhealthy: {endpoint}: {e}", err=True)
        raise typer.Exit(1) from None
    if not quiet:
        typer.echo(json.dumps({"healthy": True, "endpoint": endpoint, "check": check, **detail}))


# --- extract -----------------------------------------------------------------------------------

EXTRACT_HELP = """Offline activation extraction for many recorded sessions × agents × prompt conditions, on Ray.

  neuroarcade extract --recordings R1.narec R2.narec … --agent rl vlm:/models/tiny-vlm \\
                      --conditions action reasoning --out FEATURES [--address ray://head:10001]

Each recording is replayed bit-exactly (every frame hash checked) and its frames go through the agent as
in the live agent service; activations are aligned to TRs with the encoder's own rule. Writes
FEATURES/<run>/<space>.npy (one row per TR) + <space>.json (provenance) for `neuroarcade fit`, and
FEATURES/manifest.json: a killed batch resumes without recomputing finished runs."""


def _extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroarcade extract", description=EXTRACT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", nargs="+", type=Path, required=True, help="session recordings (*.narec)")
    p.add_argument("--agent", nargs="+", default=["rl"], metavar="SPEC",
                   help="agents: KIND[:MODEL[@SERVER]] or LABEL=KIND:MODEL[@SERVER], KIND rl|vlm (rl without MODEL: "
                        "seeded random Nature-CNN; MODEL for rl: a checkpoint; @SERVER: a vLLM server URL that "
                        "holds the VLM, e.g. vlm:Qwen/Qwen2.5-VL-7B-Instruct@http://vllm-vlm:8000)")
    p.add_argument("--vllm-transport", default="rpc", choices=["rpc", "shm"],
                   help="with @SERVER: activations over HTTP (rpc) or a /dev/shm shared with the server (shm)")
    p.add_argument("--conditions", nargs="+", default=["action"], help="VLM prompt conditions (one batched forward)")
    p.add_argument("--layers", nargs="+", type=int, help="VLM hidden-state entries to keep (default all)")
    p.add_argument("--poolings", nargs="+", default=["last_token", "mean_image"], help="VLM poolings")
    p.add_argument("--rl-layers", nargs="+", default=["penultimate"], help="RL layers: penultimate conv1 conv2 conv3")
    p.add_argument("--device", default="cpu", help="torch device of the VLM (cpu, cuda)")
    p.add_argument("--stride", type=int, default=1, help="decide on every N-th frame")
    p.add_argument("--window", type=int, default=1, help="frames per decision (FrameWindow; the paper uses 4)")
    p.add_argument("--window-s", type=float, default=1.5, help="span of the frame window, s")
    p.add_argument("--tr", type=float, help="nominal TR in s (default: median trigger gap)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-initialised RL network")
    p.add_argument("--out", type=Path, required=True, help="output folder (features + manifest)")
    p.add_argument("--address", help="Ray cluster address (ray://head:10001 or auto); default: a local instance")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--sequential", action="store_true", help="run in this process, no Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str], defaults: dict) -> argparse.Namespace:
    """argparse with defaults from the pipeline config's command table (``[extract] out = …``)."""
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        parser.error(f"config table has unknown option(s) {unknown}")
    parser.set_defaults(**defaults)
    for a in parser._actions:  # a config value satisfies a required option
        if a.dest in defaults:
            a.required = False
    return parser.parse_args(argv)


def extract_main(argv: list[str], defaults: dict | None = None) -> None:
    from rich.console import Console

    from agents.spec import AgentSpec
    from pipelines.batch import ExtractConfig, plan_jobs, run_batch

    args = _parse(_extract_parser(), argv, defaults or {})
    console = Console(stderr=True)
    settings = dict(conditions=tuple(args.conditions), layers=tuple(args.layers) if args.layers else None,
                    poolings=tuple(args.poolings), rl_layers=tuple(args.rl_layers), device=args.device,
                    transport=args.vllm_transport)
    try:
        agents = [AgentSpec.parse(s, **settings) for s in args.agent]
        cfg = ExtractConfig(stride=max(1, args.stride), window=max(1, args.window), window_s=args.window_s,
                            tr=args.tr, seed=args.seed)
        jobs = plan_jobs([str(r) for r in args.recordings], agents, cfg)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"error: {e}")
        raise SystemExit(2) from None
    summary = run_batch(jobs, args.out, sequential=args.sequential, address=args.address, num_cpus=args.num_cpus,
                        progress=not args.quiet)
    for key, err in summary.failed.items():
        console.print(f"[red]failed[/red] {key}: {err}")
    print(json.dumps({"jobs": summary.jobs, "computed": len(summary.computed), "skipped": len(summary.skipped),
                      "failed": len(summary.failed), "seconds": round(summary.seconds, 2), "out": str(args.out)}))
    if summary.failed:
        raise SystemExit(1)


# --- fit-subjects ------------------------------------------------------------------------------

FIT_SUBJECTS_HELP = """Encoding fits for many subjects of a BIDS dataset as Ray tasks (one `neuroarcade fit` each).

  neuroarcade fit-subjects --bids DATASET --subjects 01 02 … --out WEIGHTS_DIR [--backend torch_cuda --gpus 1]

Writes WEIGHTS_DIR/sub-<label>.safetensors per subject; subjects whose weights exist are skipped."""


def _fit_subjects_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroarcade fit-subjects", description=FIT_SUBJECTS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bids", type=Path, required=True, help="BIDS dataset root (features in derivatives/features)")
    p.add_argument("--subjects", nargs="+", required=True, help="subject labels (without sub-)")
    p.add_argument("--task", help="BIDS task label")
    p.add_argument("--spaces", nargs="+", help="feature spaces to fit (default all)")
    p.add_argument("--out", type=Path, required=True, help="folder for sub-<label>.safetensors")
    p.add_argument("--delays", nargs="+", type=int, default=[1, 2, 3, 4], help="FIR delays in TRs")
    p.add_argument("--pca", type=int, help="reduce each feature space to K principal components")
    p.add_argument("--alphas", nargs="+", type=float, help="ridge penalties")
    p.add_argument("--backend", default="numpy", choices=["numpy", "torch", "torch_cuda", "cupy"])
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads per fit")
    p.add_argument("--no-score", action="store_true", help="skip nested CV scores")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs Ray gives each fit (with --backend torch_cuda)")
    p.add_argument("--address", help="Ray cluster address; default: a local instance")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--sequential", action="store_true", help="run in this process, no Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def fit_subjects_main(argv: list[str], defaults: dict | None = None) -> None:
    from pipelines.batch import FitJob, run_fit_batch

    args = _parse(_fit_subjects_parser(), argv, defaults or {})
    options = {"delays": args.delays, "pca": args.pca, "backend": args.backend, "blas_threads": args.threads,
               "score": not args.no_score}
    if args.alphas:
        options["alphas"] = list(args.alphas)
    jobs = [FitJob(bids=str(args.bids), subject=s.removeprefix("sub-"), task=args.task,
                   spaces=tuple(args.spaces) if args.spaces else None,
                   out=str(args.out / f"sub-{s.removeprefix('sub-')}.safetensors"), fit_options=options)
            for s in args.subjects]
    results = run_fit_batch(jobs, sequential=args.sequential, address=args.address, num_cpus=args.num_cpus,
                            gpus_per_fit=args.gpus, progress=not args.quiet)
    print(json.dumps(results))
    if any(isinstance(v, str) and v != "skipped" for v in results.values()):
        sys.exit(1)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The argparse-backed commands of this module (deployment checks validate container commands with them)."""
    return {"extract": _extract_parser(), "fit-subjects": _fit_subjects_parser()}

