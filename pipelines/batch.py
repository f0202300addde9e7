"""Batch scale-out on Ray: offline activation extraction (and per-subject encoding fits).

``neuroarcade extract`` turns many recorded sessions × agents (models) × prompt conditions into
per-run feature files that ``neuroarcade fit`` reads. One *job* is one recording × one agent
(all its prompt conditions run together, in one batched forward, as the live agent service runs
them). A job:

1. replays the recording bit-exactly (:func:`replay_frames`: the same ``GameEnv`` stepping the
   recorded actions as ``verify_replay``; every frame hash is checked, a mismatch fails the job);
2. feeds every ``stride``-th frame to the agent exactly as the agent service does (one
   :class:`~agents.base.Observation` per decision, the optional ``FrameWindow`` wrapper around it);
3. aligns each decision's pooled vectors to TRs with the live encoder's own ``TrAligner``
   (``encoders/align.py``: a decision belongs to the TR in which its newest frame was shown,
   mean per TR, empty TRs carry the previous row) using the recording's scanner triggers;
4. returns one (n_trs, dim) float32 matrix per (condition, pooling, layer).

Jobs run as Ray tasks (``ray.init(num_cpus=2)`` locally by default, ``address`` for a cluster)
or in-process (``sequential``); each job is a pure function of its inputs, so both give
identical bytes. The driver alone writes results: ``OUT/<run>/<space>.npy`` plus a
``<space>.json`` sidecar (provenance, which ``fit`` reads), each through a temp file and an
atomic rename, then records the job in ``OUT/manifest.json`` (also rewritten atomically). A
killed batch restarts where it stopped: a job whose manifest entry has the same fingerprint
(recording content hash + agent settings) and whose files exist is not recomputed.

On a cluster, recordings and model directories must be readable at the same paths on every
node (shared storage or the container image); the results travel back to the driver.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from agents.base import FrameRef
from agents.spec import AgentSpec, build_agent

MANIFEST = "manifest.json"


class ReplayError(RuntimeError):
    """A recording that does not replay bit-exactly (or cannot be replayed here)."""


# --- job description -----------------------------------------------------------------------------


def agent_record(spec: AgentSpec) -> dict:
    """The agent settings an extraction's results depend on, as its sidecars and job fingerprints record them:
    the settings extraction always had, under their names there (``transport`` is ``rpc`` without a server),
    plus any other setting not at its default.
    Settings a job sets itself (game, seed, threads, frame window: from the recording and ExtractConfig) and
    live-only ones are left out."""
    record = {"label": spec.agent_id, "kind": spec.kind, "model": spec.model, "conditions": spec.conditions,
              "layers": spec.layers, "poolings": spec.poolings, "rl_layers": spec.rl_layers, "device": spec.device,
              "server": spec.vllm_url, "transport": spec.vllm_transport if spec.vllm_url else "rpc"}
    covered = {"agent_id", "kind", "model", "conditions", "layers", "poolings", "rl_layers", "device", "vllm_url",
               "vllm_transport", "backend", "game", "seed", "torch_threads", "frame_window", "window_s", "role",
               "activations_endpoint"}
    for f in fields(spec):
        if f.name not in covered and getattr(spec, f.name) != f.default:
            record[f.name] = getattr(spec, f.name)
    return record


@dataclass(frozen=True)
class ExtractConfig:
    """How decisions are taken from a replayed recording and aligned to TRs."""

    stride: int = 1
    """Decide on every ``stride``-th frame (1 = every frame)."""
    window: int = 1
    """Frames per decision (>1 wraps the agent in FrameWindow, the paper's k=4)."""
    window_s: float = 1.5
    """Time span of the frame window (emulator seconds)."""
    tr: float | None = None
    """Nominal TR in s (None = median gap between the recording's triggers)."""
    seed: int = 0
    """Seed of a random-initialised RL network."""


@dataclass(frozen=True)
class Job:
    recording: str
    run: str
    """Output folder name of the recording (its file stem, made unique)."""
    agent: AgentSpec
    cfg: ExtractConfig

    @property
    def key(self) -> str:
        return f"{self.run}/{self.agent.agent_id}"


@dataclass
class JobResult:
    key: str
    features: dict[str, np.ndarray]
    """space name → (n_trs, dim) float32."""
    meta: dict[str, dict]
    """space name → sidecar (provenance)."""
    seconds: float = 0.0


# --- replay -------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes (identifies a recording's content for resume checks)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replay_frames(rec) -> Iterator[FrameRef]:
    """Re-run a recording headless (:func:`services.plumbing.game.replay_headless`, as ``verify_replay``)
    and yield every frame as agents see it. Raises :class:`ReplayError` on the first frame whose
    hash differs from the recorded one, or when the recording cannot be replayed here."""
    from services.plumbing.game import replay_headless

    try:
        for r, pixels, h, game in replay_headless(rec):
            if h != r.frame_hash:
                raise ReplayError(f"{rec.path}: replay diverged at seq {r.seq}: hash {h} != recorded {r.frame_hash}")
            yield FrameRef(r.seq, r.t_ns, pixels, game.pooled_gray, game.step_in_episode)
    except ValueError as e:
        raise ReplayError(f"{rec.path}: {e}") from None


def nominal_tr_s(rec, tr: float | None) -> float:
    if tr is not None:
        return float(tr)
    starts = sorted(t.t_ns for t in rec.triggers)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if not gaps:
        raise ReplayError(f"{rec.path}: fewer than 2 triggers; give the TR (--tr)")
    return statistics.median(gaps) / 1e9


# --- one job -------------------------------------------------------------------------------------


def job_agent(job: Job, game: str) -> AgentSpec:
    """The job's agent as extraction runs it: on the recording's game, seeded and windowed by the job's
    ExtractConfig, 1 torch thread (as the live agent service)."""
    return replace(job.agent, game=game, seed=job.cfg.seed, torch_threads=1, frame_window=job.cfg.window,
                   window_s=job.cfg.window_s)


def space_name(label: str, condition: str, pooling: str, layer: int) -> str:
    parts = [label] + ([condition] if condition else []) + [pooling, f"l{layer}"]
    return "_".join(parts)


def run_job(job: Job) -> JobResult:
    """Replay one recording through one agent and align its activations to TRs (pure, deterministic)."""
    from agents.base import Observation
    from encoders.align import TrAligner
    from services.plumbing.recording import read_recording

    t0 = time.perf_counter()
    rec = read_recording(job.recording)
    if not rec.triggers:
        raise ReplayError(f"{job.recording}: no scanner triggers in the recording; cannot align frames to TRs")
    tr_s = nominal_tr_s(rec, job.cfg.tr)
    triggers = sorted(rec.triggers, key=lambda t: t.tr_index)
    n_trs = triggers[-1].tr_index + 1
    agent = build_agent(job_agent(job, rec.header.game))
    meanings = tuple(rec.header.action_meanings)
    # (condition, pooling, layer) → list of (vector, frame_t_ns)
    streams: dict[tuple[str, str, int], tuple[list[np.ndarray], list[int]]] = {}
    decisions = frames = 0
    skipped: list[FrameRef] = []  # frames the stride passes over: history for frame stacks, as live
    try:
        for i, frame in enumerate(replay_frames(rec)):
            frames += 1
            if i % job.cfg.stride:
                skipped.append(frame)
                continue
            decision = agent.infer(Observation((frame,), meanings, 0, skipped=tuple(skipped[-64:])))
            skipped.clear()
            if decision is None:
                continue
            decisions += 1
            for a in decision.activations:
                for row, layer in enumerate(a.layers):
                    vecs, times = streams.setdefault((a.condition, a.pooling, int(layer)), ([], []))
                    vecs.append(np.asarray(a.vectors[row]))
                    times.append(decision.frame_t_ns)
    finally:
        _close_backend(agent)
    features, meta = {}, {}
    digest = file_digest(job.recording)
    for (condition, pooling, layer), (vecs, times) in sorted(streams.items()):
        aligner = TrAligner(dim=vecs[0].shape[0], tr_ns=int(round(tr_s * 1e9)))
        for t in triggers:
            aligner.add_trigger(t.tr_index, t.t_ns)
        for v, t in zip(vecs, times):
            aligner.add(v, t)
        rows = np.stack([aligner.close(t) for t in range(n_trs)]).astype(np.float32)
        name = space_name(job.agent.agent_id, condition, pooling, layer)
        features[name] = rows
        meta[name] = {
            "space": name, "model": agent.name, "layer": layer, "condition": condition, "pooling": pooling,
            "agent": agent_record(job.agent), "extract": asdict(job.cfg), "tr": tr_s, "n_trs": n_trs,
            "dim": int(rows.shape[1]), "dtype": str(vecs[0].dtype),
            "recording": str(job.recording), "recording_xxh3": digest, "session_id": rec.header.session_id,
            "recording_meta": dict(rec.header.meta), "game": rec.header.game,
            "frames_replayed": frames, "frames_verified": frames, "decisions": decisions,
            "align": asdict(aligner.counts),
            "rule": "mean of decisions whose newest frame was shown in the TR; empty TRs carry the last row",
        }
    return JobResult(job.key, features, meta, time.perf_counter() - t0)


def _close_backend(agent) -> None:
    """Close a vLLM client/engine behind the agent (wrappers such as FrameWindow forward to ``inner``)."""
    while hasattr(agent, "inner"):
        agent = agent.inner
    close = getattr(getattr(agent, "backend", None), "close", None)
    if close:
        close()


# --- planning, resume, atomic writes -----------------------------------------------------------


def plan_jobs(recordings: list[str | os.PathLike], agents: list[AgentSpec], cfg: ExtractConfig) -> list[Job]:
    """One job per recording × agent; run names are recording stems, made unique with a suffix."""
    labels = [a.agent_id for a in agents]
    dup = {label for label in labels if labels.count(label) > 1}
    if dup:
        raise ValueError(f"agent labels must be unique; repeated: {sorted(dup)} (name them LABEL=KIND:MODEL)")
    runs: dict[str, str] = {}
    jobs = []
    for r in recordings:
        path = str(Path(r))
        if not Path(path).is_file():
            raise FileNotFoundError(f"recording {path} does not exist")
        stem = Path(path).name.removesuffix(".narec")
        run, n = stem, 1
        while run in runs.values():
            n += 1
            run = f"{stem}-{n}"
        runs[path] = run
        jobs.extend(Job(path, run, a, cfg) for a in agents)
    return jobs


@functools.lru_cache(maxsize=4096)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def job_fingerprint(job: Job) -> str:
    """What a finished job's results depend on: recording bytes, agent settings, extraction settings."""
    st = os.stat(job.recording)
    digest = _cached_digest(job.recording, st.st_size, st.st_mtime_ns)  # one hash per file, not per agent
    payload = json.dumps({"recording": digest, "agent": agent_record(job.agent),
                          "cfg": asdict(job.cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over the target: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class Manifest:
    """``OUT/manifest.json``: finished jobs (files, fingerprint, time). Only the driver writes it."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST
        self.jobs: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.jobs = json.loads(self.path.read_text()).get("jobs", {})
            except ValueError:
                self.jobs = {}  # unreadable (cannot happen with atomic writes): recompute everything

    def is_done(self, job: Job, fingerprint: str, out: Path) -> bool:
        entry = self.jobs.get(job.key)
        return (entry is not None and entry.get("fingerprint") == fingerprint
                and all((out / f).is_file() for f in entry.get("files", [])))

    def record(self, job: Job, fingerprint: str, files: list[str], seconds: float) -> None:
        self.jobs[job.key] = {"fingerprint": fingerprint, "recording": job.recording, "agent": job.agent.agent_id,
                              "files": files, "seconds": round(seconds, 3),
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(self.path, json.dumps({"version": 1, "jobs": self.jobs}, indent=1).encode())


def write_result(out: Path, job: Job, result: JobResult) -> list[str]:
    """Write a job's feature files (each atomically); returns their paths relative to ``out``."""
    files = []
    for name, rows in result.features.items():
        base = out / job.run / name
        atomic_write_bytes(base.with_suffix(".npy"), _npy_bytes(rows))
        atomic_write_bytes(base.with_suffix(".json"), json.dumps(result.meta[name], indent=1).encode())
        files += [f"{job.run}/{name}.npy", f"{job.run}/{name}.json"]
    return files


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    jobs: int
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def init_ray(address: str | None, num_cpus: int = 2, object_store_mb: int = 100):
    """Connect to a cluster (``address``) or start a small local Ray instance (2 CPUs, capped memory)."""
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=object_store_mb * 1024 * 1024)
    return ray


def _ray_run_job(job: Job) -> JobResult:
    return run_job(job)


def run_batch(jobs: list[Job], out: str | os.PathLike, *, sequential: bool = False, address: str | None = None,
              num_cpus: int = 2, progress: bool = True, on_done: Callable[[str], None] | None = None) -> BatchSummary:
    """Run every job not already finished (per the manifest), writing results as each completes.

    ``sequential``: in this process, in order; otherwise as Ray tasks (local instance or ``address``).
    A failed job is reported and left out of the manifest (a rerun retries it); the others go on.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    summary = BatchSummary(jobs=len(jobs))
    t0 = time.perf_counter()
    todo: list[tuple[Job, str]] = []
    for job in jobs:
        fp = job_fingerprint(job)
        if manifest.is_done(job, fp, out):
            summary.skipped.append(job.key)
        else:
            todo.append((job, fp))

    def finish(job: Job, fp: str, result: JobResult) -> None:
        files = write_result(out, job, result)
        manifest.record(job, fp, files, result.seconds)
        summary.computed.append(job.key)
        if on_done:
            on_done(job.key)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"extract ({'sequential' if sequential else 'ray'})", total=len(jobs),
                            completed=len(summary.skipped))
        if sequential:
            for job, fp in todo:
                try:
                    finish(job, fp, run_job(job))
                except Exception as e:  # one bad recording never stops the batch
                    summary.failed[job.key] = f"{type(e).__name__}: {e}"
                bar.advance(task)
        elif todo:
            ray = init_ray(address, num_cpus)
            remote = ray.remote(num_cpus=1, max_retries=0)(_ray_run_job)
            pending = {remote.remote(job): (job, fp) for job, fp in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job, fp = pending.pop(done[0])
                try:
                    finish(job, fp, ray.get(done[0]))
                except Exception as e:
                    summary.failed[job.key] = f"{type(e).__name__}: {e}"
                bar.advance(task)
    summary.seconds = time.perf_counter() - t0
    return summary


# --- encoding fits per subject -------------------------------------------------------------------


@dataclass(frozen=True)
class FitJob:
    bids: str
    subject: str
    task: str | None
    spaces: tuple[str, ...] | None
    out: str
    fit_options: dict = field(default_factory=dict, hash=False, compare=False)
    """Keyword arguments of ``encoders.fit.FitConfig``."""


def run_fit_job(job: FitJob) -> dict:
    """Fit one subject through :func:`pipelines.fit.run_fit` (weights only, no reports); return a summary."""
    from encoders.fit import FitConfig
    from pipelines.fit import FitRunConfig, run_fit

    opts = dict(job.fit_options)
    if "alphas" in opts:
        opts["alphas"] = np.asarray(opts["alphas"])
    summary = run_fit(FitRunConfig(out=Path(job.out), bids=job.bids, subject=job.subject, task=job.task,
                                   select=job.spaces, fit=FitConfig(progress=False, **opts), reports=False,
                                   record_subject=True, record_feature_files=False))
    return {"subject": job.subject, "weights": str(summary.weights), "runs": summary.runs, "voxels": summary.voxels,
            "mean_cv_r": summary.mean_cv_r}


def run_fit_batch(jobs: list[FitJob], *, sequential: bool = False, address: str | None = None, num_cpus: int = 2,
                  gpus_per_fit: float = 0.0, progress: bool = True) -> dict[str, dict | str]:
    """Fit every subject whose weights file does not exist yet; Ray tasks unless ``sequential``.

    ``gpus_per_fit`` > 0 asks Ray for a GPU per fit (use with ``backend="torch_cuda"``).
    Returns subject → summary dict, ``"skipped"`` or an error string.
    """
    from rich.progress import Progress

    results: dict[str, dict | str] = {}
    todo = []
    for job in jobs:
        if Path(job.out).is_file():
            results[job.subject] = "skipped"
        else:
            todo.append(job)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("fit subjects", total=len(jobs), completed=len(jobs) - len(todo))
        if sequential:
            for job in todo:
                try:
                    results[job.subject] = run_fit_job(job)
                except Exception as e:
                    results[job.subject] = f"{type(e).__name__}: {e}"
                bar.advance(task)
        elif todo:
            ray = init_ray(address, num_cpus)
            remote = ray.remote(num_cpus=1, num_gpus=gpus_per_fit, max_retries=0)(run_fit_job)
            pending = {remote.remote(job): job for job in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    results[job.subject] = ray.get(done[0])
                except Exception as e:
                    results[job.subject] = f"{type(e).__name__}: {e}"
                bar.advance(task)
    return results


# --- scoring a replayed run offline ----------------------------------------------------------------


@dataclass
class RunScore:
    """One stream's run scored offline against the measured BOLD (``replay-session --batch``), the way the
    live encoding service scores it."""

    roi_names: list[str]
    """'all' first, then the weights' ROIs (``encoders.weights.roi_table``)."""
    predicted: np.ndarray
    """(T', R) ROI means of the prediction at the scored TRs."""
    measured: np.ndarray
    """(T', R) ROI means of the measured BOLD at the scored TRs: preprocessed as the weights record (the live
    core's causal cleaning), or per-voxel z-scored over the run when the weights record no preprocessing."""
    scored_trs: np.ndarray
    """(T',) int TRs scored (the others excluded by the preprocessing: warm-up, censored, unusable)."""
    n_trs: int
    """TRs of the run considered (features and volumes both present)."""
    live: object | None = None
    """The ``encoders.stream.LivePreprocess`` that cleaned the run (trace, counts, alignment, tSNR; ``write_qc``);
    None without preprocessing."""


def measured_series(weights, bold_img, n: int, *, align: bool = True):
    """The measured BOLD of the first ``n`` volumes of ``bold_img`` (4-D nibabel image) as the live service
    scores it against ``weights``: ``(measured (T', V) float32, scored TRs (T',) int, LivePreprocess or None)``.

    With a preprocessing record in the weights, every volume goes through ONE ``encoders.stream.LivePreprocess``
    in acquisition order, exactly as ``EncodingCore.on_volume`` feeds it live (its affine from the image;
    registered to the weights' reference when they keep one and ``align``), and the TRs it excludes are left
    out. Without one (mode ``none``), the measured voxels are z-scored over the run, every TR kept."""
    from encoders.stream import LivePreprocess

    if weights.preprocess_mode == "none":
        measured = np.asarray(bold_img.dataobj[..., :n], dtype=np.float32)[weights.mask].T
        return (measured - measured.mean(0)) / (measured.std(0) + 1e-9), np.arange(n), None
    live = LivePreprocess(weights, align=align)
    rows, kept = [], []
    for t in range(n):
        out = live.push(t, np.asarray(bold_img.dataobj[..., t], dtype=np.float32), t * weights.tr,
                        np.asarray(bold_img.affine, float))
        if not out.excluded:
            rows.append(out.data)
            kept.append(t)
    measured = np.stack(rows) if rows else np.zeros((0, weights.n_voxels), np.float32)
    return measured, np.asarray(kept, int), live


def score_run(weights, features: list[np.ndarray], bold_img, *, align: bool = True) -> RunScore:
    """Predict one run from its raw feature rows (one (T, dim) array per space of ``weights``) and ROI-average
    the prediction and the measured BOLD of ``bold_img`` (:func:`measured_series`) at the scored TRs: the r
    of these series is the live service's running r at the run's end."""
    from encoders.weights import roi_table

    n = min(min(len(f) for f in features), int(bold_img.shape[3]))
    pred = weights.predict([np.asarray(f)[:n] for f in features])
    measured, keep, live = measured_series(weights, bold_img, n, align=align)
    table = roi_table(weights)
    return RunScore([name for name, _ in table], roi_means(pred[keep], table), roi_means(measured, table), keep, n,
                    live)


def roi_means(values: np.ndarray, table: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """(T, R) float32 means of ``values`` (T, V) over each ROI of ``table`` (``encoders.weights.roi_table``)."""
    if not len(values):
        return np.zeros((0, len(table)), np.float32)
    return np.stack([values[:, idx].mean(1) for _, idx in table], 1).astype(np.float32)
