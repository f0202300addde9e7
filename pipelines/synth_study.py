"""`neuroarcade synth-study DIR --subjects N`: a multi-subject synthetic study with planted group effects.

What it writes (BIDS-like)::

    DIR/dataset_description.json, participants.tsv, .bidsignore
    DIR/sub-XX/func/sub-XX_task-breakout_run-R_events.tsv     triggers + stim_file → the recording
    DIR/sourcedata/gamelogs/sub-XX/…_gameplay.narec           gameplay recorded headless (random player)
    DIR/derivatives/fmriprep/sub-XX/func/…_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz (+ .json)
    DIR/derivatives/atlas/atlas.nii.gz, atlas_labels.tsv, mask.nii.gz
    DIR/derivatives/models/tiny-vlm, tiny-lam                  the two tiny models (built offline)
    DIR/derivatives/truth/truth.tsv, planted.json              the known answer
    DIR/derivatives/neuroarcade/cache                          the extraction the BOLD was planted on
    DIR/study.toml                                             ready to run

How the BOLD is planted. Each subject plays its own games (per-subject seeds). The study's own extract stage
(:func:`pipelines.study.extract_tasks`, the same Ray tasks, cache and fingerprints ``neuroarcade study`` uses)
replays every recording through the two models — a tiny Qwen2.5-VL ("vlm") and a tiny Qwen2-VL ("lam"), both
with content-dependent attention (``init_std`` 0.12, so the action and reasoning prompts read different
things from the frames) — and the BOLD of each subject is planted on exactly those features (last layer, last
token, the rows the study fits): per model, :func:`encoders.plant.plant` builds the unique-action,
unique-reasoning and shared sources from canonical variates of the model's two conditions (top PCs) and puts
each ROI's part through the HRF at the FIR delays; the two models' signals go to different ROIs
(:data:`DESIGN`), one ROI gets nothing; each subject's parts are scaled by its own factor (0.7–1.3 per ROI)
and noise (partly shared within the ROI) fills every voxel up to unit variance. The study's extraction of the
same recordings with the same models has the same fingerprints, so ``study.toml`` points its cache at the
generator's (delete that folder, or pass ``--cache``, to recompute it).

``truth.tsv`` has one row per tested effect whose sign the design fixes, with the group table's key columns
(``pipelines.group.KEY_COLUMNS``) and ``planted_sign``: +1/−1 where a part was planted, 0 where nothing was
planted in the ROI for anyone (the null ROI) or the two sides of a paired test are exchangeable
(:func:`truth_rows` gives the rules). Left out, on purpose: effects whose sign no design can fix — one model's
score in an ROI planted only on the *other* model (both see the same frames: how much the other predicts is the
models' doing), and R²-based measures where their part is not planted (a held-out R² of a shrunken prediction
of nothing is below 0 by construction, not 0).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TASK = "breakout"
GAME = "ALE/Breakout-v5"
SPACE = "MNI152NLin2009cAsym"
STEP_HZ = 15
MODELS = ("vlm", "lam")
CONDITIONS = ("action", "reasoning")
DESIGN: dict[str, dict[str, tuple[float, float, float]]] = {
    # ROI → model → planted (unique action, unique reasoning, shared) fractions of each voxel's variance
    "visual": {"vlm": (0.0, 0.0, 0.35)},
    "motor_left": {"vlm": (0.4, 0.0, 0.0)},
    "prefrontal": {"vlm": (0.0, 0.4, 0.0)},
    "motor_right": {"lam": (0.4, 0.0, 0.0)},
    "parietal": {"lam": (0.0, 0.0, 0.35)},
    "temporal": {},
}
"""The group design: the VLM's reasoning prompt adds unique variance in prefrontal, its action prompt in
motor_left, both share visual; the LAM's action prompt is unique in motor_right and its two prompts share
parietal (the LAM has no unique reasoning anywhere); temporal carries no signal at all."""
STRONG = 0.3
"""A planted part at least this large is expected to come back significant (R²-based measures included)."""


@dataclass
class SynthStudyConfig:
    """Size of a synthetic study."""

    subjects: int = 10
    """Participants (≥ 8 for group statistics worth the name; 10 gives exact sign-flip p down to 0.002)."""
    runs: int = 3
    """Runs per subject (each is held out in turn by the study)."""
    trs: int = 36
    """Volumes per run."""
    tr: float = 1.0
    """Repetition time, s (short, so the games stay short: 36 TRs = 540 steps)."""
    stride: int = 15
    """The models decide on every N-th frame (15 = one decision per TR at TR 1 s)."""
    voxel_mm: float = 12.0
    """Voxel size of the coarse MNI grid (12 mm → ~1.1k voxels)."""
    pca: int = 6
    """PCs of each condition the parts are planted on (≤ the smallest fitted dim)."""
    dims: tuple[int, ...] = (8, 64)
    """PCA dims the study fits (the first also partitions the variance)."""
    coherence: float = 0.5
    """Share of a voxel's noise common to its ROI."""
    seed: int = 0


def _noise_fill(rng: np.random.Generator, signal: list[np.ndarray], labels: np.ndarray, coherence: float
                ) -> list[np.ndarray]:
    """Noise per run (T_i, V) filling each voxel up to unit variance over all runs; part of it ROI-wide."""
    lengths = [len(s) for s in signal]
    S = np.concatenate(signal)
    fill = np.sqrt(np.clip(1 - S.var(0), 0.05, None))
    roi = rng.standard_normal((len(S), labels.max() + 1))[:, labels]
    vox = rng.standard_normal(S.shape)
    nz = np.sqrt(coherence) * roi + np.sqrt(1 - coherence) * vox
    nz = (nz - nz.mean(0)) / nz.std(0)
    return np.split(nz * fill, np.cumsum(lengths)[:-1])


def planted_bold(features: dict[str, dict[str, list[np.ndarray]]], labels: np.ndarray, roi_names: dict[int, str],
                 *, tr: float, delays: list[int], pca: int, coherence: float, seed: int
                 ) -> tuple[list[np.ndarray], dict]:
    """BOLD (per run (T_i, V), noise units) planted on each model's action/reasoning features, and what was planted.

    ``features[model][condition]``: per run (T_i, d). Per subject, the design's fractions are scaled per ROI
    by a factor in [0.7, 1.3] (subjects vary)."""
    from encoders.plant import RoiPlant, plant

    rng = np.random.default_rng(seed)
    factors = {roi: float(rng.uniform(0.7, 1.3)) for roi in DESIGN}
    signal = None
    overlap = {}
    for k, model in enumerate(MODELS):
        pattern = tuple(RoiPlant(roi, *(factors[roi] * f for f in parts[model]))
                        for roi, parts in DESIGN.items() if model in parts)
        with np.errstate(invalid="ignore", divide="ignore"):  # its "realised" fractions: 0/0 with no noise
            planted = plant(features[model]["action"], features[model]["reasoning"], labels, roi_names, pca=pca,
                            delays=delays, tr=tr, pattern=pattern, coherence=0.0, noise=0.0, seed=seed * 10 + k)
        overlap[model] = asdict(planted.pattern.overlap)
        signal = planted.y if signal is None else [a + b for a, b in zip(signal, planted.y)]
    noise = _noise_fill(rng, signal, labels, coherence)
    return [s + n for s, n in zip(signal, noise)], {"factors": factors, "overlap": overlap}


def truth_rows(dims: tuple[int, ...], partition_dims: tuple[int, ...], layer: int, rois: list[str]) -> list[dict]:
    """One row per tested effect of the generated ``study.toml`` whose sign the design fixes.

    - held-out r of a model · condition: +1 where a part that condition's features carry is planted (its unique
      part or the shared one), 0 in an ROI with nothing planted for anyone;
    - held-out R²: +1 where the shared part is planted (≥ :data:`STRONG`); a unique part is the last canonical
      pair, low-variance directions that a few dozen training TRs estimate poorly, so its held-out R² can sit
      at or below 0 while its r is clearly positive: not listed;
    - unique A, unique B, shared (the partition's dims only): +1 where that part is planted (≥ STRONG);
    - reasoning − action within a model (r, R²): the sign of unique reasoning − unique action where they differ
      by ≥ STRONG; 0 for r where the model's two conditions are exchangeable (only the shared part, or nothing at
      all in the ROI);
    - VLM − LAM: 0 for r in an ROI with nothing planted; elsewhere no sign — both models see the same frames and
      how much of one model's source the other predicts is the models' doing, not the design's.
    R²-based measures where their part is not planted are left out everywhere: a held-out R² of a shrunken
    prediction of nothing is below 0 by construction (and by how much depends on the features), not 0.
    """
    rows = []

    def parts(roi: str, model: str) -> tuple[float, float, float]:
        return DESIGN[roi].get(model, (0.0, 0.0, 0.0))

    def row(test, contrast, model, condition, dim, roi, measure, sign):
        rows.append({"test": test, "contrast": contrast, "model": model, "condition": condition, "layer": layer,
                     "dim": dim, "roi": roi, "measure": measure, "planted_sign": sign})

    for dim in dims:
        for roi in rois:
            empty = not DESIGN[roi]
            for model in MODELS:
                ua, ub, sh = parts(roi, model)
                for cond, own in (("action", ua + sh), ("reasoning", ub + sh)):
                    if own > 0:
                        row("one_sample", "", model, cond, dim, roi, "r", 1)
                    elif empty:
                        row("one_sample", "", model, cond, dim, roi, "r", 0)
                    if sh >= STRONG:
                        row("one_sample", "", model, cond, dim, roi, "r2", 1)
                for measure, v in (("unique_a", ua), ("unique_b", ub), ("shared", sh)):
                    if v >= STRONG and dim in partition_dims:
                        row("one_sample", "", model, "action+reasoning", dim, roi, measure, 1)
                d = ub - ua
                contrast = f"reasoning-action@{model}"
                if abs(d) >= STRONG:
                    for measure in ("r", "r2"):
                        row("paired", contrast, model, "", dim, roi, measure, int(np.sign(d)))
                elif empty or (ua == ub == 0 and sh > 0):
                    row("paired", contrast, model, "", dim, roi, "r", 0)
            if empty:
                for cond in CONDITIONS:
                    row("paired", "vlm-lam", "", cond, dim, roi, "r", 0)
    return rows


STUDY_TOML = """# A synthetic study written by `neuroarcade synth-study` (pipelines/synth_study.py).
# Run it: neuroarcade study {toml_name} --out OUT
[study]
title = "synthetic study: {subjects} subjects, VLM vs LAM, action vs reasoning prompts"
bids = "."
bold = "derivatives/fmriprep"
space = "{space}"
task = "{task}"
runs = [{runs}]
atlas = "derivatives/atlas/atlas.nii.gz"
atlas_labels = "derivatives/atlas/atlas_labels.tsv"
mask = "derivatives/atlas/mask.nii.gz"
truth = "derivatives/truth/truth.tsv"
# the extraction the BOLD was planted on (same recordings, models and options: same fingerprints)
cache = "derivatives/neuroarcade/cache"
on_failure = "retry"
retries = 1

[extract]
stride = {stride}
tr = {tr}

[fit]
dims = [{dims}]
partition_dims = [{pdims}]
delays = [1, 2, 3, 4]
banded_iter = 5

[[agents]]
name = "vlm"
kind = "vlm"
model = "derivatives/models/tiny-vlm"
conditions = ["action", "reasoning"]
layers = [{layer}]
poolings = ["last_token"]

[[agents]]
name = "lam"
kind = "vlm"
model = "derivatives/models/tiny-lam"
conditions = ["action", "reasoning"]
layers = [{layer}]
poolings = ["last_token"]

[[partition]]
model = "vlm"
a = "action"
b = "reasoning"

[[partition]]
model = "lam"
a = "action"
b = "reasoning"

[[comparisons]]
name = "reasoning-action@vlm"
a = {{ model = "vlm", condition = "reasoning" }}
b = {{ model = "vlm", condition = "action" }}

[[comparisons]]
name = "reasoning-action@lam"
a = {{ model = "lam", condition = "reasoning" }}
b = {{ model = "lam", condition = "action" }}

[[comparisons]]
name = "vlm-lam"
a = {{ model = "vlm" }}
b = {{ model = "lam" }}

[stats]
alpha = 0.05
n_perm = 10000
seed = 0
test = "signflip"
"""


def _record_task(game: str, seed: int, steps: int, tr: float, meta: dict) -> bytes:
    """Play ``steps`` random steps with scanner triggers every ``tr`` s, headless; the recording's bytes."""
    import tempfile

    from services.emulator import record_headless
    from services.plumbing.game import GameSettings

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rec.narec"
        record_headless(GameSettings(game=game, seed=seed), steps, path, controller="random", controller_seed=seed,
                        tr_s=tr, meta=meta)
        return path.read_bytes()


def make_synth_study(out: str | os.PathLike, cfg: SynthStudyConfig, *, sequential: bool = False,
                     address: str | None = None, progress: bool = True,
                     say: Callable[[str], None] = print) -> Path:
    """Write the dataset, its ``study.toml`` and its truth into ``out``; returns the ``study.toml`` path."""
    import nibabel as nib

    from agents.tiny import TinyConfig, build_tiny
    from encoders.synth import brain_grid, roi_atlas
    from pipelines.batch import atomic_write_bytes
    from pipelines.study import (Cache, Digests, RunInputs, Runner, StudyProgress, TaskSpec, extract_tasks,
                                 load_study_config, _h)

    if cfg.subjects < 2 or cfg.runs < 3:
        raise ValueError("a synthetic study needs ≥ 2 subjects and ≥ 3 runs each")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deriv = out / "derivatives"
    subjects = [f"{i:02d}" for i in range(1, cfg.subjects + 1)]
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "neuroarcade synthetic study", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "neuroarcade synth-study"}]}, indent=2))
    (out / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    (out / ".bidsignore").write_text("sourcedata/gamelogs/\n")
    layer = TinyConfig().num_hidden_layers  # the tiny models' last hidden state
    for model, variant, seed in (("tiny-vlm", "vlm", 0), ("tiny-lam", "lam", 1)):
        if not (deriv / "models" / model / "neuroarcade_tiny.json").is_file():
            say(f"building {model}")
            build_tiny(deriv / "models" / model, variant, TinyConfig(init_std=0.12, seed=seed))
    mask, affine = brain_grid(cfg.voxel_mm)
    atlas, roi_names = roi_atlas(mask, affine)
    labels = atlas[mask]
    adir = deriv / "atlas"
    adir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), adir / "mask.nii.gz")
    nib.save(nib.Nifti1Image(atlas.astype(np.int16), affine), adir / "atlas.nii.gz")
    (adir / "atlas_labels.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n"
                                                                     for k, v in sorted(roi_names.items())))
    toml = out / "study.toml"
    toml.write_text(STUDY_TOML.format(
        toml_name=toml.name, subjects=cfg.subjects, space=SPACE, task=TASK, runs=", ".join(
            f'"{r}"' for r in range(1, cfg.runs + 1)), stride=cfg.stride, tr=float(cfg.tr),
        dims=", ".join(map(str, cfg.dims)), pdims=cfg.dims[0], layer=layer))
    study = load_study_config(toml)

    # 1. gameplay: one recording per subject × run (Ray tasks; the driver writes them)
    steps = int(round(cfg.trs * cfg.tr * STEP_HZ))
    runs: dict[str, list[RunInputs]] = {}
    record = []
    for i, sub in enumerate(subjects):
        runs[sub] = []
        for r in range(1, cfg.runs + 1):
            name = f"sub-{sub}_task-{TASK}_run-{r}"
            rec = out / "sourcedata" / "gamelogs" / f"sub-{sub}" / f"{name}_gameplay.narec"
            runs[sub].append(RunInputs(sub, str(r), "", str(rec), cfg.trs))
            seed = cfg.seed * 100_000 + (i + 1) * 100 + r
            args = (GAME, seed, steps, cfg.tr, {"subject": sub, "run": str(r), "synthetic": "true"})
            fp = _h({"stage": "record", "args": args})

            def store(data: bytes, rec=rec) -> tuple[dict, dict]:
                atomic_write_bytes(rec, data)
                return {}, {"path": str(rec)}
            record.append(TaskSpec("record", f"sub-{sub}/run-{r}", fp, _record_task, args, {"recording": str(rec)},
                                   store))
    cache = Cache(study.cache)
    log = deriv / "neuroarcade"
    log.mkdir(parents=True, exist_ok=True)
    with StudyProgress(progress) as view:
        runner = Runner(log, cache, sequential=sequential, address=address, num_cpus=2, policy="retry", retries=1,
                        progress=view, session="synth-study")
        for t in record:  # a recording the cache knows but the dataset lost is played again
            if cache.has("record", t.fp) and not Path(t.inputs["recording"]).is_file():
                shutil.rmtree(cache.dir("record", t.fp))
        runner.run("record", record)
        # 2. the study's own extract stage
        agents = list(study.agents)
        xtasks, xfp = extract_tasks(study, agents, runs, Digests())
        runner.run("extract", xtasks)
    if runner.failures:
        raise RuntimeError(f"synth-study: {len(runner.failures)} tasks failed: {runner.failures[0]}")

    # 3. BOLD planted on those features
    planted_all = {}
    for i, sub in enumerate(subjects):
        feats: dict[str, dict[str, list[np.ndarray]]] = {}
        for a in agents:
            for cond in CONDITIONS:
                name = f"{a.name}_{cond}_last_token_l{layer}"
                feats.setdefault(a.name, {})[cond] = [
                    cache.array("extract", xfp[(sub, run.run, a.name)], name)[: cfg.trs].astype(np.float64)
                    for run in runs[sub]]
        y, info = planted_bold(feats, labels, roi_names, tr=cfg.tr, delays=list(study.fit.delays), pca=cfg.pca,
                               coherence=cfg.coherence, seed=cfg.seed * 1000 + i + 1)
        planted_all[f"sub-{sub}"] = info
        baseline = np.random.default_rng(cfg.seed * 1000 + i + 500).uniform(500, 1500, size=int(mask.sum()))
        func = deriv / "fmriprep" / f"sub-{sub}" / "func"
        raw = out / f"sub-{sub}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        raw.mkdir(parents=True, exist_ok=True)
        for run, yr in zip(runs[sub], y):
            stem = f"sub-{sub}_task-{TASK}_run-{run.run}"
            vol = np.zeros(mask.shape + (len(yr),), np.float32)
            vol[mask] = (baseline + 10.0 * yr).T
            img = nib.Nifti1Image(vol, affine)
            img.header.set_xyzt_units("mm", "sec")
            img.header["pixdim"][4] = cfg.tr
            nib.save(img, func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz")
            (func / f"{stem}_space-{SPACE}_desc-preproc_bold.json").write_text(
                json.dumps({"RepetitionTime": cfg.tr, "TaskName": TASK, "SkullStripped": True}, indent=2))
            stim = Path(run.recording).relative_to(out)
            (raw / f"{stem}_events.tsv").write_text(
                "onset\tduration\ttrial_type\ttr_index\tstim_file\n"
                + "".join(f"{k * cfg.tr:.3f}\t0\ttrigger\t{k}\t{stim}\n" for k in range(cfg.trs)))
        say(f"sub-{sub}: planted ({cfg.runs} runs × {cfg.trs} TRs)")

    # 4. the known answer
    tdir = deriv / "truth"
    tdir.mkdir(parents=True, exist_ok=True)
    rows = truth_rows(cfg.dims, cfg.dims[:1], layer, [roi_names[k] for k in sorted(roi_names)])
    cols = ["test", "contrast", "model", "condition", "layer", "dim", "roi", "measure", "planted_sign"]
    (tdir / "truth.tsv").write_text("\t".join(cols) + "\n" + "".join(
        "\t".join(str(r[c]) for c in cols) + "\n" for r in rows))
    (tdir / "planted.json").write_text(json.dumps({
        "design": {roi: {m: dict(zip(("unique_action", "unique_reasoning", "shared"), v)) for m, v in parts.items()}
                   for roi, parts in DESIGN.items()},
        "strong": STRONG, "config": asdict(cfg), "layer": layer, "subjects": planted_all,
        "how": "per model, encoders.plant.plant on canonical variates of its action and reasoning features "
               "(top PCs), through the HRF at the FIR delays; the models' signals in different ROIs; noise "
               "partly ROI-wide fills each voxel to unit variance (pipelines/synth_study.py)"}, indent=1,
        default=float))
    return toml
