"""Known-answer tests of the fit on synthetic sessions with a planted encoding model."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.fit import (FitConfig, block_permutation_test, fdr, fit_encoding, loro_splits, noise_ceiling,
                          partition_variance, prepare_design)
from encoders.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def session():
    return generate(SynthConfig(voxel_mm=12, n_runs=4, n_trs=150, seed=1))


@pytest.mark.slow
def test_cv_r_tracks_planted_true_r(session):
    both = [np.concatenate([a, b], axis=1) for a, b in zip(session.features["action"], session.features["reasoning"])]
    res = fit_encoding(session.bold, {"all": both}, FitConfig(progress=False), mask=session.mask,
                       affine=session.affine, tr=2.0)
    corr = np.corrcoef(res.cv_r, session.truth["true_r"])[0, 1]
    assert corr >= 0.9, corr
    # held-out r cannot beat the planted ceiling by more than sampling noise
    assert np.mean(res.cv_r) <= np.mean(session.truth["true_r"]) + 0.02
    assert res.weights.coef.dtype == np.float32 and res.weights.alphas.shape == (int(session.mask.sum()),)


@pytest.mark.slow
def test_variance_partitioning_recovers_planted_unique_variance(session):
    vp = partition_variance(session.bold, ("action", session.features["action"]),
                            ("reasoning", session.features["reasoning"]), FitConfig(progress=False, banded_iter=10))
    labels = session.truth["roi_labels"]
    for key, truth_key in (("unique_a", "unique_action"), ("unique_b", "unique_reasoning")):
        for roi in np.unique(labels):
            got = vp[key][labels == roi].mean()
            want = session.truth[truth_key][labels == roi].mean()
            assert abs(got - want) <= 0.03, (key, roi, got, want)
        assert np.corrcoef(vp[key], session.truth[truth_key])[0, 1] > 0.9
    # identities of the partition hold exactly, negatives included
    np.testing.assert_allclose(vp["unique_a"] + vp["shared"], vp["r2_a"], atol=1e-6)
    assert (vp["unique_a"] < 0).any()  # kept, not clipped (voxels with no action signal)


@pytest.mark.slow
def test_delays_do_not_leak_across_runs(session):
    _, designs, _, _ = prepare_design(session.bold[:2], {"action": session.features["action"][:2]},
                                      FitConfig(delays=[1, 2]))
    d = session.features["action"][0].shape[1]
    assert np.all(designs[1][0] == 0) and np.all(designs[1][1, d:] == 0)
    assert np.any(designs[1][1, :d] != 0)
    splits = loro_splits([3, 4, 5])
    assert [list(te) for _, te in splits] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]


def test_noise_ceiling_from_repeated_runs():
    s = generate(SynthConfig(voxel_mm=14, n_runs=3, n_trs=120, repeat_runs=3, seed=2))
    res = fit_encoding(s.bold, {"action": s.features["action"]}, FitConfig(progress=False, score=False),
                       mask=s.mask, affine=s.affine, tr=2.0)
    assert res.noise_ceiling is not None  # runs 1, 4, 5, 6 share the stimulus
    # the explainable variance of a voxel is its planted signal variance (true r² over the repeats)
    ev = noise_ceiling(np.stack([s.bold[i] for i in (0, 3, 4, 5)]))
    np.testing.assert_allclose(ev, res.noise_ceiling)
    assert np.corrcoef(ev, s.truth["true_r"] ** 2)[0, 1] > 0.8


def test_block_permutation_and_fdr():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((200, 300))
    pred = rng.standard_normal((200, 300))
    pred[:, :50] += 2 * y[:, :50]  # 50 real effects, 250 nulls
    p = block_permutation_test(y, pred, [100, 100], n_permutations=200, block=10)
    q, sig = fdr(p, 0.05)
    assert sig[:50].all()
    assert sig[50:].mean() < 0.05
    assert np.all(q >= p - 1e-12)


@pytest.mark.slow
def test_torch_backend_matches_numpy_and_restores_global_state(session):
    from himalaya.backend import get_backend

    mask = np.zeros(session.mask.shape, bool)
    mask.flat[np.flatnonzero(session.mask)[:100]] = True
    small = dict(mask=mask, affine=session.affine, tr=2.0)
    runs = [b[:, :100] for b in session.bold[:3]]
    feats = {"action": session.features["action"][:3]}
    a = fit_encoding(runs, feats, FitConfig(progress=False, score=False), **small)
    b = fit_encoding(runs, feats, FitConfig(progress=False, score=False, backend="torch"), **small)
    assert get_backend().name == "numpy"
    a.weights.validate()
    np.testing.assert_allclose(a.weights.coef, b.weights.coef, atol=1e-3, rtol=1e-3)
