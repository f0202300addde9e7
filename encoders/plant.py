"""Known answers for a synthetic participant: BOLD planted on two real feature spaces, with
per-ROI unique and shared parts, and the chance band its recovered scores are read against.

Two prompt conditions of one model (A = action, B = reasoning) give two feature spaces of the
same frames. Canonical correlation analysis of their top-k principal components gives pairs of
unit-variance time courses (u_i of A, v_i of B) with corr(u_i, v_j) = c_i if i = j else 0,
c_1 ≥ … ≥ c_k. The first pair is one signal both conditions carry: its mean is the *shared*
source. In the last pair, B predicts only c_k² of u_k's variance and A only c_k² of v_k's: u_k is
the *unique-action* source, v_k the *unique-reasoning* one. Planting each ROI's parts on these
three sources (through the HRF at the FIR delays) makes the variance partition of the fit
(unique A = R²(A∪B) − R²(B), …) come back as planted, up to the leak c_k² and estimation noise.
This needs conditions whose features differ: ``condition_overlap`` measures how much they do.

``block_null`` is the chance band of a recovered score: the measured series' blocks shuffled,
so the null keeps the BOLD autocorrelation that a TR-wise shuffle would destroy.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from encoders.score import pearson_r
from encoders.weights import delay_run

NULL_BLOCK = 5
"""TRs per block of the permutation null (10 s at TR 2 s: longer than the 2–8 s FIR/HRF span)."""
NULL_PERMUTATIONS = 1000
"""Block permutations per score."""
PARTS = ("unique_action", "unique_reasoning", "shared")
"""The planted parts, in the order arrays of them use."""


@dataclass(frozen=True)
class RoiPlant:
    """Planted variance fractions of one ROI (of each voxel's BOLD variance, before a ±10 % jitter)."""

    roi: str
    unique_action: float
    """Part driven by the action condition's unique source."""
    unique_reasoning: float
    """Part driven by the reasoning condition's unique source."""
    shared: float
    """Part driven by the source both conditions carry."""

    @property
    def action(self) -> float:
        """Fraction a perfect action-condition model explains (its unique part + the shared part)."""
        return self.unique_action + self.shared

    @property
    def reasoning(self) -> float:
        """Fraction a perfect reasoning-condition model explains."""
        return self.unique_reasoning + self.shared


# Two action-dominant ROIs, two reasoning-dominant, one shared, one with no signal; the rest of
# the brain (label 0) gets none either.
PLANT: tuple[RoiPlant, ...] = (
    RoiPlant("visual", 0.05, 0.05, 0.40),
    RoiPlant("motor_left", 0.45, 0.02, 0.05),
    RoiPlant("motor_right", 0.30, 0.05, 0.05),
    RoiPlant("parietal", 0.05, 0.30, 0.05),
    RoiPlant("prefrontal", 0.02, 0.45, 0.05),
    RoiPlant("temporal", 0.0, 0.0, 0.0),
)


# --- the two conditions' features ---------------------------------------------------------------


def pca_scores(runs: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Runs (T_i, d) → their top-k principal component scores (T_i, k), as the fit sees them.

    Each run is z-scored on its own (as ``encoders.fit.prepare_space``), the basis is fitted on
    all rows, and every component is scaled to unit variance over all runs.
    """
    z = [(x - x.mean(0)) / (x.std(0) + 1e-6) for x in runs]
    _, _, vt = np.linalg.svd(np.concatenate(z), full_matrices=False)
    proj = [zi @ vt[:k].T for zi in z]
    sd = np.concatenate(proj).std(0).clip(1e-6)
    return [p / sd for p in proj]


@dataclass
class CanonicalPairs:
    """Canonical variates of two feature spaces over the same TRs."""

    u: list[np.ndarray]
    """Per run (T_i, k) unit-variance variates of A, mutually uncorrelated over all runs."""
    v: list[np.ndarray]
    """Per run (T_i, k) variates of B; corr(u_i, v_j) = c_i if i = j else 0."""
    c: np.ndarray
    """(k,) canonical correlations, descending."""


def canonical_pairs(a: list[np.ndarray], b: list[np.ndarray]) -> CanonicalPairs:
    """CCA of per-run rows a[i] (T_i, k_a) and b[i] (T_i, k_b) (e.g. ``pca_scores`` of each)."""
    A, B = np.concatenate(a), np.concatenate(b)
    ma, mb = A.mean(0), B.mean(0)

    def whitener(X: np.ndarray) -> np.ndarray:
        evals, evecs = np.linalg.eigh(np.cov(X, rowvar=False, bias=True))
        return evecs / np.sqrt(evals.clip(1e-9))

    wa, wb = whitener(A), whitener(B)
    ua, c, vbt = np.linalg.svd(((A - ma) @ wa).T @ ((B - mb) @ wb) / len(A), full_matrices=False)
    pa, pb = wa @ ua, wb @ vbt.T
    return CanonicalPairs([(x - ma) @ pa for x in a], [(x - mb) @ pb for x in b], np.clip(c, 0.0, 1.0))


@dataclass
class ConditionOverlap:
    """How much two prompt conditions' features carry the same information."""

    canonical: list[float]
    """Canonical correlations of their top-k PCs (descending): 1 = a signal both carry, 0 = one only one carries."""
    same_unit_r: float
    """Mean Pearson r, over hidden units, of a unit under A with the same unit under B (runs z-scored)."""
    k: int
    """Principal components compared (the fit's PCA size)."""

    @property
    def shared_fraction(self) -> float:
        """Mean squared canonical correlation: share of one condition's k-dim feature subspace the other predicts."""
        return float(np.mean(np.square(self.canonical)))

    def describe(self) -> str:
        return (f"action vs reasoning features: same-unit r {self.same_unit_r:.3f}; canonical correlations of "
                f"the top {self.k} PCs {', '.join(f'{c:.2f}' for c in self.canonical)} "
                f"(mean c² {self.shared_fraction:.2f})")


def condition_overlap(a: list[np.ndarray], b: list[np.ndarray], k: int) -> ConditionOverlap:
    """Overlap of two conditions' raw per-run features a[i], b[i] (T_i, d) over the same TRs."""
    za = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-12) for x in a])
    zb = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-12) for x in b])
    varies = (za.std(0) > 1e-6) & (zb.std(0) > 1e-6)  # a unit constant over time carries nothing
    r = pearson_r(za[:, varies], zb[:, varies])
    pairs = canonical_pairs(pca_scores(a, k), pca_scores(b, k))
    return ConditionOverlap([float(c) for c in pairs.c], float(r.mean()) if r.size else float("nan"), k)


# --- planting -------------------------------------------------------------------------------------


@dataclass
class PlantedRoi:
    """Planted and realised parts of one ROI ('all' = every masked voxel)."""

    roi: str
    n_voxels: int
    unique_action: float
    """Planted fraction (``RoiPlant``; 'all': the voxel mean)."""
    unique_reasoning: float
    shared: float
    realised_unique_action: float
    """Mean over the ROI's voxels of var(part) / var(BOLD), all runs: what the data hold."""
    realised_unique_reasoning: float
    realised_shared: float
    r_action: float
    """r of the ROI-mean BOLD with the ROI mean of the parts a perfect action model predicts
    (unique action + shared), on the held-out (last) run: the score the replay aims at."""
    r_reasoning: float
    """Same for the reasoning condition (unique reasoning + shared)."""


@dataclass
class PlantedPattern:
    """What was planted in a synthetic participant, written beside it (``derivatives/truth/planted.json``)."""

    rois: list[PlantedRoi]
    overlap: ConditionOverlap
    """Action vs reasoning features the parts were planted on."""
    shared_pair: int
    """Index of the canonical pair whose mean is the shared source (0: the most correlated)."""
    unique_pair: int
    """Index of the pair whose A variate is the unique-action source and B variate the unique-reasoning one."""
    held_out_run: int
    """1-based run the planted r values are computed on."""
    streams: dict[str, str] = field(default_factory=dict)
    """Stream key (``vlm-0__action``) → planted condition (``action``/``reasoning``); other streams
    carry nothing planted."""

    def roi(self, name: str) -> PlantedRoi:
        return next(r for r in self.rois if r.roi == name)

    def planted_r(self, stream: str, roi: str) -> float:
        """Planted score of a stream in an ROI (nan for streams nothing was planted on)."""
        cond = self.streams.get(stream)
        if cond is None or not any(r.roi == roi for r in self.rois):
            return float("nan")
        return self.roi(roi).r_action if cond == "action" else self.roi(roi).r_reasoning

    def planted_fraction(self, stream: str, roi: str) -> float:
        """Planted variance fraction a perfect model of the stream explains (nan if not planted)."""
        cond = self.streams.get(stream)
        if cond is None or not any(r.roi == roi for r in self.rois):
            return float("nan")
        r = self.roi(roi)
        return r.unique_action + r.shared if cond == "action" else r.unique_reasoning + r.shared

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PlantedPattern":
        return cls.load_dict(json.loads(Path(path).read_text()))

    @classmethod
    def load_dict(cls, raw: dict) -> "PlantedPattern":
        """From ``asdict`` output (``planted.json``, a replay summary)."""
        return cls(rois=[PlantedRoi(**r) for r in raw["rois"]], overlap=ConditionOverlap(**raw["overlap"]),
                   shared_pair=raw["shared_pair"], unique_pair=raw["unique_pair"],
                   held_out_run=raw["held_out_run"], streams=raw["streams"])


@dataclass
class Planted:
    """BOLD planted on two conditions' features (masked, per run) and its truth."""

    y: list[np.ndarray]
    """Per run (T_i, V) BOLD in noise units (signal + noise, about unit variance per voxel)."""
    pattern: PlantedPattern
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-voxel arrays for ``truth.npz`` (true_r, realised parts, planted fractions, ROI labels, HRF)."""


def plant(features_a: list[np.ndarray], features_b: list[np.ndarray], labels: np.ndarray, roi_names: dict[int, str],
          *, pca: int, delays: list[int], tr: float, pattern: tuple[RoiPlant, ...] = PLANT, coherence: float = 0.8,
          noise: float = 1.0, seed: int = 0) -> Planted:
    """Plant unique-A, unique-B and shared parts per ROI on per-run features (T_i, d_a) / (T_i, d_b).

    ``labels`` (V,) is each masked voxel's ROI label (0 = none), ``roi_names`` label → name;
    ROIs missing from ``pattern`` get no signal. Each part of a voxel is its source through the
    HRF at the FIR ``delays`` (so it lies inside the fitted model class), scaled to the planted
    fraction times a per-voxel jitter in [0.9, 1]; noise shares ``coherence`` of its variance
    with the voxel's ROI (as physiological noise does) and fills each voxel up to unit variance.
    """
    from encoders.synth import double_gamma_hrf

    rng = np.random.default_rng(seed)
    pairs = canonical_pairs(pca_scores(features_a, pca), pca_scores(features_b, pca))
    shared_pair, unique_pair = 0, len(pairs.c) - 1
    norm = np.sqrt(2 * (1 + pairs.c[shared_pair]))
    # sources per run, in the order of PARTS: unique action, unique reasoning, shared
    sources = [[u[:, unique_pair] for u in pairs.u], [v[:, unique_pair] for v in pairs.v],
               [(u[:, shared_pair] + v[:, shared_pair]) / norm for u, v in zip(pairs.u, pairs.v)]]
    hrf = double_gamma_hrf(np.asarray(delays, float) * tr)
    plan = {p.roi: p for p in pattern}
    none = RoiPlant("", 0.0, 0.0, 0.0)
    per_label = np.array([[0.0, 0.0, 0.0]] + [
        [(q := plan.get(roi_names[k], none)).unique_action, q.unique_reasoning, q.shared] for k in sorted(roi_names)])
    rho = per_label[labels] * rng.uniform(0.9, 1.0, size=(len(labels), 1))  # (V, 3)
    n_runs = len(features_a)
    parts = [np.zeros((len(PARTS), len(f), len(labels))) for f in features_a]  # per run (3, T_i, V)
    courses = []  # per part: its time course over all runs (T_all,)
    for g, src in enumerate(sources):
        # one time course per part, a random sign per ROI, the same in all its voxels (a regional response)
        # Each run's course is scaled to unit variance on its own: a game's features are not stationary (a
        # canonical variate can sit mostly in one run), and the planted fraction must hold in every run,
        # the held-out one included. The fit z-scores features per run, so this stays in its model class.
        conv = [delay_run(x[:, None], delays) @ hrf for x in src]
        conv = [c / (c.std() or 1.0) for c in conv]
        courses.append(np.concatenate(conv))
        amp = np.sqrt(rho[:, g]) * rng.choice([-1.0, 1.0], size=labels.max() + 1)[labels]
        for r in range(n_runs):
            parts[r][g] = conv[r][:, None] * amp[None, :]
    # Noise is made exactly orthogonal to the planted time courses (and a constant) over all runs and
    # scaled to fill each voxel up to unit variance from its measured signal variance: the realised
    # fractions then equal the planted ones up to the per-voxel jitter, whatever the game's features
    # (a single regional noise series of a few hundred TRs otherwise shifts them by ±0.1 at random).
    lengths = [len(f) for f in features_a]
    signal = np.concatenate([p.sum(0) for p in parts])  # (T_all, V)
    fill = np.sqrt(np.clip(1 - signal.var(0), 0.05, None))
    roi_noise = rng.standard_normal((len(signal), labels.max() + 1))[:, labels]
    voxel_noise = rng.standard_normal(signal.shape)
    nz = np.sqrt(coherence) * roi_noise + np.sqrt(1 - coherence) * voxel_noise
    q, _ = np.linalg.qr(np.column_stack([np.ones(len(signal)), *courses]))
    nz -= q @ (q.T @ nz)
    nz /= nz.std(0)
    y = np.split(signal + noise * nz * fill, np.cumsum(lengths)[:-1])
    Y = np.concatenate(y)
    realised = np.concatenate(parts, axis=1).var(1) / Y.var(0)  # (3, V)

    held = n_runs - 1
    rois = [("all", np.arange(len(labels)))] + [(roi_names[k], np.flatnonzero(labels == k)) for k in sorted(roi_names)
                                               if (labels == k).any()]
    planted_rois = []
    for name, idx in rois:
        ym = y[held][:, idx].mean(1)
        part_means = parts[held][:, :, idx].mean(2)  # (3, T) ROI means of the held-out run's parts

        def ideal(g: int) -> float:  # a perfect model of a condition predicts its unique part + the shared one
            s = part_means[g] + part_means[2]
            # nothing planted for this condition here: s is constant and r undefined (NaN); the pattern records
            # 0, the score a model of nothing reaches, so planted.json stays finite (and the demo's answers too)
            return float(np.nan_to_num(pearson_r(ym[:, None], s[:, None])[0]))

        design = rho[idx].mean(0) if name not in plan else \
            (plan[name].unique_action, plan[name].unique_reasoning, plan[name].shared)
        planted_rois.append(PlantedRoi(
            name, len(idx), *(float(v) for v in design), *(float(v) for v in realised[:, idx].mean(1)),
            r_action=ideal(0), r_reasoning=ideal(1)))
    overlap = condition_overlap(features_a, features_b, pca)
    pattern_out = PlantedPattern(planted_rois, overlap, shared_pair, unique_pair, held_out_run=n_runs)
    S = np.concatenate([p.sum(0) for p in parts])
    true_r = np.nan_to_num(pearson_r(S, Y))  # voxels with no planted signal: r undefined, recorded as 0
    truth = {"true_r": true_r, **dict(zip(PARTS, realised)),
             "rho_unique_action": rho[:, 0], "rho_unique_reasoning": rho[:, 1], "rho_shared": rho[:, 2],
             "roi_labels": labels.astype(np.int32), "hrf": hrf, "canonical_correlations": pairs.c}
    truth = {k: np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None) for k, v in truth.items()}
    return Planted(y, pattern_out, truth)


# --- chance band of a recovered score ---------------------------------------------------------------


@dataclass
class NullBand:
    """Observed r of one series pair and its block-permutation null."""

    r: float
    """Pearson r of predicted vs measured."""
    lo: float
    """2.5th percentile of the null r."""
    hi: float
    """97.5th percentile of the null r."""
    p: float
    """One-sided p = (1 + #{null r ≥ r}) / (1 + permutations)."""


def block_orders(rng: np.random.Generator, lengths: list[int], block: int):
    """Endless random row orders: within each run, blocks of ``block`` TRs shuffled (runs stay in place)."""
    edges = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    run_blocks = [np.array_split(np.arange(a, b), max(1, (b - a) // block)) for a, b in zip(edges[:-1], edges[1:])]
    while True:
        yield np.concatenate([np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
                              for blocks in run_blocks])


def block_null(pred: np.ndarray, measured: np.ndarray, lengths: list[int] | None = None,
               n_permutations: int = NULL_PERMUTATIONS, block: int = NULL_BLOCK, seed: int = 0) -> list[NullBand]:
    """Per column of (T, R) predicted and measured series (e.g. ROI means): r and its block-permutation band.

    Series are z-scored within each run (``lengths``, default one run; r is then the length-weighted
    mean of the runs' r). The measured rows are block-shuffled within runs and r recomputed
    ``n_permutations`` times; the same orders serve every column. Columns where a series is constant
    give nan.
    """
    pred, measured = np.asarray(pred, np.float64), np.asarray(measured, np.float64)
    lengths = lengths or [len(pred)]
    edges = np.concatenate([[0], np.cumsum(lengths)]).astype(int)

    def z(x: np.ndarray) -> np.ndarray:  # per run, so run offsets do not count as signal
        def one(seg: np.ndarray) -> np.ndarray:
            sd = seg.std(0)
            return (seg - seg.mean(0)) / np.where(sd > 0, sd, np.nan)
        return np.concatenate([one(x[a:b]) for a, b in zip(edges[:-1], edges[1:])])

    zp, zm = z(pred), z(measured)
    n = len(zp)
    r_obs = (zp * zm).sum(0) / n
    orders = block_orders(np.random.default_rng(seed), lengths, block)
    null = np.stack([(zp * zm[next(orders)]).sum(0) / n for _ in range(n_permutations)])
    lo, hi = np.percentile(null, [2.5, 97.5], axis=0)
    p = (1 + (null >= r_obs).sum(0)) / (1 + n_permutations)
    return [NullBand(float(r_obs[j]), float(lo[j]), float(hi[j]),
                     float(p[j]) if np.isfinite(r_obs[j]) else float("nan")) for j in range(pred.shape[1])]


# --- planted vs recovered, as tables -----------------------------------------------------------------


@dataclass
class Recovery:
    """One stream × ROI: planted beside recovered, with the chance band (a row of ``recovery.tsv``)."""

    agent: str
    condition: str
    """Prompt condition ('' for RL agents)."""
    roi: str
    planted_fraction: float
    """Planted variance fraction a perfect model of the stream explains (nan: nothing planted on this stream)."""
    planted_r: float
    """r a perfect model of the stream reaches on the held-out run (nan: nothing planted, or another run)."""
    r: float
    """Recovered: r of predicted vs measured ROI-mean BOLD over the scored TRs."""
    null_lo: float
    """Chance band: 2.5th percentile of r under the block-permutation null."""
    null_hi: float
    """97.5th percentile."""
    p: float
    """One-sided block-permutation p of r."""
    n_trs: int
    block: int = NULL_BLOCK
    """TRs per permuted block."""
    permutations: int = NULL_PERMUTATIONS

    @property
    def stream(self) -> str:
        return f"{self.agent}__{self.condition or 'policy'}"

    @property
    def above_chance(self) -> bool:
        return self.r > self.null_hi


@dataclass
class PartitionRow:
    """Variance partition of one ROI: recovered (held-out R², ROI voxel mean) beside planted (a row of
    ``partition.tsv``)."""

    agent: str
    roi: str
    n_voxels: int
    unique_action: float
    """R²(A∪B) − R²(B)."""
    unique_reasoning: float
    """R²(A∪B) − R²(A)."""
    shared: float
    """R²(A) + R²(B) − R²(A∪B)."""
    planted_unique_action: float = float("nan")
    """Realised planted fraction (nan: not a synthetic participant)."""
    planted_unique_reasoning: float = float("nan")
    planted_shared: float = float("nan")


def write_rows(path: Path, rows: list) -> Path:
    """Dataclass rows → TSV with one column per field."""
    names = [f.name for f in fields(rows[0])]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(names)
        for row in rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in (getattr(row, n) for n in names)])
    return path


def read_rows(path: Path, cls: type) -> list:
    """TSV written by ``write_rows`` → rows of dataclass ``cls`` (columns it lacks keep their defaults)."""
    cast = {"str": str, "float": float, "int": int}
    types = {f.name: cast[f.type] for f in fields(cls)}
    with open(path, newline="") as f:
        return [cls(**{k: types[k](v) for k, v in row.items() if k in types})
                for row in csv.DictReader(f, delimiter="\t")]
