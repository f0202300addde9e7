"""Known answer of issue #13: a synthetic session with planted signal, rigid head motion (≤ 3 mm / 3°, with
jerks), scanner drift, physiological noise and spikes (``encoders.faults``), scored live.

The session: a phantom head (32×32×16, 4×4×5 mm) with five ROIs whose BOLD is planted on a feature space
with decreasing fractions (``encoders.plant.plant``), 1 % signal change around the anatomy, thermal noise
on top. The weights are fitted on three faulted training runs preprocessed causally exactly as the live
path will preprocess (realignment + causal GLM, recorded in the weights); the held-out run is fed volume by
volume through the encoding service's core (``services.encoding.EncodingCore``), which applies the
weights' recorded preprocessing. Checked: the realigned motion against the planted truth, the live ROI
ordering against the planted one, the whole-mask r against the same session without motion, and the
same session with the preprocessing forced off (it must score clearly worse: the test can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from encoders.faults import FaultConfig, apply_faults, fault_schedule, read_motion_tsv, write_motion_tsv
from encoders.fit import FitConfig, fit_encoding
from encoders.phantom import PhantomConfig, phantom_run
from encoders.plant import RoiPlant, plant
from encoders.preprocess import preprocess_run
from encoders.stream import LivePreprocess
from encoders.synth import faulted_fit_preprocess, preprocess_for_fit
from services.encoding import EncodingCore
from tests.conftest import feed_live

TR, N, RUNS, DIM = 2.0, 100, 4, 12
SHAPE, VOXEL_MM = (32, 32, 16), (4.0, 4.0, 5.0)
SIGNAL = 0.01  # BOLD: 1 % of the local intensity per unit of the planted series (signal + noise ≈ unit SD)
SMOOTH = 0.5  # AR(1) of the latents per TR (with the HRF: BOLD-like, not all slow: a causal high-pass keeps it)
COHERENCE = 0.95  # share of a voxel's planted noise common to its ROI (ROI-mean r ≈ √fraction: an ordering)
THERMAL = 0.01  # image noise SD, fraction of the head's baseline (600): tSNR ≈ 100, as a 3 T EPI; it, not the
# few coherent ROI signals, dominates DVARS (as in real data)
# five ROIs (centres in mm from the head's centre) with well-separated planted fractions: a perfect action
# model explains unique_action + shared of a voxel's variance (0.8, 0.45, 0.2, 0.05, 0)
ROIS = {"roi_a": (-18.0, -22.0, 0.0), "roi_b": (18.0, -22.0, 0.0), "roi_c": (0.0, 24.0, 6.0),
        "roi_d": (-18.0, 18.0, -8.0), "roi_e": (18.0, 14.0, 10.0)}
PATTERN = (RoiPlant("roi_a", 0.6, 0.0, 0.2), RoiPlant("roi_b", 0.35, 0.0, 0.1), RoiPlant("roi_c", 0.15, 0.0, 0.05),
           RoiPlant("roi_d", 0.05, 0.0, 0.0), RoiPlant("roi_e", 0.0, 0.0, 0.0))
FAULTS = FaultConfig.parse("realistic")  # 1.5 mm / 1.5° drift + 2 jerks of 1.5 mm / 1.5°, 3 % drift, 2 spikes
# realign + reslice, causal GLM of the constant and the cosine drift, running z-score (the core's default, cubic
# reslice): what synth-participant fits faulted sessions after (why no motion regressors, measured on this session:
# encoders.preprocess.PreprocessConfig.confounds)
PRE = faulted_fit_preprocess()


def _features(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two feature spaces of the same TRs: private + shared AR(1) latents, randomly mixed (as encoders.synth)."""
    def ar1(k: int) -> np.ndarray:
        z = np.zeros((N, k))
        e = rng.standard_normal((N, k))
        for t in range(N):
            z[t] = (SMOOTH * z[t - 1] if t else 0) + np.sqrt(1 - SMOOTH**2) * e[t]
        return z

    mix = [np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:6] for _ in range(2)]
    a, b = [], []
    for _ in range(RUNS):
        shared = ar1(3)
        a.append((np.hstack([ar1(3), shared]) @ mix[0] + 0.1 * rng.standard_normal((N, DIM))).astype(np.float32))
        b.append((np.hstack([ar1(3), shared]) @ mix[1] + 0.1 * rng.standard_normal((N, DIM))).astype(np.float32))
    return a, b


def make_session():
    ph = phantom_run(PhantomConfig(shape=SHAPE, voxel_mm=VOXEL_MM, n_volumes=1, jerks=(), spikes=(), drift=0.0,
                                   noise=0.0, seed=1))
    mask = ph.head
    ijk = np.argwhere(mask)
    xyz = ijk @ ph.affine[:3, :3].T + ph.affine[:3, 3] - np.asarray(PhantomConfig().center_mm)
    # every head voxel belongs to the ROI of the nearest centre (a Voronoi atlas, as encoders.synth's), so the
    # whole mask carries the planted pattern
    labels = 1 + np.argmin(np.stack([np.linalg.norm(xyz - c, axis=1) for c in ROIS.values()]), axis=0)
    names = {k: name for k, name in enumerate(ROIS, start=1)}
    rng = np.random.default_rng(5)
    feats_a, feats_b = _features(rng)
    planted = plant(feats_a, feats_b, labels, names, pca=6, delays=[1, 2, 3, 4], tr=TR, pattern=PATTERN,
                    coherence=COHERENCE, seed=2)
    runs_clean = []
    for y in planted.y:  # (T, X, Y, Z): anatomy × (1 + 1 % signal) in the head
        vols = np.repeat(ph.brain[None], N, axis=0)
        vols[:, mask] *= 1 + SIGNAL * y
        runs_clean.append(vols)
    return ph, mask, labels, names, feats_a, planted, runs_clean


@pytest.fixture(scope="module")
def session():
    return make_session()


def _acquire(clean: np.ndarray, schedule, affine, rng) -> np.ndarray:
    """What the scanner delivers: the faults on every volume, then image noise (the same noise for a given rng
    state, so sessions with and without motion differ only by the motion)."""
    noise = rng.normal(0, THERMAL * 600, clean.shape).astype(np.float32)
    return np.abs(np.stack([apply_faults(v, t, schedule, affine) for t, v in enumerate(clean)]) + noise)


def _nifti(vols: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(np.moveaxis(vols, 0, -1), affine)
    img.header["pixdim"][4] = TR
    return img


def fit_weights(session):
    """Weights fitted on three faulted training runs, preprocessed causally as the live path will (recorded)."""
    ph, mask, labels, names, feats_a, planted, runs_clean = session
    rng = np.random.default_rng(11)  # image noise: each fixture its own, whatever order pytest builds them in
    scheds = [fault_schedule(FAULTS.replace(seed=10 + r), N, TR, SHAPE) for r in range(RUNS - 1)]
    images = [_nifti(_acquire(runs_clean[r], s, ph.affine, rng), ph.affine) for r, s in enumerate(scheds)]
    train, record = preprocess_for_fit(images, mask, PRE)
    prov = {"action": {"model": "synthetic", "condition": "action", "pooling": "mean", "layer": 1}}
    return fit_encoding(train, {"action": feats_a[:RUNS - 1]}, FitConfig(pca=6, score=False, progress=False),
                        mask=mask, affine=ph.affine, tr=TR, provenance=prov, roi_labels=labels, roi_names=names,
                        preprocessing=record).weights


@pytest.fixture(scope="module")
def fitted(session):
    return fit_weights(session)


def acquire_held_out(session):
    """The held-out run as acquired with all faults, and the same run with the head held still."""
    ph, *_, runs_clean = session
    sched = fault_schedule(FAULTS.replace(seed=99), N, TR, SHAPE)
    moved = _acquire(runs_clean[-1], sched, ph.affine, np.random.default_rng(12))
    still = _acquire(runs_clean[-1], sched.without_motion(), ph.affine, np.random.default_rng(12))  # same noise
    return sched, moved, still


@pytest.fixture(scope="module")
def held_out(session):
    return acquire_held_out(session)


def _live(weights, features: np.ndarray, vols: np.ndarray, preprocess: bool = True) -> EncodingCore:
    return feed_live(weights, features, vols, tr=TR, layer=1, preprocess=preprocess)


def _matched_r(core: EncodingCore, trs: list[int]) -> float:
    """Pearson r of the whole-mask ('all') predicted and measured means over ``trs`` (what the running r
    computes over every scored TR)."""
    pred = np.array([core.roi_predicted[t][0] for t in trs])
    meas = np.array([core.roi_measured[t][0] for t in trs])
    return float(np.corrcoef(pred, meas)[0, 1])


def test_faults_are_as_large_as_asked(held_out):
    sched, moved, still = held_out
    trans, rot = np.abs(sched.motion[:, :3]).max(), np.rad2deg(np.abs(sched.motion[:, 3:]).max())
    assert 1.5 < trans <= 3.0 and 1.0 < rot <= 3.0, (trans, rot)
    assert len(sched.jerks) == 2 and all(sched.fd[j] > 1.0 for j in sched.jerks)
    assert len(sched.spikes) == 2 and sched.gain[-1] == pytest.approx(1.03)
    assert not np.allclose(moved, still) and np.allclose(moved[0], still[0])  # volume 0 is the reference


def test_live_preprocessing_recovers_motion_and_the_planted_scores(session, fitted, held_out, tmp_path):
    ph, mask, labels, names, feats_a, planted, *_ = session
    sched, moved, still = held_out
    on, off, calm = _live(fitted, feats_a[-1], moved), _live(fitted, feats_a[-1], moved, False), \
        _live(fitted, feats_a[-1], still)

    # 1. motion: the live realignment against the planted truth (round trip through the truth TSV)
    truth = read_motion_tsv(write_motion_tsv(tmp_path / "truth.tsv", sched.motion))
    est = np.stack([q.params for q in on.preprocess.trace])
    err = np.abs(est - truth)
    err_mm, err_deg = float(np.median(err[:, :3])), float(np.rad2deg(np.median(err[:, 3:])))

    # 2. the planted ordering of the ROIs in the live running scores
    roi_r = dict(zip(on.roi_names, on.roi_scores.r()))
    planted_frac = [p.unique_action + p.shared for p in PATTERN]
    rho = spearmanr(planted_frac, [roi_r[p.roi] for p in PATTERN]).statistic

    # 3. the whole mask: the mean over every masked voxel of its live running r (the 'all' row's voxel_mean in
    # the service's scores), with motion, without, and with the preprocessing off. (The 'all' ROI-mean series
    # sums the ROIs' randomly signed parts: a weak signal whose r moves by ±0.07 with the noise seed, and the
    # gating excludes different TRs in each session; it is reported, on the TRs scored in both, and checked
    # loosely.)
    v_on, v_calm, v_off = (float(np.nanmean(c.voxel_scores.r())) for c in (on, calm, off))
    r_on, r_calm, r_off = on.roi_scores.r()[0], calm.roi_scores.r()[0], off.roi_scores.r()[0]
    both = sorted(set(on.roi_measured) & set(calm.roi_measured))
    m_on, m_calm = _matched_r(on, both), _matched_r(calm, both)
    rho_off = spearmanr(planted_frac, [dict(zip(off.roi_names, off.roi_scores.r()))[p.roi] for p in PATTERN]).statistic
    print(f"\nmotion error median {err_mm:.4f} mm / {err_deg:.4f}° (worst {err[:, :3].max():.3f} mm / "
          f"{np.rad2deg(err[:, 3:].max()):.3f}°); ROI r " + ", ".join(f"{k} {v:.3f}" for k, v in roi_r.items())
          + f"; Spearman {rho:.3f} (off {rho_off:.3f}); whole-mask voxel-mean r: moved {v_on:.3f}, still "
          f"{v_calm:.3f}, preprocessing off {v_off:.3f}; 'all' ROI-mean r: {r_on:.3f} / {r_calm:.3f} / {r_off:.3f} "
          f"({m_on:.3f} / {m_calm:.3f} on the {len(both)} TRs scored in both); counts {on.preprocess.counts}")

    assert err_mm <= 0.1 and err_deg <= 0.1
    assert rho >= 0.8
    assert abs(v_on - v_calm) <= 0.05 and abs(m_on - m_calm) <= 0.1 and len(both) >= 60
    assert v_off < v_on - 0.05 and r_off < r_on - 0.1  # preprocessing off: clearly worse
    # the jerks and spikes were caught and not scored; every other TR after the warm-up was
    assert all(j in on.excluded_trs for j in sched.jerks)
    assert all(s in on.excluded_trs or s in sched.jerks for s, _ in sched.spikes)
    assert on.preprocess.counts.fd >= 2 and on.preprocess.counts.dvars >= 1
    assert on.roi_scores.n == N - len(on.excluded_trs) and on.roi_scores.n >= 65


def test_streaming_preprocessing_equals_offline_causal_with_faults(session, fitted, held_out):
    """The live class (one volume at a time, as the service applies it) against the offline causal run."""
    ph, *_ = session
    _, moved, _ = held_out
    live = LivePreprocess(fitted)
    outs = [live.push(t, v, t * TR) for t, v in enumerate(moved)]
    offline = preprocess_run(_nifti(moved, ph.affine), fitted.preprocess, causal=True, mask=fitted.mask)
    streamed = np.stack([o.data for o in outs])
    assert np.abs(streamed - offline.data).max() <= 1e-5
    assert [o.reason for o in outs] == offline.reasons
    assert np.array_equal(np.stack([o.params for o in outs]), offline.motion)
