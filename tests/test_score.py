"""The one Pearson r (encoders.score): its rule for an undefined r, and batch vs running agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from encoders.score import KINDS, RunningPearson, mean_r, pearson_r


def _data(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 5) measured and predicted: correlated, anti-correlated, independent, constant prediction
    (0.1, not exactly representable), constant measurement."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, 5))
    pred = np.stack([y[:, 0] + 0.5 * rng.standard_normal(n), -y[:, 1], rng.standard_normal(n),
                     np.full(n, 0.1), rng.standard_normal(n)], 1)
    y[:, 4] = 3.3
    return y, pred


def test_pearson_r_matches_numpy_and_is_nan_where_a_column_is_constant():
    y, pred = _data()
    r = pearson_r(y, pred)
    assert r.shape == (5,) and r.dtype == np.float64
    for j in range(3):
        assert r[j] == pytest.approx(np.corrcoef(y[:, j], pred[:, j])[0, 1], abs=1e-12)
    assert r[1] == pytest.approx(-1.0)
    assert np.isnan(r[3]) and np.isnan(r[4])
    assert pearson_r(y.astype(np.float32), pred.astype(np.float32)).dtype == np.float32
    assert np.isnan(pearson_r(y[:1], pred[:1])).all()  # one sample: undefined
    with pytest.raises(ValueError, match="one shape"):
        pearson_r(y, pred[:, :4])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 50])
def test_running_r_agrees_with_batch_r_on_the_same_samples(n):
    y, pred = _data(max(n, 1))
    run = RunningPearson(5)
    for t in range(n):
        run.add(pred[t], y[t])
    got, want = run.r(), pearson_r(y[:n], pred[:n])
    assert run.n == n
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-9)
    if n >= 2:
        assert np.isnan(got[3]) and np.isnan(got[4])  # constant columns: NaN in both


def test_mean_r_leaves_undefined_out_and_counts_them():
    assert mean_r(np.array([0.2, np.nan, 0.4])) == (pytest.approx(0.3), 1)
    mean, n_undefined = mean_r(np.array([np.nan, np.nan]))
    assert math.isnan(mean) and n_undefined == 2
    assert mean_r(np.array([], dtype=float))[1] == 0


def test_score_kinds_are_named_once():
    assert list(KINDS) == ["roi_mean", "cv_voxel_mean", "voxel_mean"]
