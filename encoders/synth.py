"""Synthetic participant sessions: a small BIDS dataset with a planted encoding model and its truth.

Generative model (per run, all runs independent):

* three groups of latent sources, smooth in time (AR(1)): ``z_a`` seen only by the "action"
  feature space, ``z_b`` only by "reasoning", ``z_c`` by both (the shared part);
* features: action = [z_a, z_c] @ M_a + ε, reasoning = [z_b, z_c] @ M_b + ε (random mixing
  to ``space_dim`` dims, so no feature is a latent);
* BOLD per voxel: the latents' contributions pass through the canonical double-gamma HRF
  sampled at the FIR delays (so the planted model lies inside the fitted model class and the
  truth is recoverable); each part is scaled so that var(part_a) ≈ ρ_a of the voxel's ROI
  (jittered per voxel), likewise ρ_b, ρ_c; unit-variance Gaussian noise makes up the rest;
* brain mask: nilearn's bundled MNI152 brain mask resampled to ``voxel_mm``; atlas: a few
  sphere-limited Voronoi ROIs around MNI seeds, with planted per-ROI strengths.

Truth saved beside the data (``derivatives/truth/truth.npz``, no pickle): true r per voxel
(corr of the noiseless signal with the BOLD), the realised unique/shared variances, weights.

``planted_session`` makes the same kind of session with BOLD planted on two *given* feature spaces
(an agent's action- and reasoning-prompt features; ``encoders.plant.plant``) instead of latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from encoders.score import pearson_r
from encoders.weights import delay_run

if TYPE_CHECKING:
    from encoders.faults import FaultConfig
    from encoders.plant import PlantedPattern

# name → (MNI seed coordinates in mm, planted (ρ_action_unique, ρ_reasoning_unique, ρ_shared))
ROIS: dict[str, tuple[list[tuple[float, float, float]], tuple[float, float, float]]] = {
    "visual": ([(0, -85, 5)], (0.10, 0.05, 0.30)),
    "motor_left": ([(-38, -22, 56)], (0.30, 0.02, 0.10)),
    "motor_right": ([(38, -22, 56)], (0.25, 0.02, 0.08)),
    "parietal": ([(0, -60, 50)], (0.15, 0.15, 0.10)),
    "prefrontal": ([(0, 45, 25)], (0.05, 0.30, 0.10)),
    "temporal": ([(-55, -20, -10), (55, -20, -10)], (0.02, 0.04, 0.02)),
}
BACKGROUND = (0.01, 0.01, 0.01)
"""Planted strengths of masked voxels outside every ROI (label 0)."""
ROI_RADIUS_MM = 40.0

SPACES = ("action", "reasoning")


@dataclass
class SynthConfig:
    """Size and ground truth of a synthetic session."""

    n_runs: int = 4
    """Runs (BIDS run-1 … run-N)."""
    n_trs: int = 200
    """Volumes per run."""
    tr: float = 2.0
    """Repetition time, seconds."""
    voxel_mm: float = 8.0
    """Isotropic voxel size of the coarse MNI grid (6 → ~8.7k voxels, 8 → ~3.7k, 12 → ~1.1k)."""
    n_unique: int = 3
    """Latent sources per private group (z_a, z_b)."""
    n_shared: int = 3
    """Latent sources of the shared group (z_c)."""
    space_dim: int = 16
    """Raw feature dimension of each feature space."""
    feature_noise: float = 0.1
    """Std of noise added to features (relative to unit-variance latents)."""
    smoothness: float = 0.8
    """AR(1) coefficient of the latents per TR (0 = white)."""
    delays: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """FIR delays (TRs) the planted HRF is sampled at."""
    strength_jitter: tuple[float, float] = (0.4, 1.0)
    """Per-voxel multiplier range of the ROI strengths (spreads true r across voxels)."""
    repeat_runs: int = 0
    """Extra runs that repeat run 1's stimulus (same features, new noise) for the noise ceiling."""
    seed: int = 0
    """Seed of everything random."""
    subject: str = "01"
    task: str = "game"
    model: str = "synthetic"
    """Provenance written in the feature sidecars (model name)."""


def double_gamma_hrf(t: np.ndarray, peak: float = 6.0, undershoot: float = 16.0, ratio: float = 1 / 6) -> np.ndarray:
    """SPM's canonical HRF at times ``t`` (s): gamma(peak) − ratio·gamma(undershoot), unit peak."""
    from scipy.stats import gamma

    h = gamma.pdf(t, peak) - ratio * gamma.pdf(t, undershoot)
    grid = np.linspace(0, 32, 3201)
    return h / (gamma.pdf(grid, peak) - ratio * gamma.pdf(grid, undershoot)).max()


def brain_grid(voxel_mm: float):
    """Boolean brain mask on a coarse grid (from nilearn's bundled MNI152 mask) and its affine."""
    import warnings

    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mni = load_mni152_brain_mask(resolution=2)
        img = resample_img(mni, target_affine=np.diag([voxel_mm] * 3), interpolation="continuous",
                           force_resample=True, copy_header=True)
    mask = img.get_fdata() > 0.5
    # crop to the brain's bounding box + 1 voxel, shifting the affine origin accordingly
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - 1, 0), np.minimum(idx.max(0) + 2, mask.shape)
    mask = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    return np.ascontiguousarray(mask), affine


def roi_atlas(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Label volume (0 = no ROI): each brain voxel goes to the nearest seed within ROI_RADIUS_MM."""
    ijk = np.argwhere(mask)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    names = list(ROIS)
    seeds = [(k + 1, np.array(s, float)) for k, name in enumerate(names) for s in ROIS[name][0]]
    dist = np.stack([np.linalg.norm(xyz - s, axis=1) for _, s in seeds], axis=1)
    nearest = dist.argmin(1)
    labels = np.array([seeds[i][0] for i in nearest])
    labels[dist.min(1) > ROI_RADIUS_MM] = 0
    vol = np.zeros(mask.shape, dtype=np.int16)
    vol[mask] = labels
    return vol, {k + 1: name for k, name in enumerate(names)}


def _ar1(rng: np.random.Generator, n: int, k: int, phi: float) -> np.ndarray:
    e = rng.standard_normal((n, k))
    z = np.empty_like(e)
    z[0] = e[0]
    for t in range(1, n):
        z[t] = phi * z[t - 1] + np.sqrt(1 - phi**2) * e[t]
    return z


@dataclass
class SynthSession:
    """A generated session in memory (what ``write_bids`` puts on disk)."""

    cfg: SynthConfig
    mask: np.ndarray
    affine: np.ndarray
    atlas: np.ndarray
    roi_names: dict[int, str]
    bold: list[np.ndarray]
    """Per run (T, V) float32 masked BOLD (arbitrary units around a baseline)."""
    features: dict[str, list[np.ndarray]]
    """Space name → per run (T, space_dim) float32 feature rows."""
    truth: dict[str, np.ndarray]
    """true_r, unique_action, unique_reasoning, shared, rho_* (planted), weights, hrf …"""


def generate(cfg: SynthConfig) -> SynthSession:
    """Draw a synthetic session (deterministic given cfg.seed)."""
    rng = np.random.default_rng(cfg.seed)
    mask, affine = brain_grid(cfg.voxel_mm)
    atlas, roi_names = roi_atlas(mask, affine)
    labels = atlas[mask]
    n_vox = int(mask.sum())
    strengths = np.array([BACKGROUND] + [ROIS[roi_names[k]][1] for k in sorted(roi_names)])[labels]
    rho = strengths * rng.uniform(*cfg.strength_jitter, size=(n_vox, 1))  # (V, 3): a, b, c

    hrf = double_gamma_hrf(np.asarray(cfg.delays, float) * cfg.tr)
    n_lat = {"a": cfg.n_unique, "b": cfg.n_unique, "c": cfg.n_shared}
    # voxel weights per latent group, HRF-shaped over delays: (n_delays * k, V)
    w = {g: np.kron(hrf[:, None], np.ones((k, 1))) * np.tile(rng.standard_normal((k, n_vox)), (len(hrf), 1))
         for g, k in n_lat.items()}
    mixing = {s: np.linalg.qr(rng.standard_normal((cfg.space_dim, cfg.space_dim)))[0][: cfg.n_unique + cfg.n_shared]
              for s in SPACES}

    n_runs = cfg.n_runs + cfg.repeat_runs
    latents = [{g: _ar1(rng, cfg.n_trs, k, cfg.smoothness) for g, k in n_lat.items()} for _ in range(cfg.n_runs)]
    latents += [latents[0]] * cfg.repeat_runs
    parts_raw = [{g: delay_run(lat[g], cfg.delays) @ w[g] for g in n_lat} for lat in latents]
    # scale each part so that its variance over the session is rho (per voxel)
    scale = {g: np.sqrt(rho[:, i] / np.concatenate([p[g] for p in parts_raw]).var(0))
             for i, g in enumerate("abc")}

    feats = {s: [] for s in SPACES}
    bold, signal_all, parts_all, noise_all = [], [], [], []
    baseline = rng.uniform(500, 1500, size=n_vox)
    feature_noise = [{s: rng.standard_normal((cfg.n_trs, cfg.space_dim)) for s in SPACES} for _ in range(cfg.n_runs)]
    feature_noise += [feature_noise[0]] * cfg.repeat_runs
    for r in range(n_runs):
        lat = latents[r]
        for s, private in zip(SPACES, ("a", "b")):
            x = np.concatenate([lat[private], lat["c"]], axis=1) @ mixing[s] + cfg.feature_noise * feature_noise[r][s]
            feats[s].append(x.astype(np.float32))
        parts = {g: parts_raw[r][g] * scale[g] for g in n_lat}
        signal = parts["a"] + parts["b"] + parts["c"]
        noise = rng.standard_normal(signal.shape) * np.sqrt(np.clip(1 - rho.sum(1), 0.05, None))
        y = signal + noise
        bold.append((baseline + 10.0 * y).astype(np.float32))
        signal_all.append(signal)
        parts_all.append(parts)
        noise_all.append(y)
    Y = np.concatenate(noise_all[: cfg.n_runs])
    S = np.concatenate(signal_all[: cfg.n_runs])
    var_y = Y.var(0)
    truth = {
        "true_r": pearson_r(S, Y),
        "unique_action": np.concatenate([p["a"] for p in parts_all[: cfg.n_runs]]).var(0) / var_y,
        "unique_reasoning": np.concatenate([p["b"] for p in parts_all[: cfg.n_runs]]).var(0) / var_y,
        "shared": np.concatenate([p["c"] for p in parts_all[: cfg.n_runs]]).var(0) / var_y,
        "rho_action": rho[:, 0], "rho_reasoning": rho[:, 1], "rho_shared": rho[:, 2],
        "roi_labels": labels.astype(np.int32),
        "hrf": hrf,
        **{f"weights_{g}": w[g] * scale[g] for g in n_lat},
        **{f"mixing_{s}": mixing[s] for s in SPACES},
    }
    truth = {k: np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None) for k, v in truth.items()}
    return SynthSession(cfg, mask, affine, atlas, roi_names, bold, feats, truth)


@dataclass
class PlantedSessionConfig:
    """Options of a session whose BOLD is planted on two given feature spaces (``planted_session``)."""

    tr: float = 2.0
    """Repetition time, seconds."""
    voxel_mm: float = 10.0
    """Isotropic voxel size of the coarse MNI brain grid."""
    pca: int = 6
    """Principal components of each space the parts are planted on (``encoders.plant.plant``)."""
    coherence: float = 0.8
    """Share of a voxel's planted noise common to its ROI (the planted parts are wholly regional)."""
    noise: float = 1.0
    """Scale of the unexplained part of the BOLD (1 = as ``generate``)."""
    seed: int = 0
    """Seed of the planting (``seed``) and of the voxel baselines (``seed + 1``)."""
    subject: str = "01"
    task: str = "game"
    model: str = "planted on agent features"
    """Provenance written in the feature sidecars (model name)."""


def planted_session(features_a: list[np.ndarray], features_b: list[np.ndarray],
                    cfg: PlantedSessionConfig | None = None) -> tuple[SynthSession, PlantedPattern]:
    """A session whose BOLD is planted on two real feature spaces (A = action, B = reasoning), and its truth.

    ``features_a`` / ``features_b``: per run (T_i, d) rows of the same TRs. Per ROI of the brain grid's
    atlas, a unique-A, a unique-B and a shared part with the fractions of ``encoders.plant.PLANT``
    (``encoders.plant.plant``); the BOLD is ``baseline + 10 · planted`` around a per-voxel baseline as in
    ``generate``. Returns (SynthSession, encoders.plant.PlantedPattern); deterministic given ``cfg.seed``.
    """
    from encoders.plant import plant

    cfg = cfg or PlantedSessionConfig()
    scfg = SynthConfig(n_runs=len(features_a), n_trs=len(features_a[0]), tr=cfg.tr, voxel_mm=cfg.voxel_mm,
                       seed=cfg.seed, subject=cfg.subject, task=cfg.task, model=cfg.model,
                       space_dim=features_a[0].shape[1])
    mask, affine = brain_grid(cfg.voxel_mm)
    atlas, roi_names = roi_atlas(mask, affine)
    planted = plant(features_a, features_b, atlas[mask], roi_names, pca=cfg.pca, delays=scfg.delays, tr=cfg.tr,
                    coherence=cfg.coherence, noise=cfg.noise, seed=cfg.seed)
    baseline = np.random.default_rng(cfg.seed + 1).uniform(500, 1500, size=int(mask.sum()))
    bold = [(baseline + 10.0 * y).astype(np.float32) for y in planted.y]
    feats = {"action": [np.asarray(f, np.float32) for f in features_a],
             "reasoning": [np.asarray(f, np.float32) for f in features_b]}
    return SynthSession(scfg, mask, affine, atlas, roi_names, bold, feats, planted.truth), planted.pattern


def faulted_fit_preprocess():
    """The preprocessing the weights of a faulted synthetic session are fitted after (and record, so the live
    path applies it): the core's default (realignment + reslice, causal GLM of the constant and the cosine
    drift — no motion regressors, see ``PreprocessConfig.confounds`` — running z-score) with cubic reslicing:
    trilinear smooths a volume by how far it moved, so a moving head's voxels got less noisy than a still
    one's (voxel-mean r +0.03…0.05 there; cubic: ≤ 0.02); a synthetic grid is small enough for its cost."""
    from encoders.preprocess import PreprocessConfig

    return PreprocessConfig(reslice_order=3)


def preprocess_for_fit(bold_runs: list, mask: np.ndarray, config=None) -> tuple[list[np.ndarray], object]:
    """Runs (4-D NIfTI paths or images) preprocessed exactly as the live core will preprocess them, by the one
    fit-time path ``encoders.preprocess.preprocess_for_fit`` (causal, each run on its own first volume: the
    session's weights keep no reference, and its runs start with the head in one place) on ``mask`` (X, Y, Z)
    bool: per run (T, V) float32 with the excluded volumes (warm-up, censored) set to 0, and the
    ``encoders.weights.PreprocessRecord`` for the weights."""
    from encoders.preprocess import preprocess_for_fit as one_path
    from encoders.weights import PreprocessRecord

    config = config or faulted_fit_preprocess()
    fit = one_path(bold_runs, config, mask, causal=True, align=False)
    return fit.runs, PreprocessRecord(mode="causal", config=config.to_dict(), source="bold", zeroed=fit.zeroed)


def trigger_times_ns(n_trs: int, tr: float, start_ns: int = 0) -> np.ndarray:
    """Emulator-clock trigger time of every TR of a run starting at ``start_ns``."""
    return start_ns + np.round(np.arange(n_trs) * tr * 1e9).astype(np.int64)


def decisions_for_run(features: np.ndarray, trigger_ns: np.ndarray, tr: float, per_tr: int = 3,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-decision vectors and frame times whose per-TR mean reproduces ``features``.

    Each TR gets ``per_tr`` decisions at evenly spread frame times inside it; their vectors are the
    TR's row plus zero-sum jitter, so pooling them (mean) gives the row back. Used to drive the
    encoding service with Activation messages in tests and demos.
    """
    rng = np.random.default_rng(seed)
    n, d = features.shape
    jitter = rng.standard_normal((n, per_tr, d)).astype(np.float32)
    jitter -= jitter.mean(1, keepdims=True)
    vectors = (features[:, None, :] + 0.5 * jitter).reshape(n * per_tr, d).astype(np.float32)
    offsets = ((np.arange(per_tr) + 0.5) / per_tr * tr * 1e9).astype(np.int64)
    frame_t = (trigger_ns[:, None] + offsets[None, :]).reshape(-1)
    return vectors, frame_t


def _bids_name(cfg: SynthConfig, run: int, suffix: str) -> str:
    return f"sub-{cfg.subject}_task-{cfg.task}_run-{run}_{suffix}"


def write_bids(session: SynthSession, out: Path, record: Callable[[Path, float, int], Path] | None = None,
               faults: FaultConfig | None = None) -> dict[str, list[Path]]:
    """Write the session as BIDS under ``out``; return the paths of bold runs and feature files.

    ``record(path, seconds, seed)``, when given, records agent gameplay for each run (e.g.
    ``services.emulator.record_headless``); its file goes to ``sourcedata/gamelogs`` and is linked
    from the run's ``_events.tsv`` (``stim_file``), as CNeuroMod does.

    ``faults`` (``encoders.faults``), when active, are put on every written volume (run N draws its own
    with ``seed + N``); each run's true motion goes to ``derivatives/truth/<run>_desc-truemotion_timeseries.tsv``
    (fMRIPrep's columns) and the config, jerks and spikes to ``truth.json``. ``session.bold`` (and the truth
    arrays) stay the fault-free signal.
    """
    import nibabel as nib

    from encoders.faults import apply_faults, fault_schedule, write_motion_tsv

    cfg = session.cfg
    out = Path(out)
    func = out / f"sub-{cfg.subject}" / "func"
    featdir = out / "derivatives" / "features" / f"sub-{cfg.subject}" / "func"
    atlasdir = out / "derivatives" / "atlas"
    truthdir = out / "derivatives" / "truth"
    for d in (func, featdir, atlasdir, truthdir):
        d.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "neuroarcade synthetic session", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "neuroarcade synth"}]}, indent=2))
    (out / "participants.tsv").write_text(f"participant_id\nsub-{cfg.subject}\n")
    (out / ".bidsignore").write_text("sourcedata/gamelogs/\n")
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    paths: dict[str, list[Path]] = {"bold": [], **{s: [] for s in SPACES}}
    fault_truth: dict[str, dict] = {}
    for r, y in enumerate(session.bold, start=1):
        vol = np.zeros(session.mask.shape + (len(y),), dtype=np.float32)
        vol[session.mask] = y.T
        if faults is not None and faults.active:
            schedule = fault_schedule(faults.replace(seed=faults.seed + r), len(y), cfg.tr, session.mask.shape)
            for t in range(len(y)):
                vol[..., t] = apply_faults(vol[..., t], t, schedule, session.affine)
            write_motion_tsv(truthdir / _bids_name(cfg, r, "desc-truemotion_timeseries.tsv"), schedule.motion)
            fault_truth[f"run-{r}"] = {"jerks": list(schedule.jerks), "spikes": [list(s) for s in schedule.spikes],
                                       "max_fd_mm": float(schedule.fd.max())}
        img = nib.Nifti1Image(vol, session.affine, header.copy())
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = cfg.tr
        bold_path = func / _bids_name(cfg, r, "bold.nii.gz")
        nib.save(img, bold_path)
        (func / _bids_name(cfg, r, "bold.json")).write_text(json.dumps(
            {"RepetitionTime": cfg.tr, "TaskName": cfg.task, "SkullStripped": False}, indent=2))
        stim = ""
        if record is not None:
            gamelog = record(out / "sourcedata" / "gamelogs" / _bids_name(cfg, r, "gameplay.narec"),
                             len(y) * cfg.tr, cfg.seed + r)
            stim = str(Path(gamelog).relative_to(out))
        rows = ["onset\tduration\ttrial_type\ttr_index\tstim_file"]
        rows += [f"{k * cfg.tr:.3f}\t0\ttrigger\t{k}\t{stim or 'n/a'}" for k in range(len(y))]
        (func / _bids_name(cfg, r, "events.tsv")).write_text("\n".join(rows) + "\n")
        paths["bold"].append(bold_path)
        for s in SPACES:
            fpath = featdir / _bids_name(cfg, r, f"desc-{s}_features.npy")
            np.save(fpath, session.features[s][r - 1])
            fpath.with_suffix(".json").write_text(json.dumps(feature_sidecar(cfg, s), indent=2))
            paths[s].append(fpath)
    nib.save(nib.Nifti1Image(session.mask.astype(np.uint8), session.affine), atlasdir / "mask.nii.gz")
    nib.save(nib.Nifti1Image(session.atlas, session.affine), atlasdir / "atlas.nii.gz")
    (atlasdir / "atlas_labels.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(session.roi_names.items())))
    np.savez(truthdir / "truth.npz", **session.truth)
    (truthdir / "truth.json").write_text(json.dumps({
        "config": {k: v for k, v in cfg.__dict__.items()},
        "planted_roi_strengths": {n: dict(zip(("unique_action", "unique_reasoning", "shared"), ROIS[n][1]))
                                  for n in ROIS},
        "n_voxels": int(session.mask.sum()),
        **({"faults": {"config": faults.to_dict(), "runs": fault_truth}} if fault_truth else {}),
    }, indent=2, default=list))
    return paths


def feature_sidecar(cfg: SynthConfig, space: str) -> dict:
    """Provenance of a synthetic feature file, in the same keys `neuroarcade fit` reads."""
    return {"space": space, "model": cfg.model, "layer": None, "condition": space, "pooling": "mean",
            "dim": cfg.space_dim, "tr": cfg.tr}
