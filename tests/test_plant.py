"""Planting known unique and shared parts on two feature spaces, and the chance band of a score.

Fast, without agents: the two spaces come from ``encoders.synth.generate`` (private latents per
space plus shared ones), so the planted pattern must come back through the real fit.
"""

from __future__ import annotations

import numpy as np
import pytest

from encoders import synth
from encoders.fit import FitConfig, partition_variance
from encoders.plant import PLANT, PlantedPattern, Recovery, block_null, condition_overlap, plant, read_rows, write_rows


@pytest.fixture(scope="module")
def spaces() -> tuple[list[np.ndarray], list[np.ndarray]]:
    s = synth.generate(synth.SynthConfig(n_runs=4, n_trs=80, voxel_mm=20.0, seed=3))
    return s.features["action"], s.features["reasoning"]


def test_condition_overlap_tells_shared_from_distinct_spaces(spaces):
    a, b = spaces
    same = condition_overlap(a, a, k=6)
    assert same.same_unit_r == pytest.approx(1.0) and min(same.canonical) == pytest.approx(1.0, abs=1e-6)
    mixed = condition_overlap(a, b, k=6)  # 3 shared latents, 3 private to each space
    assert mixed.canonical[2] > 0.9 and mixed.canonical[-1] < 0.3, mixed
    assert 0.3 < mixed.shared_fraction < 0.7


@pytest.mark.slow  # four leave-one-run-out ridge fits and a banded one
def test_planted_partition_comes_back_with_its_sign(spaces, tmp_path):
    a, b = spaces
    mask, affine = synth.brain_grid(10.0)
    atlas, names = synth.roi_atlas(mask, affine)
    labels = atlas[mask]
    planted = plant(a, b, labels, names, pca=6, delays=[1, 2, 3, 4], tr=2.0, seed=0)
    pattern = PlantedPattern.load(planted.pattern.save(tmp_path / "planted.json"))
    assert pattern == planted.pattern
    parts = partition_variance(planted.y[:3], ("action", a[:3]), ("reasoning", b[:3]), FitConfig(pca=6, progress=False))
    ids = {v: k for k, v in names.items()}
    for p in PLANT:
        sel = labels == ids[p.roi]
        got = {k: float(parts[k][sel].mean()) for k in ("unique_a", "unique_b", "shared")}
        truth = pattern.roi(p.roi)
        assert truth.realised_unique_action == pytest.approx(p.unique_action, abs=0.05)
        if p.unique_action != p.unique_reasoning:
            assert np.sign(got["unique_a"] - got["unique_b"]) == np.sign(p.unique_action - p.unique_reasoning), (p, got)
        if p.shared == 0 and p.unique_action == 0:
            assert truth.r_action == 0.0 and max(got.values()) < 0.05, got
    motor = pattern.roi("motor_left")  # action-dominant: a perfect action model beats a reasoning one
    # by a clear margin (measured 0.78 vs 0.48: within the one held-out run the parts are not exactly
    # orthogonal, so the reasoning model's shared part picks up some of the unique-action variance)
    assert motor.r_action > motor.r_reasoning + 0.2


def test_block_null_band_and_p_values():
    rng = np.random.default_rng(0)
    signal = np.convolve(rng.standard_normal(130), np.ones(5) / 5, mode="valid")[:120]
    pred = np.stack([signal, signal, rng.standard_normal(120)], 1)
    measured = np.stack([signal + 0.5 * rng.standard_normal(120), rng.standard_normal(120),
                         rng.standard_normal(120)], 1)
    found, noise, white = block_null(pred, measured, lengths=[60, 60], n_permutations=500, block=5, seed=1)
    assert found.r > found.hi and found.p < 0.01
    for band in (noise, white):
        assert band.lo < 0 < band.hi and band.p > 0.01
        assert band.lo < band.r < band.hi
    assert -0.45 < found.lo and found.hi < 0.45  # 120 TRs: a band of about ±0.2–0.35


def test_recovery_rows_round_trip(tmp_path):
    rows = [Recovery("vlm-0", "action", "visual", 0.45, 0.68, 0.65, -0.21, 0.63, 0.01, 60),
            Recovery("rl-0", "", "temporal", float("nan"), float("nan"), 0.04, -0.16, 0.17, 0.5, 60)]
    back = read_rows(write_rows(tmp_path / "recovery.tsv", rows), Recovery)
    assert back[0] == rows[0] and back[1].stream == "rl-0__policy" and np.isnan(back[1].planted_r)
    assert back[0].above_chance and not back[1].above_chance


def test_planted_session_is_plant_on_the_brain_grid(spaces):
    a, b = spaces
    cfg = synth.PlantedSessionConfig(voxel_mm=20.0, seed=2, task="breakout")
    session, pattern = synth.planted_session(a, b, cfg)
    again, _ = synth.planted_session(a, b, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(session.bold, again.bold))  # deterministic given the seed
    planted = plant(a, b, session.atlas[session.mask], session.roi_names, pca=cfg.pca, delays=session.cfg.delays,
                    tr=cfg.tr, coherence=cfg.coherence, noise=cfg.noise, seed=cfg.seed)
    baseline = np.random.default_rng(cfg.seed + 1).uniform(500, 1500, size=int(session.mask.sum()))
    assert all(np.array_equal(x, (baseline + 10.0 * y).astype(np.float32)) for x, y in zip(session.bold, planted.y))
    assert pattern == planted.pattern and session.truth.keys() == planted.truth.keys()
    assert (session.cfg.n_runs, session.cfg.n_trs, session.cfg.task) == (len(a), len(a[0]), "breakout")
