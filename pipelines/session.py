"""Participant sessions: make a synthetic one, replay one with model agents, score them.

A *participant session* is a BIDS run (measured BOLD) plus the gameplay recording of what the
participant saw (``sourcedata/gamelogs``, linked from ``_events.tsv``), plus pre-fit encoding
weights per agent and prompt condition (``derivatives/weights/<agent>__<condition>.safetensors``).

``replay_session`` replays such a run with N model agents watching the bit-identical frames:

- at the recorded pace (live machinery, the default): the emulator replays the recording and
  re-emits its scanner triggers; agents run in their own processes as observers; the measured
  volumes go out as each TR completes (``scanner.run_trigger_paced``); one encoding service per
  weights file predicts and scores each TR; the dashboard can watch it all;
- as fast as possible (``batch``): each run is replayed offline through each agent (every frame
  hash checked, ``pipelines.batch.run_job``), features are aligned to TRs by the same rule, the
  weights predict, and the prediction is scored against the measured BOLD.

Either way the run folder gets ``<agent>__<condition>_scores.tsv`` (per ROI), predicted NIfTIs,
the atlas, ``partition.tsv`` from the fit, ``latency.json`` and a ``report.html``.

``make_participant`` builds the synthetic participant the demo and tests use: gameplay recorded
headless, the tiny VLM's and the RL agent's activations extracted from it, BOLD planted on the
VLM's action- and reasoning-prompt features with known per-ROI unique-action, unique-reasoning
and shared parts (``encoders.plant.PLANT``, recorded in ``derivatives/truth/planted.json``),
and weights fitted on all runs but the last, which is left for the replay. A replay of the
held-out run then reports, per stream and ROI, the planted r beside the recovered r and its
block-permutation chance band (``recovery.tsv``).
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from encoders.faults import FaultConfig
from encoders.plant import PLANT
from services.plumbing.transport import free_tcp_endpoint

# (agent id, kind, prompt conditions) of the default agents of a session
DEMO_GAME = "ALE/Breakout-v5"
"""The demo's game: the one with a trained RL checkpoint shipped (agents/checkpoints/breakout.md), so the
RL stream is an agent that plays, not a random network."""
DEFAULT_AGENTS = (("rl-0", "rl", ()), ("vlm-0", "vlm", ("action", "reasoning")))
STEP_HZ = 15  # frames per second of the default games (60 Hz / frameskip 4)
TINY_INIT_STD = 0.12
"""Weight std of the participant's tiny VLM (``agents.tiny.TinyConfig.init_std``): content-dependent
attention, so its action and reasoning prompts read different things from the frames. At the default
0.02 their pooled states correlate at r ≈ 0.997 and nothing is unique to either; at 0.15 they are
more distinct, but the action prompt's unique part then depends on which frames of a TR were sampled
(r 0.30 between 3 and 15 decisions per TR, 0.52 at 0.12), which a live replay does not reproduce."""
PLANTED_STREAMS = {"vlm-0__action": "action", "vlm-0__reasoning": "reasoning"}
"""Streams the BOLD is planted on → their prompt condition."""


@dataclass
class ParticipantConfig:
    """Size and truth of a synthetic participant whose BOLD is planted on agent features."""

    game: str = DEMO_GAME
    runs: int = 4
    """Runs; the last one is held out (weights and the variance partition are fitted on the others)
    for the replay. Three training runs of 60 TRs bring the planted partition back with the right sign
    in every ROI; two did not (a joint model of 48 columns on 60 TRs per fold overfits)."""
    trs: int = 60
    """Volumes per run (2 min at TR 2 s: the held-out run is what the demo replays)."""
    tr: float = 2.0
    voxel_mm: float = 10.0
    """Voxel size of the coarse MNI brain grid (10 mm → ~2k voxels)."""
    pca: int = 6
    """Feature dimensions kept (PCA) for planting and for the fitted weights."""
    stride: int = 10
    """Agents decide on every N-th frame during extraction (1.5 decisions/s at 15 Hz)."""
    model: str = ""
    """VLM directory or hub name ('' = build the tiny Qwen2.5-VL inside the dataset)."""
    noise: float = 1.0
    """Scale of the unexplained part of the BOLD (1 = as encoders.synth)."""
    seed: int = 0
    subject: str = "01"
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Scanner-room faults on the written runs (``encoders.faults``; run N seeded ``faults.seed + N``). When
    active, the weights are fitted on the faulted runs preprocessed as live (``encoders.synth.preprocess_for_fit``)
    and record that preprocessing, so replays and ``live`` apply it."""


@dataclass
class Participant:
    root: Path
    runs: list[dict]
    """Per run: bold (NIfTI path), gamelog (recording path), run (BIDS label)."""
    weights: dict[str, Path]
    """Stream key ``<agent>__<condition>`` (``policy`` for RL agents) → weights file."""
    atlas: Path
    atlas_labels: Path
    model: str
    partition: Path | None = None
    planted: Path | None = None
    """``planted.json`` of a synthetic participant (``encoders.plant.PlantedPattern``); None for a real one."""

    @classmethod
    def load(cls, root: str | Path) -> "Participant":
        root = Path(root)
        desc = json.loads((root / "derivatives" / "neuroarcade_session.json").read_text())
        return cls(root=root, runs=[{k: (root / v if k in ("bold", "gamelog") else v) for k, v in r.items()}
                                    for r in desc["runs"]],
                   weights={k: root / v for k, v in desc["weights"].items()}, atlas=root / desc["atlas"],
                   atlas_labels=root / desc["atlas_labels"], model=desc["model"],
                   partition=root / desc["partition"] if desc.get("partition") else None,
                   planted=root / desc["planted"] if desc.get("planted") else None)

    def planted_pattern(self):
        """The planted truth (``encoders.plant.PlantedPattern``), or None for a participant not planted."""
        from encoders.plant import PlantedPattern

        return PlantedPattern.load(self.planted) if self.planted is not None and self.planted.exists() else None


# --- making a synthetic participant --------------------------------------------------------------


def make_participant(out: str | Path, cfg: ParticipantConfig, progress: Callable[[str], None] = print) -> Participant:
    from encoders import synth
    from encoders.fit import FitConfig, fit_encoding, partition_variance
    from pipelines.batch import ExtractConfig, Job, run_job
    from services.emulator import record_headless
    from services.plumbing.game import GameSettings

    out = Path(out)
    (out / "derivatives").mkdir(parents=True, exist_ok=True)
    model = cfg.model
    if not model:
        from agents.tiny import TinyConfig, build_tiny

        progress("building the tiny Qwen2.5-VL")
        model = str(build_tiny(out / "derivatives" / "models" / "tiny-vlm", "vlm", TinyConfig(init_std=TINY_INIT_STD)))

    # 1. gameplay, recorded headless with scanner triggers every TR
    gamelogs = []
    steps = int(round(cfg.trs * cfg.tr * STEP_HZ))
    tmp = out / "derivatives" / "tmp"
    tmp.mkdir(exist_ok=True)
    for r in range(1, cfg.runs + 1):
        progress(f"recording run {r}/{cfg.runs} ({steps} steps of {cfg.game})")
        path = tmp / f"run-{r}.narec"
        path.unlink(missing_ok=True)
        record_headless(GameSettings(game=cfg.game, seed=cfg.seed + r), steps, path, controller="random",
                        controller_seed=cfg.seed + r, tr_s=cfg.tr,
                        meta={"subject": cfg.subject, "run": str(r), "synthetic": "true"})
        gamelogs.append(path)

    # 2. the agents' per-TR features, exactly as the live path aligns them
    specs = extraction_specs(model)
    xcfg = ExtractConfig(stride=cfg.stride, tr=cfg.tr, seed=cfg.seed)
    streams: dict[str, list[np.ndarray]] = {}
    provenance: dict[str, dict] = {}
    for agent_id, spec in specs.items():
        for r, path in enumerate(gamelogs, start=1):
            progress(f"extracting {agent_id} features, run {r}/{cfg.runs}")
            res = run_job(Job(str(path), f"run-{r}", spec, xcfg))
            for name, rows in res.features.items():
                meta = res.meta[name]
                if spec.kind == "vlm" and meta["layer"] != max(m["layer"] for m in res.meta.values()):
                    continue  # the last layer stands for the model
                key = stream_key(agent_id, meta["condition"])
                streams.setdefault(key, []).append(rows[: cfg.trs])
                provenance[key] = {k: meta[k] for k in ("model", "layer", "condition", "pooling")}

    # 3. BOLD planted on the VLM's action- and reasoning-prompt features
    progress("planting BOLD on the VLM features")
    plant_cfg = synth.PlantedSessionConfig(tr=cfg.tr, voxel_mm=cfg.voxel_mm, pca=cfg.pca, noise=cfg.noise,
                                           seed=cfg.seed, subject=cfg.subject,
                                           task=cfg.game.split("/")[-1].split("-")[0].lower())
    session, pattern = synth.planted_session(streams["vlm-0__action"], streams["vlm-0__reasoning"], plant_cfg)
    pattern.streams = dict(PLANTED_STREAMS)
    progress(f"prompt conditions: {pattern.overlap.describe()}")

    def place_gamelog(dest: Path, _seconds: float, run_seed: int) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(gamelogs[run_seed - cfg.seed - 1]), dest)
        return dest

    paths = synth.write_bids(session, out, record=place_gamelog, faults=cfg.faults)
    shutil.rmtree(tmp, ignore_errors=True)
    truth_json = out / "derivatives" / "truth" / "truth.json"
    truth = json.loads(truth_json.read_text())
    truth["planted_roi_strengths"] = {p.roi: {"unique_action": p.unique_action, "unique_reasoning": p.unique_reasoning,
                                              "shared": p.shared} for p in PLANT}
    truth["planted_on"] = {"action": provenance["vlm-0__action"], "reasoning": provenance["vlm-0__reasoning"]}
    truth_json.write_text(json.dumps(truth, indent=2))
    planted_json = pattern.save(truth_json.with_name("planted.json"))
    featdir = out / "derivatives" / "features" / f"sub-{cfg.subject}" / "func"
    for s in synth.SPACES:  # the planted spaces are the VLM's: give their files the real provenance
        for f in paths[s]:
            f.with_suffix(".json").write_text(json.dumps({"space": s, **provenance[f"vlm-0__{s}"],
                                                          "dim": int(np.load(f).shape[1]), "tr": cfg.tr}, indent=2))
    for key, runs in streams.items():
        for r, rows in enumerate(runs, start=1):
            f = featdir / f"sub-{cfg.subject}_task-{session.cfg.task}_run-{r}_desc-{key.replace('__', '')}_features.npy"
            np.save(f, rows)
            f.with_suffix(".json").write_text(json.dumps({"space": key, **provenance[key], "tr": cfg.tr}, indent=2))

    # 4. weights per agent and condition, fitted on every run but the held-out last one
    train = slice(0, cfg.runs - 1)
    atlas_dir = out / "derivatives" / "atlas"
    labels = session.atlas[session.mask].astype(np.int32)
    wdir = out / "derivatives" / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    fcfg = FitConfig(pca=cfg.pca, progress=False)
    train_bold, record = session.bold[train], None
    if cfg.faults.active:  # the written runs moved and drifted: fit on them preprocessed as live, and record it
        progress("preprocessing the faulted training runs as the live path will (realignment, causal GLM)")
        train_bold, record = synth.preprocess_for_fit(paths["bold"][train], session.mask)
    weights = {}
    for key, runs in streams.items():
        progress(f"fitting weights {key}")
        res = fit_encoding(train_bold, {key: runs[train]}, fcfg, mask=session.mask, affine=session.affine,
                           tr=cfg.tr, provenance={key: provenance[key]}, roi_labels=labels,
                           roi_names=session.roi_names, atlas=str(atlas_dir / "atlas.nii.gz"),
                           preprocessing=record)
        weights[key] = res.weights.save(wdir / f"{key}.safetensors")
    progress("variance partitioning (action vs reasoning prompt, leave-one-run-out over the training runs)")
    parts = partition_variance(train_bold, ("action", streams["vlm-0__action"][train]),
                               ("reasoning", streams["vlm-0__reasoning"][train]), fcfg)
    partition = wdir / "partition.tsv"
    _write_partition(partition, parts, labels, session.roi_names, agent="vlm-0", planted=pattern)

    runs = [{"run": f"run-{r}", "bold": str(b.relative_to(out)),
             "gamelog": str((out / "sourcedata" / "gamelogs").relative_to(out) /
                            f"sub-{cfg.subject}_task-{session.cfg.task}_run-{r}_gameplay.narec")}
            for r, b in enumerate(paths["bold"], start=1)]
    desc = {"config": asdict(cfg), "model": model, "runs": runs, "held_out": runs[-1]["run"],
            "weights": {k: str(v.relative_to(out)) for k, v in weights.items()},
            "atlas": str((atlas_dir / "atlas.nii.gz").relative_to(out)),
            "atlas_labels": str((atlas_dir / "atlas_labels.tsv").relative_to(out)),
            "partition": str(partition.relative_to(out)),
            "planted": str(planted_json.relative_to(out)),
            "planted_how": "BOLD = unique-action + unique-reasoning + shared parts per ROI, on canonical variates "
                           "of the VLM's action- and reasoning-prompt features (last layer, last token, PCA) "
                           "through a double-gamma HRF at the FIR delays (encoders/plant.py)"}
    (out / "derivatives" / "neuroarcade_session.json").write_text(json.dumps(desc, indent=2))
    return Participant.load(out)


def extraction_specs(model: str) -> dict:
    """The default agents (``DEFAULT_AGENTS``) as offline extraction specs: agent id → agents.spec.AgentSpec."""
    from agents.spec import AgentSpec

    return {"rl-0": AgentSpec("rl", "rl"),
            "vlm-0": AgentSpec("vlm", "vlm", model=model, conditions=("action", "reasoning"),
                               poolings=("last_token",))}


def stream_key(agent_id: str, condition: str) -> str:
    """Name of one scored feature stream: ``<agent>__<condition>`` (RL agents: ``policy``)."""
    return f"{agent_id}__{condition or 'policy'}"


def _write_partition(path: Path, parts: dict[str, np.ndarray], labels: np.ndarray, roi_names: dict[int, str],
                     agent: str, planted=None) -> None:
    """ROI means of the per-voxel partition, beside the realised planted parts of a ``PlantedPattern``."""
    from encoders.plant import PartitionRow, write_rows

    rows = []
    for idx, name in [(0, "all")] + sorted(roi_names.items()):
        sel = np.ones(len(labels), bool) if idx == 0 else labels == idx  # 'all' as the scores count it: every voxel
        if not sel.any():
            continue
        truth = {} if planted is None else {
            "planted_unique_action": planted.roi(name).realised_unique_action,
            "planted_unique_reasoning": planted.roi(name).realised_unique_reasoning,
            "planted_shared": planted.roi(name).realised_shared}
        rows.append(PartitionRow(agent, name, int(sel.sum()), *(float(parts[k][sel].mean())
                                                                for k in ("unique_a", "unique_b", "shared")), **truth))
    write_rows(path, rows)


# --- replaying a session with agents ------------------------------------------------------------


@dataclass
class ReplayPlan:
    """One participant run replayed with model agents."""

    participant: Participant
    run: str
    """BIDS run label (``run-3``)."""
    out: Path
    agents: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=lambda: list(DEFAULT_AGENTS))
    """(agent id, kind, prompt conditions); the VLM uses the participant's model."""
    speed: float = 1.0
    """Replay pace (1 = recorded)."""
    max_trs: int | None = None
    """Replay only the first N TRs (None = the whole run)."""
    dashboard_port: int | None = None
    """Serve the live dashboard on 127.0.0.1:PORT while replaying (None = no dashboard)."""
    on_dashboard: Callable[[str], None] | None = None
    """Called with the dashboard URL once it serves."""


class ClosedLoop:
    """The live services of one session, on loopback: an emulator (thread), a BOLD source (thread),
    one encoding service per weights file (threads), the dashboard (optional) and agents (one process
    each: a model per process, 1 torch thread). ``start`` them, wait for the emulator, ``finish``."""

    def __init__(self, p: Participant, out: Path, agents: list[tuple[str, str, tuple[str, ...]]],
                 progress: Callable[[str], None]):
        from agents.spec import AgentSpec

        self.p, self.out, self.progress = p, Path(out), progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.frames, self.control, self.bold = free_tcp_endpoint(), free_tcp_endpoint(), free_tcp_endpoint()
        self.specs = [AgentSpec(agent_id, kind, role="observer", model=p.model if kind == "vlm" else "",
                                conditions=tuple(conds) or ("action",), activations_endpoint=free_tcp_endpoint())
                      for agent_id, kind, conds in agents]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.encoder_reports: dict[str, object] = {}
        self.streams: list[str] = []
        self.emulator = None
        self.dashboard = None
        self.predictions: list[str] = []
        """The encoding services' prediction endpoints (the dashboard subscribes to them)."""
        self.trigger_sources: tuple[str, ...] = ()
        self._emu_result: dict = {}

    def thread(self, target, name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def start_emulator(self, cfg) -> None:
        from services.emulator import Emulator

        cfg.frames_endpoint, cfg.control_endpoint = self.frames, self.control
        cfg.record_path = str(self.out / "session.narec")
        self.emulator = Emulator(cfg)
        self._emu_thread = self.thread(lambda: self._emu_result.update(summary=self.emulator.run()), "emulator")
        self.emulator.ready.wait(30)

    def start_encoders(self, n_trs: int | None, trigger_sources: tuple[str, ...] = ()) -> None:
        """One encoding service per weights file; BOLD from ``self.bold``, triggers from there or ``trigger_sources``."""
        from services.encoding import EncodingServiceConfig, run_encoding_service

        self.trigger_sources = tuple(trigger_sources)

        for spec in self.specs:
            for cond in (spec.conditions if spec.kind == "vlm" else [""]):
                key = stream_key(spec.agent_id, cond)
                if key not in self.p.weights:
                    self.progress(f"no weights for {key}: not scored")
                    continue
                self.streams.append(key)
                self.predictions.append(free_tcp_endpoint())
                ecfg = EncodingServiceConfig(weights=str(self.p.weights[key]), activations=[spec.activations_endpoint],
                                             bold=[self.bold, *trigger_sources], predictions=self.predictions[-1],
                                             out_dir=str(self.out),
                                             out_stem=key, n_trs=n_trs)
                ecfg.core.agent_id = spec.agent_id
                ecfg.core.ignore_sibling_streams = True  # agents publish every condition and pooling on one socket
                self.thread(lambda ecfg=ecfg, key=key: self.encoder_reports.update(
                    {key: run_encoding_service(ecfg, self.stop)}), f"encoder-{key}")

    def start_dashboard(self, port: int | None, play: bool, on_url: Callable[[str], None] | None,
                        inputs=None) -> None:
        """``inputs``: the participant's trigger key, serial line and key map (``services.dashboard.ParticipantInputs``)."""
        if port is None:
            return
        from services.dashboard import Dashboard, DashboardConfig, ParticipantInputs

        self.dashboard = Dashboard(DashboardConfig(
            frames=self.frames, control=self.control, activations=[s.activations_endpoint for s in self.specs],
            bold=[self.bold, *self.trigger_sources], predictions=list(self.predictions), atlas=str(self.p.atlas),
            atlas_labels=str(self.p.atlas_labels),
            port=port, play=play, inputs=inputs or ParticipantInputs()))
        self.dashboard.start()
        if on_url:
            on_url(self.dashboard.url)

    def start_agents(self) -> None:
        from pipelines.closed_loop import AgentProcesses

        self.agents = AgentProcesses(self.specs, self.emulator.game.settings.game, self.frames, self.control)

    def wait_emulator(self, grace_s: float) -> None:
        self._emu_thread.join()
        for t in self.threads:
            if t is not self._emu_thread:
                t.join(timeout=grace_s)

    def finish(self, run: str) -> dict:
        from pipelines.closed_loop import summarize_loop
        from services.agent import AgentSummary

        self.stop.set()
        summaries = self.agents.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        for t in self.threads:
            t.join(timeout=10)
        emu = self._emu_result.get("summary")
        (self.out / "latency.json").write_text(json.dumps(_latency_from_recording(self.out / "session.narec")))
        _copy_session_files(self.p, self.out)
        game = self.emulator.game.settings.game
        agents = summarize_loop(self.specs, summaries, emu.duration_s if emu else 0.0, emu.steps if emu else 0, game, emu)
        for entry in agents["agents"]:  # keep the first error messages, not only their count
            s = summaries.get(entry["agent_id"])
            entry["error_samples"] = s.errors[:3] if isinstance(s, AgentSummary) else []
        recovery = _recovery_from_outputs(self.p, run, self.out, self.streams) if run != "live" else None
        return _finish(self.out, run, self.streams, agents, self.encoder_reports, self.progress,
                       replay_verified=bool(emu and emu.hash_mismatches == 0 and emu.steps > 0),
                       participant=self.p, recovery=recovery)


def replay_session(plan: ReplayPlan, progress: Callable[[str], None] = print) -> dict:
    """Replay a run at the recorded pace through the live services; write scores and a report."""
    from services.emulator import EmulatorConfig
    from services.scanner import run_trigger_paced

    run = _run(plan.participant, plan.run)
    n_trs = _n_volumes(run["bold"]) if plan.max_trs is None else min(plan.max_trs, _n_volumes(run["bold"]))
    tr = _tr(run["bold"])
    loop = ClosedLoop(plan.participant, plan.out, plan.agents, progress)
    loop.start_emulator(EmulatorConfig(mode="replay", replay_path=str(run["gamelog"]), speed=plan.speed,
                                       wait_for_clients=len(loop.specs), heartbeat_s=2.0,
                                       duration_s=(n_trs + 1) * tr / plan.speed + 0.5))
    ready = threading.Event()
    loop.thread(lambda: run_trigger_paced(run["bold"], loop.frames, loop.bold, stop=loop.stop, ready=ready,
                                          n_volumes=n_trs), "scanner")
    ready.wait(10)
    loop.start_encoders(n_trs)
    loop.start_dashboard(plan.dashboard_port, play=False, on_url=plan.on_dashboard)
    loop.start_agents()
    progress(f"replaying {plan.run} ({n_trs} TRs at {plan.speed:g}× recorded pace) with "
             f"{', '.join(s.agent_id for s in loop.specs)}")
    loop.wait_emulator(grace_s=max(15.0, 4 * tr / plan.speed))
    return loop.finish(plan.run)


@dataclass
class LivePlan:
    """Scanner-side live session: a participant plays, the export folder is watched, agents run alongside."""

    participant: Participant
    """Whose fitted weights predict the BOLD (the same person, an earlier session)."""
    scanner_folder: Path
    out: Path
    game: str = DEMO_GAME
    duration_s: float = 120.0
    simulate: Path | None = None
    """A 4D NIfTI written into the folder at TR pace, with triggers (no scanner at hand)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """With ``simulate``: scanner-room faults put on every volume before it is written (``encoders.faults``, as
    ``scanner simulated --faults``); the true per-TR motion goes to ``<out>/truth_motion.tsv``."""
    dashboard_port: int | None = 8000
    on_dashboard: Callable[[str], None] | None = None
    agents: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=lambda: list(DEFAULT_AGENTS))
    inputs: object | None = None
    """The scanner room's inputs on the participant's page (``services.dashboard.ParticipantInputs``: trigger
    key, serial trigger line, button-box key map); None = the defaults (trigger key ``5``, arrows + space)."""
    tr_fallback: bool = True
    """Time TRs from the export folder's arrival times while no scanner trigger has come
    (``services.plumbing.trclock``)."""
    slices_per_volume: int | None = None
    """Single-slice DICOM series: slices per volume, overriding what the headers say or the assembler learns
    (``services.plumbing.dicom.SliceAssembler``); None = from the files."""


def run_live(plan: LivePlan, progress: Callable[[str], None] = print) -> dict:
    """Realtime emulator controlled from the dashboard's keyboard; volumes from the watched export folder;
    scanner triggers recorded by the emulator (forwarded), so frames map to TRs."""
    from services.emulator import EmulatorConfig
    from services.plumbing.game import GameSettings
    from services.scanner import FolderSource, SimulatedScannerConfig, publish_stream, run_simulated_scanner

    loop = ClosedLoop(plan.participant, plan.out, plan.agents, progress)
    players = 1 if plan.dashboard_port is not None else 0  # the dashboard joins as controller "human"
    loop.start_emulator(EmulatorConfig(game=GameSettings(game=plan.game), mode="realtime", controller="human",
                                       duration_s=plan.duration_s, heartbeat_s=2.0,
                                       wait_for_clients=len(loop.specs) + players))
    from encoders.weights import EncodingWeights

    tr = EncodingWeights.load(next(iter(plan.participant.weights.values()))).tr
    Path(plan.scanner_folder).mkdir(parents=True, exist_ok=True)
    source = FolderSource(plan.scanner_folder, tr=tr, stop=loop.stop, slices_per_volume=plan.slices_per_volume)
    loop.thread(lambda: publish_stream(source, loop.bold), "scanner-watch")
    if plan.simulate is not None:
        triggers = free_tcp_endpoint()
        loop.thread(lambda: run_simulated_scanner(SimulatedScannerConfig(
            bold=str(plan.simulate), folder=str(plan.scanner_folder), trigger_endpoint=triggers, faults=plan.faults,
            truth=str(Path(plan.out) / "truth_motion.tsv") if plan.faults.active else ""), stop=loop.stop),
            "scanner-simulated")
        loop.thread(lambda: _forward_triggers(triggers, loop.control, loop.stop), "trigger-bridge")
    loop.start_encoders(None, trigger_sources=(loop.frames,))  # the emulator re-publishes the triggers it records
    # TRs from the triggers (page keypress, serial line, simulated scanner); the folder's arrivals as fallback
    from services.plumbing.trclock import TrClockConfig, run_tr_clock

    timing: dict = {}
    clock = threading.Thread(target=lambda: timing.update(report=run_tr_clock(TrClockConfig(
        bold=loop.bold, frames=loop.frames, control=loop.control, tr_s=tr, fallback=plan.tr_fallback), loop.stop)),
        name="tr-clock", daemon=True)  # not loop.thread: wait_emulator's grace would wait for it
    clock.start()
    loop.start_dashboard(plan.dashboard_port, play=True, on_url=plan.on_dashboard or progress, inputs=plan.inputs)
    loop.start_agents()
    progress(f"live: {plan.game} for {plan.duration_s:.0f} s; watching {plan.scanner_folder}")
    loop.wait_emulator(grace_s=5.0)
    summary = loop.finish("live")
    clock.join(10)
    if "report" in timing:  # beside the rest of the summary: how TRs were timed, the folder's lag behind them
        from pipelines.report import json_ready

        summary["tr_timing"] = timing["report"].summary()
        timing["report"].write_tsv(Path(plan.out) / "tr_timing.tsv")
        (Path(plan.out) / "summary.json").write_text(json.dumps(json_ready(summary), indent=2, default=str))
    return summary


def _forward_triggers(trigger_endpoint: str, control_endpoint: str, stop: threading.Event) -> None:
    """Scanner triggers → the emulator's control socket (it records them and re-publishes them)."""
    import zmq

    from protocols import Decoder, Trigger
    from services.plumbing.transport import TOPIC_TRIGGER, Channel, make_socket, split_topic

    ctx = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    sub.connect(trigger_endpoint)
    dealer = Channel(make_socket(ctx, zmq.DEALER))
    dealer.sock.connect(control_endpoint)
    inbox = Channel(sub, Decoder(accept=[Trigger]))
    try:
        while not stop.is_set():
            if sub.poll(100):
                _, parts = split_topic(inbox.recv_parts())
                msg = inbox.decode(parts)
                if msg is not None:
                    dealer.send(msg)
    finally:
        sub.close(0)
        dealer.sock.close(0)


def replay_batch(participant: Participant, runs: list[str], out: Path, *,
                 progress: Callable[[str], None] = print) -> dict:
    """Replay runs as fast as possible (offline extraction + prediction); one scores table per stream."""
    import nibabel as nib
    from rich.progress import Progress

    from encoders.score import ROI_MEAN, pearson_r
    from encoders.weights import EncodingWeights, roi_table
    from pipelines.batch import ExtractConfig, Job, run_job, score_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((participant.root / "derivatives" / "neuroarcade_session.json").read_text())["config"]
    specs = extraction_specs(participant.model)
    xcfg = ExtractConfig(stride=cfg["stride"], tr=cfg["tr"], seed=cfg["seed"])
    weights = {k: EncodingWeights.load(v) for k, v in participant.weights.items()}
    rows = []
    series: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # stream → per run (pred, measured) ROI means
    with Progress() as bar:
        task = bar.add_task("replaying runs", total=len(runs) * len(specs))
        for run_label in runs:
            run = _run(participant, run_label)
            img = nib.load(str(run["bold"]))
            for agent_id, spec in specs.items():
                res = run_job(Job(str(run["gamelog"]), run_label, spec, xcfg))
                for name, feats in res.features.items():
                    key = stream_key(agent_id, res.meta[name]["condition"])
                    w = weights.get(key)
                    meta = res.meta[name]
                    if w is None or not _matches(w, meta):
                        continue
                    # the weights' preprocessing as the live service applies it (pipelines.batch.score_run)
                    scored = score_run(w, [feats], img)
                    if scored.live is not None:  # motion, tSNR, alignment to the weights' space: for the report
                        scored.live.write_qc(out, key if len(runs) == 1 else f"{key}_{run_label}")
                    names, p_roi, m_roi = scored.roi_names, scored.predicted, scored.measured
                    series.setdefault(key, []).append((p_roi, m_roi))
                    for roi, r in zip(names, pearson_r(m_roi.astype(np.float64), p_roi.astype(np.float64)).tolist()):
                        rows.append({"run": run_label, "agent": agent_id, "condition": res.meta[name]["condition"],
                                     "roi": roi, "kind": ROI_MEAN, "r": r, "n_trs": len(scored.scored_trs),
                                     "n_undefined": int(np.isnan(r))})
                bar.advance(task)
    stem_rows: dict[str, list[dict]] = {}
    for row in rows:
        stem_rows.setdefault(stream_key(row["agent"], row["condition"]), []).append(row)
    for stem, rs in stem_rows.items():
        _write_tsv(out / f"{stem}_scores.tsv", rs)
    _copy_session_files(participant, out)
    recovery = [row for key, per_run in series.items()
                for row in _recovery(participant, runs, key, roi_table(weights[key]), per_run)]
    return _finish(out, ",".join(runs), list(stem_rows), None, {}, progress, replay_verified=True,
                   participant=participant, recovery=recovery)


# --- helpers ------------------------------------------------------------------------------------


def _matches(w, meta: dict) -> bool:
    from encoders.weights import WeightsError

    try:
        w.spaces[0].check_provenance(model=meta["model"], layer_list=[meta["layer"]], condition=meta["condition"],
                                     pooling=meta["pooling"])
        return True
    except WeightsError:
        return False


def _run(p: Participant, label: str) -> dict:
    for r in p.runs:
        if r["run"] == label:
            return r
    raise ValueError(f"no {label} in {p.root} (runs: {', '.join(r['run'] for r in p.runs)})")


def _n_volumes(path) -> int:
    import nibabel as nib

    return int(nib.load(str(path)).shape[3])


def _tr(path) -> float:
    import nibabel as nib

    return float(nib.load(str(path)).header.get_zooms()[3] or 2.0)


def _recovery(p: Participant, runs: list[str], stream: str, rois: list[tuple[str, np.ndarray]],
              per_run: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """Planted beside recovered per ROI for one stream, from its per-run (pred, measured) ROI means (T_i, R).

    The chance band is ``encoders.plant.block_null`` over the same series. The planted r applies to
    the held-out run only (nan when other runs are replayed); the planted fraction to every run.
    """
    from encoders.plant import Recovery, block_null

    pattern = p.planted_pattern()
    agent, _, condition = stream.partition("__")
    pred = np.concatenate([a for a, _ in per_run])
    measured = np.concatenate([b for _, b in per_run])
    lengths = [len(a) for a, _ in per_run]
    held_out = pattern is not None and runs == [f"run-{pattern.held_out_run}"]
    out = []
    for (roi, _), band in zip(rois, block_null(pred, measured, lengths)):
        out.append(Recovery(
            agent=agent, condition="" if condition == "policy" else condition, roi=roi,
            planted_fraction=pattern.planted_fraction(stream, roi) if pattern else float("nan"),
            planted_r=pattern.planted_r(stream, roi) if held_out else float("nan"),
            r=band.r, null_lo=band.lo, null_hi=band.hi, p=band.p, n_trs=len(pred)))
    return out


def _recovery_from_outputs(p: Participant, run: str, out: Path, streams: list[str]) -> list:
    """``_recovery`` for a live replay: the encoders' predicted NIfTIs beside the run's measured volumes,
    as ROI means of the raw values (as the encoding service scores them)."""
    import nibabel as nib

    from encoders.weights import EncodingWeights, roi_table
    from pipelines.batch import measured_series, roi_means

    measured_img = nib.load(str(_run(p, run)["bold"]))
    rows = []
    for key in streams:
        path = out / f"{key}_pred.nii.gz"
        if not path.exists():
            continue
        w = EncodingWeights.load(p.weights[key])
        pred_img = nib.load(str(path))
        n = min(pred_img.shape[3] if pred_img.ndim == 4 else 0, measured_img.shape[3])
        if n < 3:
            continue
        pred = np.asarray(pred_img.dataobj[..., :n], dtype=np.float32)[w.mask].T
        if w.preprocess_mode == "none":
            measured, keep = np.asarray(measured_img.dataobj[..., :n], dtype=np.float32)[w.mask].T, np.arange(n)
        else:  # preprocessed as the encoding service did it, its excluded TRs left out
            measured, keep, _ = measured_series(w, measured_img, n)
        if len(keep) < 3:
            continue
        table = roi_table(w)
        rows += _recovery(p, [run], key, table, [(roi_means(pred[keep], table), roi_means(measured, table))])
    return rows


def _latency_from_recording(path: Path) -> dict:
    """Decision round trips per agent and condition, from the replay's own action log (emulator clock)."""
    from services.plumbing.recording import read_recording

    rec = read_recording(path)
    t_frame = {seq: t for seq, t, _ in rec.frames()}
    lat: dict[str, dict[str, list[float]]] = {}
    stale: dict[str, dict[str, list[float]]] = {}
    for step in rec.steps:
        for a in step.actions:
            if a.frame_seq in t_frame:
                cond = a.condition or "policy"
                lat.setdefault(a.agent_id, {}).setdefault(cond, []).append((a.t_recv_ns - t_frame[a.frame_seq]) / 1e6)
                stale.setdefault(a.agent_id, {}).setdefault(cond, []).append(
                    (step.t_ns - t_frame[a.frame_seq]) / 1e6)
    return {**lat, "staleness_ms": stale}


def _copy_session_files(p: Participant, out: Path) -> None:
    shutil.copy(p.atlas, out / "atlas.nii.gz")
    shutil.copy(p.atlas_labels, out / "atlas_labels.tsv")
    if p.partition is not None and p.partition.exists():
        shutil.copy(p.partition, out / "partition.tsv")


def _write_tsv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def _read_scores(out: Path, streams: list[str]) -> dict[str, dict[str, float]]:
    """Per stream, per ROI score: ``r`` of the ``roi_mean`` rows (encoding service or batch replay), mean over runs."""
    from encoders.score import ROI_MEAN, mean_r

    scores: dict[str, dict[str, list[float]]] = {}
    for stem in streams:
        path = out / f"{stem}_scores.tsv"
        if not path.exists():
            continue
        with open(path) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["kind"] == ROI_MEAN:
                    scores.setdefault(stem, {}).setdefault(row["roi"], []).append(float(row["r"]))
    return {s: {roi: mean_r(v)[0] for roi, v in rois.items()} for s, rois in scores.items()}


def _finish(out: Path, run: str, streams: list[str], agents_summary: dict | None, encoder_reports: dict,
            progress: Callable[[str], None], replay_verified: bool, participant: Participant | None = None,
            recovery: list | None = None) -> dict:
    from encoders.plant import PartitionRow, read_rows, write_rows
    from pipelines.report import json_ready, write_report

    scores = _read_scores(out, streams)
    if recovery:
        write_rows(out / "recovery.tsv", recovery)
    pattern = participant.planted_pattern() if participant is not None else None
    if pattern is not None:
        shutil.copy(participant.planted, out / "planted.json")
    progress("writing the report")
    report = write_report(out, title=f"neuroarcade — {run}")
    partition = out / "partition.tsv"
    summary = {
        "run": run, "out": str(out), "report": str(report), "replay_verified": replay_verified,
        "scores": scores,
        "recovery": [asdict(r) for r in recovery or []],
        "partition": [asdict(r) for r in read_rows(partition, PartitionRow)] if partition.exists() else [],
        "planted": asdict(pattern) if pattern is not None else None,
        "encoders": {k: {"trs_predicted": r.trs_predicted, "trs_scored": r.trs_scored, "errors": r.errors,
                         "rejected_messages": r.rejected_messages,
                         "excluded_trs": getattr(r, "excluded_trs", []),
                         "registration": getattr(r, "registration", None)} for k, r in encoder_reports.items()},
    }
    if agents_summary is not None:
        summary.update(agents=agents_summary["agents"], emulator=agents_summary["emulator"])
    (out / "summary.json").write_text(json.dumps(json_ready(summary), indent=2, default=str))
    return summary
