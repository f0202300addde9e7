"""`neuroarcade study STUDY.toml`: the method's whole analysis across subjects, as one resumable pipeline on Ray.

Stages, each a set of Ray tasks (``ray.init(num_cpus=2)`` locally by default, ``address`` for a cluster) or,
with ``sequential``, the same task functions called in order in this process:

1. **extract** — one task per subject × run × agent: the recording is replayed bit-exactly and the agent's
   activations aligned to TRs by :func:`pipelines.batch.run_job` (the function ``neuroarcade extract`` runs).
2. **fit** — one task per subject × feature space (agent, condition, pooling, layer) × PCA dimension ×
   held-out run: :func:`pipelines.fit.run_fit` (the function ``neuroarcade fit`` runs) on the other runs
   (z-scoring and the PCA basis fitted on those training runs only), then the weights predict the held-out run.
3. **partition** — the same, with the two spaces of a configured pair fitted jointly (banded ridge): the joint
   model's held-out predictions.
4. **score** — one task per subject: held-out r and R² per voxel over all its runs (the BOLD of each held-out
   run cleaned as the weights record), ROI means, and the variance partition (unique A = R²(A∪B) − R²(B),
   unique B = R²(A∪B) − R²(A), shared = R²(A) + R²(B) − R²(A∪B), negatives kept).
5. **group** — :func:`pipelines.group.group_table` on the tidy scores; then the driver writes the report
   (:func:`pipelines.study_report.write_study_report`).

Every task is cached under ``CACHE/<stage>/<fingerprint>/``: the fingerprint hashes the task's inputs (content
hashes of recordings, model files, BOLD runs, atlas, mask; the fingerprints of the tasks it reads from) and its
options. Only the driver writes, each file through a temp file and an atomic rename, the ``meta.json`` marker
last, so a study killed at any point reruns only what is missing, and a rerun after a config change redoes only
what the change touches. Each task executed is appended to ``OUT/ledger.jsonl`` (stage, key, fingerprint,
seconds), which is what tests count.

On a cluster, the dataset, the models and the cache must be readable at the same paths on every node (shared
storage), as for ``neuroarcade extract``: tasks read their inputs from there, results travel back to the driver.

Bad input never stops the study where it can go on: a subject missing a run (BOLD, events or recording), a
recording that does not verify (its extract task fails; retried or skipped by ``on_failure``; reported with its
inputs), a config naming an unknown agent or ROI: each is reported in ``OUT/study.json`` (``problems``,
``failures``) naming the file or the key, and the rest of the study runs. Only a config that cannot be read at
all (bad TOML, wrong types, a missing required key) stops before anything runs (:class:`StudyConfigError`).

Example::

    neuroarcade synth-study runs/study-data --subjects 10
    neuroarcade study runs/study-data/study.toml --out runs/study
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pipelines.batch import ExtractConfig, Job, atomic_write_bytes, file_digest

LEDGER = "ledger.jsonl"
STUDY_JSON = "study.json"
MEASURES = ("r", "r2", "unique_a", "unique_b", "shared")
SCORE_COLUMNS = ("subject", "model", "condition", "layer", "dim", "roi", "measure", "value")
FAILURE_POLICIES = ("skip", "retry")
RL_CONDITION = "policy"
"""Condition column of an RL agent's rows (it has no prompt)."""


class StudyConfigError(ValueError):
    """A study config that cannot be read: the message names the file and the key."""


# --- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    """One model whose activations are extracted and fitted (a ``[[agents]]`` table)."""

    name: str
    """Label: the ``model`` column of the scores, the name comparisons and partitions use (unique)."""
    kind: str
    """``vlm`` (VLMs and LAMs: Qwen2.5-VL / Qwen2-VL family) or ``rl`` (Nature-CNN)."""
    model: str = ""
    """Model directory or hub name (vlm); checkpoint ('' = the one shipped for the game, rl)."""
    conditions: tuple[str, ...] = ("action",)
    """Prompt conditions (vlm), all run in one batched forward; rl has one, ``policy``."""
    layers: tuple[int, ...] | None = None
    """Hidden-state entries fitted (vlm; 0 = embeddings; None = all)."""
    poolings: tuple[str, ...] = ("last_token",)
    """Poolings fitted (vlm): ``last_token`` and/or ``mean_image``; with two, the model column is
    ``<name>_<pooling>``."""
    rl_layers: tuple[str, ...] = ("penultimate",)
    """RL activations fitted: penultimate, conv1, conv2, conv3."""


@dataclass(frozen=True)
class FitOptions:
    """How every subject × feature space is fitted and scored (the ``[fit]`` table)."""

    dims: tuple[int, ...] = (8, 64, 1024)
    """PCA dimensions (the method's 8/64/1024), each capped by the features' dims and the training rows."""
    delays: tuple[int, ...] = (1, 2, 3, 4)
    """FIR delays in TRs."""
    alphas: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 8, 21))
    """Ridge penalties searched per voxel (leave-one-run-out within the training runs)."""
    preprocess: str = "none"
    """BOLD cleaning before the ridge (``encoders.data.FitPreprocess.mode``: none, offline, causal); the
    held-out runs are cleaned as the weights record."""
    confounds: tuple[str, ...] | None = None
    """fMRIPrep confound sets for ``offline``/``causal`` (None = auto)."""
    high_pass_hz: float = 1 / 128
    """Cosine drift cut-off of ``offline``/``causal`` cleaning, Hz."""
    partition_dims: tuple[int, ...] = ()
    """PCA dimensions of the variance partitioning (() = every one of ``dims``; the joint banded-ridge fit costs
    several single fits)."""
    banded_iter: int = 10
    """Random-search iterations of the joint (banded ridge) model of a partition pair."""
    backend: str = "numpy"
    """himalaya backend."""
    min_runs: int = 3
    """Fewest runs a subject needs (each is held out in turn; the others train): fewer → subject skipped."""


@dataclass(frozen=True)
class PartitionPair:
    """Variance partitioning of two conditions of one model (a ``[[partition]]`` table)."""

    model: str
    a: str
    """Condition A (e.g. ``action``): ``unique_a`` is what only A explains."""
    b: str
    """Condition B (e.g. ``reasoning``)."""

    @property
    def condition(self) -> str:
        """The ``condition`` column of its score rows: ``<a>+<b>``."""
        return f"{self.a}+{self.b}"


@dataclass(frozen=True)
class StatsOptions:
    """Group statistics (the ``[stats]`` table), passed to ``pipelines.group.group_table``."""

    alpha: float = 0.05
    """FDR level (Benjamini–Hochberg across ROIs × comparisons)."""
    n_perm: int = 10000
    """Sign-flip permutations (exact enumeration when there are fewer sign patterns)."""
    seed: int = 0
    test: str = "signflip"
    """``signflip`` (paired differences, small N: the method's usual choice) or ``wilcoxon``."""


@dataclass(frozen=True)
class ComparisonConfig:
    """A paired comparison (a ``[[comparisons]]`` table): rows matching ``a`` vs rows matching ``b``."""

    name: str
    a: tuple[tuple[str, str], ...]
    """Column → value pairs selecting side A (e.g. model = vlm, condition = reasoning)."""
    b: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StudyConfig:
    """A whole study, as ``study.toml`` describes it (paths resolved against the file's folder)."""

    path: Path
    """The TOML file (named in every error)."""
    bids: Path
    """BIDS dataset root: ``sub-*/func/*_events.tsv`` link each run to its recording (``stim_file``)."""
    atlas: Path
    """ROI atlas NIfTI (integer labels) on the BOLD grid."""
    agents: tuple[AgentConfig, ...]
    title: str = "neuroarcade study"
    bold: Path | None = None
    """Folder of the BOLD runs in fMRIPrep's derivatives layout
    (``sub-X/func/<run>_space-<space>_desc-preproc_bold.nii.gz``); None = the raw runs
    ``sub-X/func/<run>_bold.nii.gz``."""
    space: str = ""
    """fMRIPrep output space of the derivatives BOLD ('' = any single one)."""
    task: str = ""
    """BIDS task label ('' = every task)."""
    subjects: tuple[str, ...] = ()
    """Subject labels without ``sub-`` (() = every ``sub-*`` folder)."""
    runs: tuple[str, ...] = ()
    """Run labels every subject should have (() = every run any subject has); a missing one is reported."""
    recordings: Path | None = None
    """Folder the events' ``stim_file`` paths are relative to (None = the dataset root)."""
    atlas_labels: Path | None = None
    """TSV (index, name) of the atlas."""
    rois: tuple[str, ...] = ()
    """ROIs scored (() = every labelled ROI of the atlas)."""
    mask: Path | None = None
    """Brain mask NIfTI (None = the atlas's labelled voxels)."""
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """How decisions are taken from the replayed recordings (``[extract]``)."""
    fit: FitOptions = field(default_factory=FitOptions)
    partitions: tuple[PartitionPair, ...] = ()
    comparisons: tuple[ComparisonConfig, ...] = ()
    stats: StatsOptions = field(default_factory=StatsOptions)
    truth: Path | None = None
    """``truth.tsv`` of a synthetic study (planted signs): the report adds planted vs recovered."""
    cache: Path | None = None
    """Task cache (None = ``OUT/cache``); reused across studies whose tasks have the same fingerprints."""
    on_failure: str = "skip"
    """A failed task: ``skip`` (report it, go on without it) or ``retry`` (``retries`` more tries, then skip)."""
    retries: int = 1


_TOP = {"study", "extract", "fit", "stats", "agents", "partition", "comparisons"}
_STUDY_KEYS = {f.name for f in fields(StudyConfig)} - {"path", "agents", "extract", "fit", "partitions", "comparisons",
                                                      "stats"}


def _err(path: Path, key: str, msg: str) -> StudyConfigError:
    return StudyConfigError(f"{path}: {key}: {msg}")


def _check_keys(path: Path, where: str, table: dict, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _err(path, where + unknown[0] if where.endswith(".") else f"{where}.{unknown[0]}",
                   f"unknown key (known: {', '.join(sorted(allowed))})")


def _check_table(path: Path, key: str, table: Any, allowed: set[str], required: tuple[str, ...]) -> dict:
    """One ``[[array]]`` entry: a table with no unknown key and every required one."""
    _typed(path, key, table, dict, "a table")
    _check_keys(path, key, table, allowed)
    for req in required:
        if req not in table:
            raise _err(path, f"{key}.{req}", "required")
    return table


def _typed(path: Path, key: str, value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise _err(path, key, f"must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise _err(path, key, f"must be {what}, got {value!r}")
    return value


def _str_list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _typed(path, key, value, list, "a list of strings")
    for i, v in enumerate(value):
        if isinstance(v, int) and not isinstance(v, bool):
            value[i] = str(v)
        else:
            _typed(path, f"{key}[{i}]", v, str, "a string")
    return tuple(value)


def _int_list(path: Path, key: str, value: Any) -> tuple[int, ...]:
    _typed(path, key, value, list, "a list of integers")
    for i, v in enumerate(value):
        _typed(path, f"{key}[{i}]", v, int, "an integer")
    return tuple(value)


def load_study_config(path: str | os.PathLike) -> StudyConfig:
    """Parse and check ``study.toml``; raises :class:`StudyConfigError` naming the file and key.

    References that can only be checked against the data (ROI names in the atlas) and those to agents a
    comparison or partition names are checked by :func:`run_study`, which reports them and goes on.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyConfigError(f"{path}: no such study config") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyConfigError(f"{path}: not valid TOML ({e})") from None
    base = path.parent
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise _err(path, unknown[0], f"unknown table or key (known: {', '.join(sorted(_TOP))})")
    study = raw.get("study")
    if not isinstance(study, dict):
        raise _err(path, "study", "missing [study] table (bids, atlas, …)")
    _check_keys(path, "study", study, _STUDY_KEYS)

    def p(key: str, required: bool = False) -> Path | None:
        if key not in study:
            if required:
                raise _err(path, f"study.{key}", "required")
            return None
        v = _typed(path, f"study.{key}", study[key], str, "a path string")
        return (base / v).resolve() if v else None

    bids = p("bids", required=True)
    atlas = p("atlas", required=True)
    if not bids.is_dir():
        raise _err(path, "study.bids", f"{bids} is not a folder")
    if not atlas.is_file():
        raise _err(path, "study.atlas", f"{atlas}: no such atlas file")

    agents_raw = raw.get("agents")
    if not isinstance(agents_raw, list) or not agents_raw:
        raise _err(path, "agents", "at least one [[agents]] table is required")
    agents = []
    allowed_agent = {f.name for f in fields(AgentConfig)}
    for i, a in enumerate(agents_raw):
        key = f"agents[{i}]"
        _check_table(path, key, a, allowed_agent, ("name", "kind"))
        name = _typed(path, f"{key}.name", a["name"], str, "a string")
        kind = _typed(path, f"{key}.kind", a["kind"], str, "a string")
        model = _typed(path, f"{key}.model", a.get("model", ""), str, "a string")
        if model and (base / model).exists():
            model = str((base / model).resolve())
        agents.append(AgentConfig(
            name=name, kind=kind, model=model,
            conditions=_str_list(path, f"{key}.conditions", a["conditions"]) if "conditions" in a else
            ((RL_CONDITION,) if kind == "rl" else ("action",)),
            layers=_int_list(path, f"{key}.layers", a["layers"]) if "layers" in a else None,
            poolings=_str_list(path, f"{key}.poolings", a.get("poolings", ["last_token"])),
            rl_layers=_str_list(path, f"{key}.rl_layers", a.get("rl_layers", ["penultimate"]))))
    names = [a.name for a in agents]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(path, "agents", f"agent names must be unique; repeated: {dup}")

    ex = raw.get("extract", {})
    _typed(path, "extract", ex, dict, "a table")
    allowed = {f.name for f in fields(ExtractConfig)}
    _check_keys(path, "extract", ex, allowed)
    extract = ExtractConfig(**{k: _typed(path, f"extract.{k}", v, (int, float), "a number") for k, v in ex.items()})

    ft = raw.get("fit", {})
    _typed(path, "fit", ft, dict, "a table")
    _check_keys(path, "fit", ft, {f.name for f in fields(FitOptions)})
    fo: dict[str, Any] = {}
    for k, v in ft.items():
        if k in ("dims", "delays", "partition_dims"):
            fo[k] = _int_list(path, f"fit.{k}", v)
        elif k == "alphas":
            _typed(path, "fit.alphas", v, list, "a list of numbers")
            fo[k] = tuple(float(_typed(path, f"fit.alphas[{j}]", x, (int, float), "a number")) for j, x in enumerate(v))
        elif k == "confounds":
            fo[k] = _str_list(path, "fit.confounds", v)
        elif k in ("preprocess", "backend"):
            fo[k] = _typed(path, f"fit.{k}", v, str, "a string")
        elif k == "high_pass_hz":
            fo[k] = float(_typed(path, f"fit.{k}", v, (int, float), "a number"))
        else:
            fo[k] = _typed(path, f"fit.{k}", v, int, "an integer")
    fit = FitOptions(**fo)
    if not fit.dims or any(d < 1 for d in fit.dims):
        raise _err(path, "fit.dims", "give positive PCA dimensions, e.g. [8, 64, 1024]")
    if fit.min_runs < 2:
        raise _err(path, "fit.min_runs", "at least 2 (one run is held out, the others train)")
    try:
        from encoders.data import FitPreprocess

        FitPreprocess(mode=fit.preprocess, confounds=fit.confounds, high_pass_hz=fit.high_pass_hz)
    except ValueError as e:
        raise _err(path, "fit.preprocess", str(e)) from None

    parts = []
    for i, t in enumerate(raw.get("partition", [])):
        key = f"partition[{i}]"
        _check_table(path, key, t, {"model", "a", "b"}, ("model", "a", "b"))
        parts.append(PartitionPair(*(_typed(path, f"{key}.{k}", t[k], str, "a string") for k in ("model", "a", "b"))))

    comps = []
    for i, t in enumerate(raw.get("comparisons", [])):
        key = f"comparisons[{i}]"
        _check_table(path, key, t, {"name", "a", "b"}, ("name", "a", "b"))
        sides = []
        for s in ("a", "b"):
            side = _typed(path, f"{key}.{s}", t[s], dict, "a table of column = value (e.g. {model = \"vlm\"})")
            bad = sorted(set(side) - {"model", "condition", "layer", "dim", "roi", "measure"})
            if bad:
                raise _err(path, f"{key}.{s}.{bad[0]}", "not a column of the scores (model, condition, layer, dim, "
                                                        "roi, measure)")
            sides.append(tuple(sorted((k, str(v)) for k, v in side.items())))
        comps.append(ComparisonConfig(_typed(path, f"{key}.name", t["name"], str, "a string"), sides[0], sides[1]))

    st = raw.get("stats", {})
    _typed(path, "stats", st, dict, "a table")
    _check_keys(path, "stats", st, {f.name for f in fields(StatsOptions)})
    stats = StatsOptions(**st)
    if stats.test not in ("signflip", "wilcoxon"):
        raise _err(path, "stats.test", f"{stats.test!r}: choose signflip or wilcoxon")

    on_failure = study.get("on_failure", "skip")
    if on_failure not in FAILURE_POLICIES:
        raise _err(path, "study.on_failure", f"{on_failure!r}: choose one of {', '.join(FAILURE_POLICIES)}")
    rec = p("recordings")
    return StudyConfig(
        path=path, bids=bids, atlas=atlas, agents=tuple(agents),
        title=_typed(path, "study.title", study.get("title", "neuroarcade study"), str, "a string"),
        bold=p("bold"), space=_typed(path, "study.space", study.get("space", ""), str, "a string"),
        task=_typed(path, "study.task", study.get("task", ""), str, "a string"),
        subjects=tuple(s.removeprefix("sub-") for s in _str_list(path, "study.subjects", study.get("subjects", []))),
        runs=tuple(r.removeprefix("run-") for r in _str_list(path, "study.runs", study.get("runs", []))),
        recordings=rec, atlas_labels=p("atlas_labels"),
        rois=_str_list(path, "study.rois", study.get("rois", [])), mask=p("mask"), extract=extract, fit=fit,
        partitions=tuple(parts), comparisons=tuple(comps), stats=stats, truth=p("truth"), cache=p("cache"),
        on_failure=on_failure, retries=_typed(path, "study.retries", study.get("retries", 1), int, "an integer"))


# --- discovery: subjects, runs, recordings --------------------------------------------------------


@dataclass(frozen=True)
class RunInputs:
    """One run of one subject: its BOLD and the recording of what was on screen."""

    subject: str
    run: str
    """BIDS run label (without ``run-``)."""
    bold: str
    recording: str
    n_volumes: int


@dataclass
class Problem:
    """Something the study could not use as given, and what it did instead."""

    where: str
    """File or config key."""
    message: str
    action: str
    """``skipped subject``, ``skipped run``, ``skipped comparison``, …"""


def _run_label(name: str) -> str:
    from encoders.data import bids_entities

    return bids_entities(name)[0].get("run", "1")


def discover_runs(cfg: StudyConfig, problems: list[Problem]) -> dict[str, list[RunInputs]]:
    """Subject → its usable runs (sorted by run label). Missing subjects, runs, BOLD files, events or
    recordings are appended to ``problems`` and left out."""
    import nibabel as nib

    from encoders.data import bids_entities

    root = cfg.bids
    if cfg.subjects:
        subjects = list(cfg.subjects)
    else:
        subjects = sorted(p.name.removeprefix("sub-") for p in root.glob("sub-*") if p.is_dir())
    found: dict[str, dict[str, RunInputs]] = {}
    seen_runs: set[str] = set()
    for sub in subjects:
        sdir = root / f"sub-{sub}"
        if not sdir.is_dir():
            problems.append(Problem(f"{cfg.path}: study.subjects", f"sub-{sub}: no folder {sdir}", "skipped subject"))
            continue
        runs: dict[str, RunInputs] = {}
        pattern = f"sub-{sub}_*task-{cfg.task or '*'}_*events.tsv"
        for ev in sorted(sdir.glob(f"**/func/{pattern}")):
            ents, _ = bids_entities(ev)
            label = ents.get("run", "1")
            seen_runs.add(label)
            stem = ev.name.removesuffix("_events.tsv")
            bold = _bold_path(cfg, ev, stem)
            if bold is None or not bold.is_file():
                problems.append(Problem(str(bold or ev), f"sub-{sub} run-{label}: BOLD run missing", "skipped run"))
                continue
            stim = _stim_file(ev)
            if stim is None:
                problems.append(Problem(str(ev), f"sub-{sub} run-{label}: no stim_file (gameplay recording) in the "
                                                 "events", "skipped run"))
                continue
            rec = ((cfg.recordings or root) / stim)
            if not rec.is_file() and (root / stim).is_file():
                rec = root / stim
            if not rec.is_file():
                problems.append(Problem(str(ev), f"sub-{sub} run-{label}: recording {rec} missing", "skipped run"))
                continue
            try:
                n = int(nib.load(str(bold)).shape[3])
            except Exception as e:  # a damaged header
                problems.append(Problem(str(bold), f"sub-{sub} run-{label}: unreadable BOLD ({e})", "skipped run"))
                continue
            runs[label] = RunInputs(sub, label, str(bold), str(rec.resolve()), n)
        found[sub] = runs
    expected = list(cfg.runs) or sorted(seen_runs, key=_natural)
    out: dict[str, list[RunInputs]] = {}
    for sub, runs in found.items():
        for label in expected:
            if label not in runs and not any(p.message.startswith(f"sub-{sub} run-{label}:") for p in problems):
                problems.append(Problem(str(root / f"sub-{sub}"), f"sub-{sub} run-{label}: run missing (no events "
                                                                  "file for it)", "skipped run"))
        usable = [runs[k] for k in sorted(runs, key=_natural) if not cfg.runs or k in cfg.runs]
        if len(usable) < cfg.fit.min_runs:
            problems.append(Problem(str(root / f"sub-{sub}"), f"sub-{sub}: {len(usable)} usable runs, "
                                                              f"fit.min_runs is {cfg.fit.min_runs}", "skipped subject"))
            continue
        out[sub] = usable
    return out


def _natural(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _bold_path(cfg: StudyConfig, events: Path, stem: str) -> Path | None:
    if cfg.bold is None:
        for ext in (".nii.gz", ".nii"):
            p = events.parent / f"{stem}_bold{ext}"
            if p.is_file():
                return p
        return events.parent / f"{stem}_bold.nii.gz"
    rel = events.parent.relative_to(cfg.bids)
    space = f"_space-{cfg.space}" if cfg.space else "_space-*"
    hits = sorted((cfg.bold / rel).glob(f"{stem}{space}_desc-preproc_bold.nii*")) + \
        sorted((cfg.bold / rel).glob(f"{stem}_desc-preproc_bold.nii*"))
    return hits[0] if hits else (cfg.bold / rel / f"{stem}{space.replace('*', 'X')}_desc-preproc_bold.nii.gz")


def _stim_file(events: Path) -> str | None:
    import csv

    with open(events, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            v = (row.get("stim_file") or "").strip()
            if v and v != "n/a":
                return v
    return None


# --- fingerprints and the cache ------------------------------------------------------------------


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Digests:
    """Content hashes of input files, computed once per (path, size, mtime)."""

    def __init__(self):
        self._memo: dict[tuple, str] = {}

    def file(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._memo:
            self._memo[key] = file_digest(path)
        return self._memo[key]

    def model(self, model: str) -> str:
        """A model directory: hashes of its small files (configs, tokenizer) and the sizes of the large ones;
        a file: its hash; a hub name or '': itself."""
        p = Path(model) if model else None
        if p is None or not p.exists():
            return model
        if p.is_file():
            return self.file(p)
        items = []
        for f in sorted(p.rglob("*")):
            if f.is_file():
                size = f.stat().st_size
                items.append((str(f.relative_to(p)), size, self.file(f) if size < 64 << 20 else ""))
        return _h(items)


class Cache:
    """``CACHE/<stage>/<fp>/``: arrays (``.npy``) and a ``meta.json`` written last (present = done)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def has(self, stage: str, fp: str) -> bool:
        return (self.dir(stage, fp) / "meta.json").is_file()

    def meta(self, stage: str, fp: str) -> dict:
        return json.loads((self.dir(stage, fp) / "meta.json").read_text())

    def array(self, stage: str, fp: str, name: str) -> np.ndarray:
        return np.load(self.dir(stage, fp) / f"{name}.npy", allow_pickle=False)

    def put(self, stage: str, fp: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        import io

        d = self.dir(stage, fp)
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
            atomic_write_bytes(d / f"{name}.npy", buf.getvalue())
        atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=1, sort_keys=True, default=str).encode())


# --- tasks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceRef:
    """One feature space of one subject: the extract task outputs it comes from, per run."""

    name: str
    """Space name as extraction writes it (``vlm_action_last_token_l2``)."""
    model: str
    condition: str
    layer: int
    dim: int
    """Raw feature dim."""
    runs: tuple[tuple[str, str], ...]
    """Per run of the subject: (cache folder of the extract task, run label)."""


@dataclass(frozen=True)
class FitTask:
    """Fit on every run but one, predict that one (one space, or a pair jointly)."""

    subject: str
    spaces: tuple[tuple[str, tuple[str, ...]], ...]
    """(space name, per run its feature .npy) for each space fitted (two = jointly, banded ridge)."""
    bold: tuple[str, ...]
    """Every run's BOLD, in run order."""
    n_volumes: tuple[int, ...]
    held_out: int
    """Index of the run predicted."""
    pca: int
    """PCA dimension used (the configured one, capped)."""
    mask: str
    tr: float | None
    options: FitOptions
    threads: int = 1


@dataclass(frozen=True)
class ScoreTask:
    """Held-out r, R² and partitions of one subject, from its fit tasks' predictions."""

    subject: str
    bold: tuple[str, ...]
    mask: str
    atlas: str
    atlas_labels: str | None
    rois: tuple[str, ...]
    preprocess: tuple[str, tuple[str, ...] | None, float]
    """(mode, confounds, high_pass_hz) the fits recorded, applied to each held-out run."""
    tr: float | None
    singles: tuple[tuple[tuple[str, str, int, int], tuple[str, ...]], ...]
    """((model, condition, layer, dim), per held-out run the prediction .npy) of each single space."""
    pairs: tuple[tuple[tuple[str, str, str, int, int], tuple[str, ...]], ...]
    """((model, a, b, layer, dim), per held-out run the joint prediction .npy) of each partition pair."""


def _trimmed(src: str, n: int, dst: Path) -> Path:
    X = np.load(src, allow_pickle=False)
    if len(X) < n:
        from encoders.data import FitInputError

        raise FitInputError(f"{src}: {len(X)} feature rows for a BOLD run of {n} volumes")
    np.save(dst, X[:n])
    meta = Path(src).with_suffix(".json")
    if meta.is_file():
        dst.with_suffix(".json").write_text(meta.read_text())
    return dst


def own_zscore(X: np.ndarray, space) -> np.ndarray:
    """Rows of a held-out run that the weights' space turns into the run z-scored on its own (as the fit z-scores
    every training run, and its nested leave-one-run-out every held-out one); the PCA basis, delays and
    coefficients stay the training runs'."""
    from encoders.fit import zscore_run

    return zscore_run(X)[0] * space.std + space.mean


def fit_task(task: FitTask) -> dict:
    """``pipelines.fit.run_fit`` on the training runs (features trimmed to each run's volumes), then the
    weights predict the held-out run (its features z-scored on their own: :func:`own_zscore`):
    ``{"pred": (T, V) float32, "meta": {...}}``."""
    from encoders.data import FitPreprocess
    from encoders.fit import FitConfig
    from encoders.weights import EncodingWeights
    from pipelines.fit import FitRunConfig, SpaceFiles, run_fit

    o = task.options
    train = [i for i in range(len(task.bold)) if i != task.held_out]
    with tempfile.TemporaryDirectory(prefix="study-fit-") as tmp:
        tmp = Path(tmp)
        spaces, test_x = [], []
        for name, files in task.spaces:
            trimmed = [_trimmed(files[i], task.n_volumes[i], tmp / f"{name}_run{i}.npy") for i in range(len(files))]
            spaces.append(SpaceFiles(name, [trimmed[i] for i in train]))
            test_x.append(np.load(trimmed[task.held_out]))
        cfg = FitRunConfig(
            out=tmp / "weights.safetensors", bold=[Path(task.bold[i]) for i in train], spaces=spaces,
            mask=Path(task.mask), tr=task.tr,
            preprocess=FitPreprocess(mode=o.preprocess, confounds=o.confounds, high_pass_hz=o.high_pass_hz),
            fit=FitConfig(delays=list(o.delays), pca=task.pca, alphas=np.asarray(o.alphas), backend=o.backend,
                          blas_threads=task.threads, score=False, progress=False, banded_iter=o.banded_iter),
            reports=False, record_feature_files=False)
        summary = run_fit(cfg)
        w = EncodingWeights.load(summary.weights)
        pred = w.predict([own_zscore(x, space) for x, space in zip(test_x, w.spaces)]).astype(np.float32)
        meta = {"preprocess": w.preprocessing.mode, "alpha_median": float(np.median(w.alphas)),
                "pca": [s.out_dim for s in w.spaces], "runs": len(train), "voxels": int(w.n_voxels)}
    return {"pred": pred, "meta": meta}


def _held_out_bold(task: ScoreTask) -> list[np.ndarray]:
    """Each run's BOLD in the mask, cleaned as the fits recorded (mode none: z-scored per run)."""
    from encoders.data import FitPreprocess, clean_bold, load_bold
    from encoders.fit import zscore_run

    mode, confounds, hp = task.preprocess
    ys = []
    for b in task.bold:
        bold = load_bold([b], Path(task.mask), task.tr)
        runs, _ = clean_bold(bold, FitPreprocess(mode=mode, confounds=confounds, high_pass_hz=hp))
        ys.append(zscore_run(runs[0])[0])
    return ys


def score_task(task: ScoreTask) -> list[dict]:
    """Tidy rows (SCORE_COLUMNS) of one subject: per ROI the voxel mean of held-out r and R² per space and
    dim, and of unique A, unique B and shared per partition pair."""
    from encoders.data import load_atlas, load_bold
    from encoders.fit import r2_score, variance_partition
    from encoders.score import mean_r, pearson_r

    ys = _held_out_bold(task)
    y = np.concatenate(ys)
    ref = load_bold([task.bold[0]], Path(task.mask), task.tr)
    labels, names = load_atlas(task.atlas, task.atlas_labels, ref.mask, ref.affine)
    by_name = {v: k for k, v in names.items()}
    rois = [(roi, labels == by_name[roi]) for roi in task.rois if (labels == by_name.get(roi, -1)).any()]

    def preds(files: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.load(f) for f in files]).astype(np.float64)

    rows = []
    r2: dict[tuple, np.ndarray] = {}
    for (model, cond, layer, dim), files in task.singles:
        p = preds(files)
        r = pearson_r(y.astype(np.float64), p)
        r2[(model, cond, layer, dim)] = q = r2_score(y.astype(np.float64), p)
        for roi, sel in rois:
            rows.append(dict(subject=task.subject, model=model, condition=cond, layer=layer, dim=dim, roi=roi,
                             measure="r", value=mean_r(r[sel])[0]))
            rows.append(dict(subject=task.subject, model=model, condition=cond, layer=layer, dim=dim, roi=roi,
                             measure="r2", value=float(q[sel].mean())))
    for (model, a, b, layer, dim), files in task.pairs:
        joint = r2_score(y.astype(np.float64), preds(files))
        parts = variance_partition(joint, r2[(model, a, layer, dim)], r2[(model, b, layer, dim)])
        for roi, sel in rois:
            for measure in ("unique_a", "unique_b", "shared"):
                rows.append(dict(subject=task.subject, model=model, condition=f"{a}+{b}", layer=layer, dim=dim,
                                 roi=roi, measure=measure, value=float(parts[measure][sel].mean())))
    return rows


def group_task(scores_rows: list[dict], comparisons: tuple[ComparisonConfig, ...], stats: StatsOptions) -> list[dict]:
    """``pipelines.group.group_table`` on the tidy scores (rows as dicts, for the cache)."""
    import pandas as pd

    from pipelines.group import Comparison, group_table

    scores = scores_frame(scores_rows)
    comps = [Comparison(c.name, dict(c.a), dict(c.b)) for c in comparisons]
    table = pd.DataFrame(group_table(scores, comps, alpha=stats.alpha, n_perm=stats.n_perm, seed=stats.seed,
                                     test=stats.test))
    return {"columns": [str(c) for c in table.columns], "attrs": dict(table.attrs),
            "rows": [[v.item() if hasattr(v, "item") else v for v in row] for row in table.itertuples(index=False)]}


def scores_frame(rows: list[dict]):
    """Tidy scores as a DataFrame with SCORE_COLUMNS, sorted (one row per subject × model × condition × layer
    × dim × ROI × measure)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    df["layer"] = df["layer"].astype(int)
    df["dim"] = df["dim"].astype(int)
    df["value"] = df["value"].astype(float)
    return df.sort_values(list(SCORE_COLUMNS[:-1]), kind="stable").reset_index(drop=True)


# --- the runner ------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    stage: str
    key: str
    """Readable identity (``sub-01/run-2/vlm``)."""
    fp: str
    fn: Callable
    args: tuple
    inputs: dict
    """What the task reads, for a failure report."""
    store: Callable[[Any], tuple[dict[str, np.ndarray], dict]]
    """Result → (arrays, meta) the driver caches."""


@dataclass
class StageStats:
    tasks: int = 0
    executed: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0


def _call(fn: Callable, *args) -> Any:
    """``fn(*args)`` with one BLAS/OpenMP thread outside what a task sets itself (a fit's ``blas_threads``): the
    numbers must not depend on where a task ran (a Ray worker gets OMP_NUM_THREADS=1, a driver whatever its
    environment says), or a resumed study would not reproduce an uninterrupted one bit for bit."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fn(*args)


class Runner:
    """Runs a stage's tasks not yet in the cache, as Ray tasks or in order; the driver alone writes."""

    def __init__(self, out: Path, cache: Cache, *, sequential: bool, address: str | None, num_cpus: int,
                 policy: str, retries: int, progress, session: str):
        self.out, self.cache = out, cache
        self.sequential, self.address, self.num_cpus = sequential, address, num_cpus
        self.policy, self.retries = policy, retries
        self.progress = progress
        self.session = session
        self.stats: dict[str, StageStats] = {}
        self.failures: list[dict] = []
        self._remote: dict[Callable, Any] = {}

    def _ray(self):
        from pipelines.batch import init_ray

        return init_ray(self.address, self.num_cpus)

    def _submit(self, t: TaskSpec):
        ray = self._ray()
        if _call not in self._remote:
            self._remote[_call] = ray.remote(num_cpus=1, max_retries=0)(_call)
        return self._remote[_call].remote(t.fn, *t.args)

    def _finish(self, t: TaskSpec, result: Any, seconds: float, st: StageStats) -> None:
        arrays, meta = t.store(result)
        self.cache.put(t.stage, t.fp, arrays, {**meta, "key": t.key, "stage": t.stage})
        # right after the marker (a kill can only fall between the two in a few microseconds); appended, not
        # fsynced: a killed process loses nothing the kernel already has
        with open(self.out / LEDGER, "a") as f:
            f.write(json.dumps({"stage": t.stage, "key": t.key, "fp": t.fp, "seconds": round(seconds, 3),
                                "session": self.session}) + "\n")
        st.executed += 1

    def _fail(self, t: TaskSpec, err: BaseException, tries: int, st: StageStats) -> None:
        msg = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
        if "RayTaskError" in type(err).__name__ and getattr(err, "cause", None) is not None:
            cause = err.cause
            msg = f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:500]
        self.failures.append({"stage": t.stage, "key": t.key, "error": msg, "tries": tries, "inputs": t.inputs,
                              "action": "skipped"})
        st.failed += 1

    def run(self, stage: str, tasks: list[TaskSpec]) -> dict[str, bool]:
        """Key → done (cached or computed now). Failures are recorded in ``self.failures``."""
        st = self.stats.setdefault(stage, StageStats())
        st.tasks += len(tasks)
        t0 = time.perf_counter()
        done: dict[str, bool] = {}
        todo = []
        for t in tasks:
            if self.cache.has(stage, t.fp):
                st.cached += 1
                done[t.key] = True
            else:
                todo.append(t)
        bar = self.progress.stage(stage, len(tasks), len(tasks) - len(todo))
        tries_allowed = 1 + (self.retries if self.policy == "retry" else 0)
        if self.sequential:
            for t in todo:
                for attempt in range(1, tries_allowed + 1):
                    s0 = time.perf_counter()
                    try:
                        result = _call(t.fn, *t.args)
                    except Exception as e:
                        if attempt == tries_allowed:
                            self._fail(t, e, attempt, st)
                            done[t.key] = False
                        continue
                    self._finish(t, result, time.perf_counter() - s0, st)
                    done[t.key] = True
                    break
                bar.advance()
        elif todo:
            ray = self._ray()
            pending = {}
            for t in todo:
                pending[self._submit(t)] = (t, 1, time.perf_counter())
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                t, attempt, s0 = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as e:
                    if attempt < tries_allowed:
                        pending[self._submit(t)] = (t, attempt + 1, time.perf_counter())
                        continue
                    self._fail(t, e, attempt, st)
                    done[t.key] = False
                    bar.advance()
                    continue
                self._finish(t, result, time.perf_counter() - s0, st)
                done[t.key] = True
                bar.advance()
        st.seconds += time.perf_counter() - t0
        return done


class StudyProgress:
    """One rich view for the whole study: a row per stage (done / total, elapsed, time left) and a total."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.p = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), disable=not enabled,
                          console=Console(stderr=True))
        self.total = None
        self.planned = 0

    def __enter__(self):
        self.p.__enter__()
        self.total = self.p.add_task("study", total=None)
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def stage(self, name: str, total: int, completed: int):
        p, whole = self.p, self.total
        task = p.add_task(name, total=total, completed=completed)
        self.planned += total
        p.update(whole, total=self.planned, advance=completed)

        class _Bar:
            def advance(self_inner):
                p.advance(task)
                p.advance(whole)
        return _Bar()


# --- the driver ------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    out: Path
    scores: Any
    """pandas DataFrame (SCORE_COLUMNS)."""
    group: Any
    """pandas DataFrame (group.tsv), None when the group stage failed."""
    problems: list[Problem]
    failures: list[dict]
    stages: dict[str, StageStats]
    recovery: dict | None = None
    report: Any = None


def _agent_spec(a: AgentConfig):
    from agents.spec import AgentSpec

    if a.kind == "rl":
        return AgentSpec(a.name, "rl", model=a.model, rl_layers=a.rl_layers)
    return AgentSpec(a.name, "vlm", model=a.model, conditions=a.conditions, layers=a.layers, poolings=a.poolings)


def check_agents(cfg: StudyConfig, problems: list[Problem]) -> list[AgentConfig]:
    """Agents that can be built; an unknown kind, pooling or RL layer, or a model that is not there, is a
    problem naming its key (that agent is left out)."""
    from agents.spec import MODEL_KINDS
    from agents.vlm import POOLINGS

    ok = []
    for i, a in enumerate(cfg.agents):
        key = f"{cfg.path}: agents[{i}] ({a.name})"
        if a.kind not in MODEL_KINDS:
            problems.append(Problem(f"{key}.kind", f"unknown agent kind {a.kind!r} (choose {', '.join(MODEL_KINDS)})",
                                    "skipped agent"))
            continue
        path_like = a.model.startswith(("/", ".", "~")) or a.model.count("/") > 1  # a hub name is org/name
        if a.model and path_like and not Path(a.model).expanduser().exists():
            problems.append(Problem(f"{key}.model", f"no model at {a.model}", "skipped agent"))
            continue
        if a.kind == "vlm":
            if not a.model:
                problems.append(Problem(f"{key}.model", "a vlm agent needs a model (directory or hub name)",
                                        "skipped agent"))
                continue
            bad = [p for p in a.poolings if p not in POOLINGS]
            if bad:
                problems.append(Problem(f"{key}.poolings", f"unknown pooling {bad[0]!r} (choose {', '.join(POOLINGS)})",
                                        "skipped agent"))
                continue
        ok.append(a)
    return ok


def _model_label(a: AgentConfig, pooling: str) -> str:
    return a.name if a.kind == "rl" or len(a.poolings) == 1 else f"{a.name}_{pooling}"


def run_study(cfg: StudyConfig, out: str | os.PathLike, *, address: str | None = None, sequential: bool = False,
              num_cpus: int = 2, threads: int = 1, progress: bool = True, cache: str | os.PathLike | None = None,
              report: bool = True, say: Callable[[str], None] | None = None) -> StudyResult:
    """Run (or resume) the study; write ``OUT/scores.tsv``, ``group.tsv``, ``summary.json``, figures and
    ``report.html`` (``write_study_report``), ``OUT/study.json`` (problems, failures, task counts) and the
    ledger. ``threads``: BLAS threads of each fit (sequential runs may give it the cores Ray would use)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = Cache(Path(cache) if cache else cfg.cache or out / "cache")
    problems: list[Problem] = []
    say = say or (lambda s: None)
    digests = Digests()
    session = f"{os.getpid()}-{time.time_ns()}"
    agents = check_agents(cfg, problems)
    agent_names = {a.name for a in agents}

    # config references checked against what exists
    partitions = []
    for i, pp in enumerate(cfg.partitions):
        a = next((x for x in agents if x.name == pp.model), None)
        if a is None:
            problems.append(Problem(f"{cfg.path}: partition[{i}].model",
                                    f"unknown agent {pp.model!r} (agents: {', '.join(sorted(agent_names))})",
                                    "skipped partition"))
            continue
        bad = [c for c in (pp.a, pp.b) if c not in a.conditions]
        if bad:
            problems.append(Problem(f"{cfg.path}: partition[{i}]", f"agent {a.name!r} has no condition {bad[0]!r} "
                                                                   f"(it has {', '.join(a.conditions)})",
                                    "skipped partition"))
            continue
        partitions.append(pp)
    model_labels = {_model_label(a, p) for a in agents for p in (a.poolings if a.kind == "vlm" else ("",))}
    comparisons = []
    for i, c in enumerate(cfg.comparisons):
        bad = [v for side in (c.a, c.b) for k, v in side if k == "model" and v not in model_labels]
        if bad:
            problems.append(Problem(f"{cfg.path}: comparisons[{i}] ({c.name})",
                                    f"unknown agent {bad[0]!r} (agents: {', '.join(sorted(model_labels))})",
                                    "skipped comparison"))
            continue
        comparisons.append(c)

    # mask and atlas
    import nibabel as nib

    atlas_img = nib.load(str(cfg.atlas))
    mask_path = cfg.mask
    if mask_path is None:
        mask_path = store.root / "mask" / f"atlas-{digests.file(cfg.atlas)[:16]}.nii.gz"
        if not mask_path.is_file():
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = mask_path.with_name(f".{mask_path.name}.{os.getpid()}.tmp.nii.gz")
            nib.save(nib.Nifti1Image((np.asarray(atlas_img.dataobj) > 0).astype(np.uint8), atlas_img.affine), tmp)
            os.replace(tmp, mask_path)
    atlas_names = _atlas_names(cfg)
    rois = []
    for i, r in enumerate(cfg.rois or [atlas_names[k] for k in sorted(atlas_names)]):
        if r not in atlas_names.values():
            problems.append(Problem(f"{cfg.path}: study.rois[{i}]", f"unknown ROI {r!r}: the atlas "
                                    f"{cfg.atlas_labels or cfg.atlas} has {', '.join(atlas_names.values())}",
                                    "skipped ROI"))
            continue
        rois.append(r)

    subjects = discover_runs(cfg, problems)
    say(f"{len(subjects)} subjects, {sum(len(r) for r in subjects.values())} runs, {len(agents)} agents, "
        f"{len(rois)} ROIs; {len(problems)} problems so far")

    with StudyProgress(progress) as view:
        runner = Runner(out, store, sequential=sequential, address=address, num_cpus=num_cpus,
                        policy=cfg.on_failure, retries=cfg.retries, progress=view, session=session)
        # 1. extract
        xtasks, xfp = extract_tasks(cfg, agents, subjects, digests)
        xdone = runner.run("extract", xtasks)
        # a run whose extraction failed for any agent is dropped for its subject (every score on the same runs)
        for sub in list(subjects):
            keep = [r for r in subjects[sub] if all(xdone.get(f"sub-{sub}/run-{r.run}/{a.name}") for a in agents)]
            for r in subjects[sub]:
                if r not in keep:
                    problems.append(Problem(r.recording, f"sub-{sub} run-{r.run}: extraction failed (see failures)",
                                            "skipped run"))
            if len(keep) < cfg.fit.min_runs:
                problems.append(Problem(str(cfg.bids / f"sub-{sub}"), f"sub-{sub}: {len(keep)} runs left after "
                                        f"failed extractions, fit.min_runs is {cfg.fit.min_runs}", "skipped subject"))
                del subjects[sub]
            else:
                subjects[sub] = keep

        # 2./3. fits per space × dim × held-out run; joint fits of partition pairs
        ftasks: list[TaskSpec] = []
        score_plan: dict[str, dict] = {}
        mask_digest = digests.file(mask_path)
        for sub, runs in subjects.items():
            bold = tuple(r.bold for r in runs)
            nvol = tuple(r.n_volumes for r in runs)
            bold_digests = [digests.file(b) for b in bold]
            n_train_min = sum(nvol) - max(nvol)
            singles: dict[tuple, list[str]] = {}
            pairs: dict[tuple, list[str]] = {}
            spaces = subject_spaces(store, agents, {a.name: [xfp[(sub, r.run, a.name)] for r in runs] for a in agents})
            for a in agents:
                for sp in spaces[a.name]:
                    for dim in cfg.fit.dims:
                        used = min(dim, sp["dim"], n_train_min)
                        files = tuple(str(store.dir("extract", f) / f"{sp['name']}.npy") for f in sp["fps"])
                        key = (sp["model"], sp["condition"], sp["layer"], dim)
                        singles[key] = []
                        for k in range(len(runs)):
                            t = _fit_spec(cfg, sub, ((sp["name"], files),), sp["fps_h"], bold, nvol, bold_digests, k,
                                          used, mask_path, mask_digest, threads,
                                          f"sub-{sub}/{sp['model']}/{sp['condition']}/l{sp['layer']}/d{dim}/"
                                          f"heldout-run-{runs[k].run}", "fit")
                            singles[key].append(str(store.dir("fit", t.fp) / "pred.npy"))
                            ftasks.append(t)
            for pp in partitions:
                a = next(x for x in agents if x.name == pp.model)
                for pooling in (a.poolings if a.kind == "vlm" else ("",)):
                    label = _model_label(a, pooling)
                    by_cond = {(s["condition"], s["layer"]): s for s in spaces[a.name] if s["model"] == label}
                    for (cond, layer), sa in sorted(by_cond.items()):
                        if cond != pp.a or (pp.b, layer) not in by_cond:
                            continue
                        sb = by_cond[(pp.b, layer)]
                        for dim in cfg.fit.partition_dims or cfg.fit.dims:
                            used_a, used_b = min(dim, sa["dim"], n_train_min), min(dim, sb["dim"], n_train_min)
                            key = (label, pp.a, pp.b, layer, dim)
                            pairs[key] = []
                            for k in range(len(runs)):
                                t = _fit_spec(
                                    cfg, sub,
                                    ((sa["name"], tuple(str(store.dir("extract", f) / f"{sa['name']}.npy")
                                                        for f in sa["fps"])),
                                     (sb["name"], tuple(str(store.dir("extract", f) / f"{sb['name']}.npy")
                                                        for f in sb["fps"]))),
                                    sa["fps_h"] + sb["fps_h"], bold, nvol, bold_digests, k, max(used_a, used_b),
                                    mask_path, mask_digest, threads,
                                    f"sub-{sub}/{label}/{pp.condition}/l{layer}/d{dim}/heldout-run-{runs[k].run}",
                                    "partition")
                                pairs[key].append(str(store.dir("partition", t.fp) / "pred.npy"))
                                ftasks.append(t)
            score_plan[sub] = {"bold": bold, "singles": singles, "pairs": pairs, "bold_digests": bold_digests}
        fit_done = runner.run("fit", [t for t in ftasks if t.stage == "fit"])
        fit_done |= runner.run("partition", [t for t in ftasks if t.stage == "partition"])
        by_fp = {t.fp: t for t in ftasks}

        # 4. score per subject
        stasks = []
        for sub, plan in score_plan.items():
            def ok(files):
                return all(fit_done.get(by_fp[Path(f).parent.name].key) for f in files)

            singles = {k: v for k, v in plan["singles"].items() if ok(v)}
            pairs = {k: v for k, v in plan["pairs"].items() if ok(v) and (k[0], k[1], k[3], k[4]) in singles
                     and (k[0], k[2], k[3], k[4]) in singles}
            dropped = len(plan["singles"]) - len(singles) + len(plan["pairs"]) - len(pairs)
            if dropped:
                problems.append(Problem(f"sub-{sub}", f"{dropped} feature spaces or pairs without all their fits "
                                                      "(see failures)", "left out of the scores"))
            if not singles:
                continue
            st = ScoreTask(sub, plan["bold"], str(mask_path), str(cfg.atlas),
                           str(cfg.atlas_labels) if cfg.atlas_labels else None, tuple(rois),
                           (cfg.fit.preprocess, cfg.fit.confounds, cfg.fit.high_pass_hz), cfg.extract.tr,
                           tuple(sorted((k, tuple(v)) for k, v in singles.items())),
                           tuple(sorted((k, tuple(v)) for k, v in pairs.items())))
            fp = _h({"stage": "score", "inputs": [Path(f).parent.name for _, v in st.singles + st.pairs for f in v],
                     "bold": plan["bold_digests"], "atlas": digests.file(cfg.atlas),
                     "labels": digests.file(cfg.atlas_labels) if cfg.atlas_labels else "", "rois": rois,
                     "mask": mask_digest, "pre": st.preprocess, "keys": [k for k, _ in st.singles + st.pairs]})
            stasks.append(TaskSpec("score", f"sub-{sub}", fp, score_task, (st,), {"subject": sub, "bold": plan["bold"]},
                                   lambda rows: ({}, {"rows": rows})))
        sdone = runner.run("score", stasks)
        rows = [r for t in stasks if sdone.get(t.key) for r in store.meta("score", t.fp)["rows"]]
        scores = scores_frame(rows)

        # 5. group statistics
        group = None
        comparisons = _comparisons_in_scores(cfg, comparisons, scores, problems)
        gfp = _h({"stage": "group", "scores": _h(rows), "comparisons": [asdict(c) for c in comparisons],
                  "stats": asdict(cfg.stats)})
        gtask = TaskSpec("group", "group", gfp, group_task, (rows, tuple(comparisons), cfg.stats),
                         {"scores": len(rows), "comparisons": [c.name for c in comparisons]},
                         lambda table: ({}, {"table": table}))
        if rows and runner.run("group", [gtask]).get("group"):
            import pandas as pd

            table = store.meta("group", gfp)["table"]
            group = pd.DataFrame(table["rows"], columns=table["columns"])
            group.attrs.update(table.get("attrs", {}))

    result = StudyResult(out, scores, group, problems, runner.failures, runner.stats)
    if report and group is not None:
        _write_outputs(cfg, result, rois)
    _write_study_json(cfg, result, out, store)
    return result


def extract_tasks(cfg: StudyConfig, agents: list[AgentConfig], subjects: dict[str, list[RunInputs]], digests: Digests
                  ) -> tuple[list[TaskSpec], dict[tuple[str, str, str], str]]:
    """One extract task per subject × run × agent (``pipelines.batch.run_job``), and their fingerprints by
    (subject, run, agent): recording content, agent settings (the model by its files' hashes), ExtractConfig."""
    from pipelines.batch import agent_record

    tasks, fps = [], {}
    for sub, runs in subjects.items():
        for run in runs:
            for a in agents:
                spec = _agent_spec(a)
                job = Job(run.recording, f"sub-{sub}_run-{run.run}", spec, cfg.extract)
                rec = agent_record(spec)
                rec["model"] = digests.model(a.model) if a.model else ""
                fp = _h({"stage": "extract", "recording": digests.file(run.recording), "agent": rec,
                         "cfg": asdict(cfg.extract)})
                fps[(sub, run.run, a.name)] = fp
                tasks.append(TaskSpec("extract", f"sub-{sub}/run-{run.run}/{a.name}", fp, _extract_job, (job,),
                                      {"recording": run.recording, "subject": sub, "run": run.run, "agent": a.name,
                                       "model": a.model}, _store_extract))
    return tasks, fps


def _atlas_names(cfg: StudyConfig) -> dict[int, str]:
    import nibabel as nib

    if cfg.atlas_labels is not None:
        import csv

        with open(cfg.atlas_labels, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return {int(r.get("index") or r.get("label")): r.get("name") or r.get("roi") for r in rows}
    values = np.unique(np.asarray(nib.load(str(cfg.atlas)).dataobj).astype(int))
    return {int(v): str(int(v)) for v in values if v != 0}


def _extract_job(job: Job):
    from pipelines.batch import run_job

    return run_job(job)


def _store_extract(result) -> tuple[dict[str, np.ndarray], dict]:
    return dict(result.features), {"spaces": result.meta, "seconds": round(result.seconds, 3)}


def subject_spaces(store: Cache, agents: list[AgentConfig], by_agent: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Per agent, the feature spaces its extraction produced for every run of the subject, in a stable order."""
    out: dict[str, list[dict]] = {}
    for a in agents:
        fps = by_agent[a.name]
        metas = [store.meta("extract", f)["spaces"] for f in fps]
        common = sorted(set.intersection(*(set(m) for m in metas)))
        spaces = []
        for name in common:
            m = metas[0][name]
            if a.kind == "vlm" and (m["pooling"] not in a.poolings or m["condition"] not in a.conditions):
                continue
            spaces.append({"name": name, "model": _model_label(a, m["pooling"]),
                           "condition": m["condition"] or RL_CONDITION, "layer": int(m["layer"]), "dim": int(m["dim"]),
                           "fps": fps, "fps_h": [f"{f}/{name}" for f in fps]})
        out[a.name] = spaces
    return out


def _fit_spec(cfg: StudyConfig, sub: str, spaces, feature_ids: list[str], bold, nvol, bold_digests, k: int, pca: int,
              mask: Path, mask_digest: str, threads: int, key: str, stage: str) -> TaskSpec:
    task = FitTask(sub, spaces, bold, nvol, k, pca, str(mask), cfg.extract.tr, cfg.fit, threads)
    opts = asdict(cfg.fit)
    for name in ("dims", "partition_dims", "min_runs"):  # what selects tasks, not what a task computes
        opts.pop(name)
    fp = _h({"stage": stage, "features": feature_ids, "names": [s for s, _ in spaces], "bold": bold_digests,
             "nvol": nvol, "held_out": k, "pca": pca, "mask": mask_digest, "tr": cfg.extract.tr, "fit": opts})
    return TaskSpec(stage, key, fp, fit_task, (task,),
                    {"subject": sub, "spaces": [s for s, _ in spaces], "held_out": bold[k], "pca": pca},
                    lambda res: ({"pred": res["pred"]}, res["meta"]))


def _comparisons_in_scores(cfg: StudyConfig, comparisons: list[ComparisonConfig], scores, problems: list[Problem]
                           ) -> list[ComparisonConfig]:
    """Comparisons whose both sides select scores; one naming a value the scores lack is reported and dropped."""
    from pipelines.group import key_str

    keep = []
    for c in comparisons:
        i = cfg.comparisons.index(c)
        missing = [(k, v) for side in (c.a, c.b) for k, v in side
                   if key_str(v) not in set(scores[k].map(key_str)) if k in scores.columns]
        if missing or not len(scores):
            k, v = missing[0] if missing else ("model", "")
            have = ", ".join(sorted(set(scores[k].map(key_str)))) if len(scores) else "no scores"
            problems.append(Problem(f"{cfg.path}: comparisons[{i}] ({c.name}).{k}",
                                    f"no scores with {k} = {v!r} (have: {have})", "skipped comparison"))
            continue
        keep.append(c)
    return keep


def _write_outputs(cfg: StudyConfig, result: StudyResult, rois: list[str]) -> None:
    """``write_study_report`` into a temp folder beside the outputs, then each file renamed into place."""
    import shutil

    from pipelines.group import recovery
    from pipelines.study_report import write_study_report

    truth = None
    if cfg.truth is not None and cfg.truth.is_file():
        import pandas as pd

        truth = pd.read_csv(cfg.truth, sep="\t", keep_default_na=False, dtype=str)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=result.out))
    try:
        report = write_study_report(tmp, result.scores, result.group, title=cfg.title, truth=truth, rois=rois)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                dest = result.out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.report = replace(report, out_dir=result.out, html=result.out / report.html.name,
                            scores_tsv=result.out / report.scores_tsv.name,
                            group_tsv=result.out / report.group_tsv.name,
                            summary_json=result.out / report.summary_json.name,
                            figures={k: result.out / v.relative_to(tmp) for k, v in report.figures.items()},
                            recovery_tsv=result.out / report.recovery_tsv.name if report.recovery_tsv else None)
    if truth is not None:
        result.recovery = asdict(recovery(result.group, truth))


def _write_study_json(cfg: StudyConfig, result: StudyResult, out: Path, store: Cache) -> None:
    """``OUT/study.json``: the same bytes for the same inputs (no times, no counts of this run's work: those
    are in the ledger)."""
    from pipelines.report import json_ready

    body = {"config": str(cfg.path), "title": cfg.title, "cache": str(store.root),
            "tasks": {k: v.tasks for k, v in result.stages.items()},
            "subjects": sorted(result.scores["subject"].unique().tolist()) if len(result.scores) else [],
            "problems": [asdict(p) for p in result.problems], "failures": result.failures,
            "recovery": result.recovery}
    atomic_write_bytes(out / STUDY_JSON, json.dumps(json_ready(body), indent=1, sort_keys=True).encode())


def ledger(out: str | os.PathLike) -> list[dict]:
    """Every task executed for this output folder, in order (what tests count)."""
    path = Path(out) / LEDGER
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def iter_stage_times(result: StudyResult) -> Iterable[tuple[str, float]]:
    return ((k, v.seconds) for k, v in result.stages.items())


__all__ = ["StudyConfig", "StudyConfigError", "AgentConfig", "FitOptions", "PartitionPair", "StatsOptions",
           "ComparisonConfig", "load_study_config", "run_study", "discover_runs", "fit_task", "score_task",
           "scores_frame", "ledger", "Problem", "StudyResult", "replace"]
