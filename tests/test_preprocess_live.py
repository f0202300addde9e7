"""Live preprocessing (issue #13): EncodingCore applies the weights' recorded preprocessing to every volume.

Known answer: a phantom head whose BOLD is the weights' own prediction of the held-out features; the
held-out run then moves (slow ramp + one jerk) and drifts. With the preprocessing on, the running r is
close to that of the same run without motion/drift and the jerk TR is excluded and counted; forced off,
the score collapses.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from encoders.fit import FitConfig, fit_encoding
from encoders.phantom import PhantomConfig, phantom_run
from encoders.preprocess import PreprocessConfig
from encoders.weights import PreprocessRecord
from services.encoding import EncodingCore
from tests.conftest import feed_live

TR, N, JERK = 2.0, 60, 40


def _move(vol, p, affine, center):
    """The phantom's convention: output voxel → world → T⁻¹ → input voxel (trilinear)."""
    rot = Rotation.from_euler("XYZ", p[3:]).as_matrix()
    inv = np.eye(4)
    inv[:3, :3] = rot.T
    inv[:3, 3] = center - rot.T @ (center + p[:3])
    m = np.linalg.inv(affine) @ inv @ affine
    return affine_transform(vol, m[:3, :3], offset=m[:3, 3], order=1, mode="nearest")


@pytest.fixture(scope="module")
def case():
    pcfg = PhantomConfig(shape=(24, 24, 16), voxel_mm=(6.0, 6.0, 6.0), n_volumes=N, jerks=(JERK,), jerk_mm=2.0,
                         jerk_deg=1.0, ramp_mm=1.0, ramp_deg=1.0, drift=0.0, noise=0.0, spikes=(), exact=False, seed=2)
    ph = phantom_run(pcfg)
    mask = ph.brain > 500
    rng = np.random.default_rng(0)
    X = [rng.normal(size=(N, 4)).astype(np.float32) for _ in range(3)]
    V = int(mask.sum())
    W = 1.0 + 0.5 * rng.normal(size=(4, V))  # a shared response: the whole-mask mean carries it
    Y = [(x @ W + 0.3 * rng.normal(size=(N, V))).astype(np.float32) for x in X[:2]]
    prov = {"action": {"model": "synthetic", "condition": "action", "pooling": "mean", "layer": 5}}
    w = fit_encoding(Y, {"action": X[:2]}, FitConfig(score=False, progress=False, delays=[0]), mask=mask,
                     affine=ph.affine, tr=TR, provenance=prov).weights
    pcfg_pre = PreprocessConfig(warmup_trs=15, fd_threshold_mm=0.9, dvars_threshold=0.0)
    w.preprocessing = PreprocessRecord(mode="causal", config=pcfg_pre.to_dict())
    # held-out run: 2 % signal change of the weights' own prediction (+ noise) on the static head
    pred = w.predict([X[2]])
    z = (pred - pred.mean(0)) / pred.std(0)
    sig = np.zeros((N, *mask.shape), np.float32)
    sig[:, mask] = 0.02 * z + 0.01 * rng.normal(size=z.shape)
    clean = ph.brain[None] * (1 + sig)
    center = np.asarray(pcfg.center_mm)
    # 10 % scanner drift over the 2-min run (real scanners: a few %). At 30 % the default GLM (constant + drift,
    # no motion) fell to r 0.69 (clean 0.98): a 1/128 Hz cosine basis has no column before 64 s, so a causal
    # fit leaves an early steep drift in; the motion ramps used to absorb it while costing the still run
    # 0.98 → 0.56 (measured: 10 %: on 0.96 without motion regressors, 0.61 with them)
    drift = 1 + 0.1 * np.arange(N) / (N - 1)
    moved = np.stack([_move(clean[t], ph.motion[t], ph.affine, center) * drift[t] for t in range(N)])
    return w, X[2], clean.astype(np.float32), moved.astype(np.float32)


def _run(weights, features: np.ndarray, vols: np.ndarray, preprocess: bool = True) -> EncodingCore:
    return feed_live(weights, features, vols, tr=TR, layer=5, preprocess=preprocess)


def test_live_preprocessing_recovers_the_score_under_motion_and_drift(case):
    w, X, clean, moved = case
    r_clean = _run(w, X, clean).roi_scores.r()[0]
    on = _run(w, X, moved)
    off = _run(w, X, moved, preprocess=False)
    r_on, r_off = on.roi_scores.r()[0], off.roi_scores.r()[0]
    print(f"r clean {r_clean:.3f}  on {r_on:.3f}  off {r_off:.3f}  counts {on.preprocess.counts}")
    assert abs(r_on - r_clean) < 0.05
    assert r_off < r_on - 0.2  # measured: clean 0.975, on 0.959, off 0.64
    assert JERK in on.excluded_trs and on.preprocess.counts.fd >= 1
    assert on.preprocess.counts.warmup >= 15 and off.preprocess is None
    assert [q.tr_index for q in on.preprocess.trace] == list(range(N))
    assert on.preprocess.trace[JERK].fd > 0.9 and on.preprocess.trace[JERK].excluded
    assert on.roi_scores.n == N - len(on.excluded_trs)
