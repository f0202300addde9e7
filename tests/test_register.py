"""Alignment of a session to the weights' space (issue #13): registration once per session, one reslice per volume.

Known answer: the analytic phantom brain sampled on the weights' grid is their reference; a session sees the
same head moved by a planted rigid transform (several mm and degrees) on another grid (voxel size, shape,
rotated axes). The registration must recover the transform within 0.2 mm / 0.2°, the live scores of the
moved session must come back to those of the unmoved one, and a session that cannot be registered is
flagged, its volumes excluded and counted, never a crash.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import affine_transform, binary_erosion
from scipy.spatial.transform import Rotation

from encoders.fit import FitConfig, fit_encoding
from encoders.motion import rigid_matrix
from encoders.phantom import PhantomConfig, _Brain, phantom_run
from encoders.preprocess import PreprocessConfig
from encoders.register import TargetSpace, alignment_error, register_to_target, reslice_to, voxel_map
from encoders.synth import decisions_for_run, trigger_times_ns
from encoders.weights import PreprocessRecord
from protocols import Activation
from services.encoding import CoreConfig, EncodingCore

CENTER = np.array([4.0, -10.0, 12.0])


def _grid(shape, vox, center, rot_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A voxel → world affine of ``shape`` with voxel sizes ``vox``, axes rotated by ``rot_deg``, centred on ``center``."""
    a = np.diag([*vox, 1.0])
    a[:3, :3] = Rotation.from_euler("XYZ", rot_deg, degrees=True).as_matrix() @ a[:3, :3]
    a[:3, 3] = np.asarray(center) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def _sample(brain, shape, affine, world_map=np.eye(4)) -> np.ndarray:
    """The analytic brain at world_map(x) for every voxel x of the grid (exact, no interpolation)."""
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    x = ijk @ affine[:3, :3].T + affine[:3, 3]
    x = x @ world_map[:3, :3].T + world_map[:3, 3]
    return brain(x - CENTER).reshape(shape).astype(np.float32)


def _transform(trans_mm, rot_deg) -> np.ndarray:
    """T (weights world → session world) of a planted offset, about the weights' centre."""
    return rigid_matrix(np.array([*trans_mm, *np.deg2rad(rot_deg)]), CENTER)


@pytest.fixture(scope="module")
def brain():
    return _Brain(np.array([58.0, 72.0, 58.0]), np.random.default_rng(3))


@pytest.mark.parametrize("trans_mm, rot_deg, session_rot", [
    ((4.0, -6.0, 3.0), (3.0, -2.0, 4.0), (0.0, 0.0, 3.0)),
    ((-8.0, 5.0, -10.0), (-5.0, 4.0, -6.0), (4.0, 0.0, 0.0)),
])
def test_registration_recovers_a_planted_offset_on_another_grid(brain, trans_mm, rot_deg, session_rot):
    aw = _grid((36, 44, 36), (4.0, 4.0, 4.0), CENTER)
    weights_ref = _sample(brain, (36, 44, 36), aw)
    a_s = _grid((48, 60, 32), (3.0, 3.0, 3.5), CENTER + [6.0, -4.0, 3.0], session_rot)
    truth = _transform(trans_mm, rot_deg)
    rng = np.random.default_rng(1)
    # S(T x) = W(x): the session head is the brain at T⁻¹ y; another intensity scale and offset, 1 % noise
    session = 1.3 * _sample(brain, (48, 60, 32), a_s, np.linalg.inv(truth)) + 25.0
    session += rng.normal(0, 6.0, session.shape).astype(np.float32)
    al = register_to_target(session, a_s, TargetSpace(weights_ref, aw))
    mm, deg = alignment_error(al.matrix, truth, CENTER)
    print(f"planted {trans_mm} mm {rot_deg}°: error {mm:.4f} mm {deg:.4f}°, match r {al.match_r:.4f}, "
          f"{al.iterations} iterations, {al.seconds:.2f} s")
    assert al.converged, al.reason
    assert mm <= 0.2 and deg <= 0.2
    np.testing.assert_allclose(np.rad2deg(al.params[3:]), rot_deg, atol=0.2)
    # one reslice brings the session reference onto the weights' grid
    back = reslice_to(session, a_s, aw, weights_ref.shape, al.matrix, order=1)
    m = voxel_map(a_s, aw, al.matrix)
    ijk = np.indices(weights_ref.shape).reshape(3, -1)
    vox = m[:3, :3] @ ijk + m[:3, 3:]
    seen = ((vox >= 0) & (vox <= np.array([[47], [59], [31]]))).all(0).reshape(weights_ref.shape)
    head = (weights_ref > 300) & seen  # the head inside the session's field of view
    assert np.corrcoef(back[head], weights_ref[head])[0, 1] > 0.97


def test_a_session_that_cannot_be_registered_is_flagged_not_raised(brain):
    aw = _grid((30, 36, 30), (5.0, 5.0, 5.0), CENTER)
    weights_ref = _sample(brain, (30, 36, 30), aw)
    rng = np.random.default_rng(0)
    for bad, why in ((np.zeros((30, 36, 30), np.float32), "blank"),
                     (rng.gamma(2.0, 100.0, (30, 36, 30)).astype(np.float32), ""),  # no head: diverges or matches poorly
                     (np.full((30, 36, 30), np.nan, np.float32), "non-finite"),
                     (np.ones((30, 36), np.float32), "3-D")):
        al = register_to_target(bad, aw, TargetSpace(weights_ref, aw))
        assert not al.converged and why in al.reason, al.reason
        np.testing.assert_array_equal(al.matrix, np.eye(4))


# --- the live path --------------------------------------------------------------------------------------------

TR, N = 2.0, 50
RAMP = 1.0  # within-session motion: slow ramp up to 1 mm / 1°
SHIFT = ((3.0, -4.0, 2.0), (2.0, -1.5, 2.5))  # the session's head vs the fit's: mm, degrees


@pytest.fixture(scope="module")
def case():
    """Weights fitted on a phantom head (reference = its unmoved brain), a held-out run whose BOLD is the
    weights' own prediction (+ noise) with slow motion, and the same run seen by a session on another grid
    with the head moved by SHIFT."""
    pcfg = PhantomConfig(shape=(24, 24, 16), voxel_mm=(6.0, 6.0, 6.0), n_volumes=N, jerks=(), ramp_mm=RAMP,
                         ramp_deg=RAMP, drift=0.0, noise=0.0, spikes=(), exact=False, seed=2)
    ph = phantom_run(pcfg)
    mask = binary_erosion(ph.brain > 500)  # the brain inside the head: its edge is the skull's, not the fit's
    rng = np.random.default_rng(0)
    X = [rng.normal(size=(N, 4)).astype(np.float32) for _ in range(3)]
    V = int(mask.sum())
    W = 0.3 + rng.normal(size=(4, V))  # voxel-specific responses: a misaligned voxel scores another's
    Y = [(x @ W + 0.3 * rng.normal(size=(N, V))).astype(np.float32) for x in X[:2]]
    prov = {"action": {"model": "synthetic", "condition": "action", "pooling": "mean", "layer": 5}}
    w = fit_encoding(Y, {"action": X[:2]}, FitConfig(score=False, progress=False, delays=[0]), mask=mask,
                     affine=ph.affine, tr=TR, provenance=prov).weights
    w.preprocessing = PreprocessRecord(mode="causal", config=PreprocessConfig(
        warmup_trs=10, fd_threshold_mm=0.9, dvars_threshold=0.0, confounds=("constant", "drift")).to_dict())
    w.reference = ph.brain.copy()
    pred = w.predict([X[2]])
    z = (pred - pred.mean(0)) / pred.std(0)
    sig = np.zeros((N, *mask.shape), np.float32)
    sig[:, mask] = 0.02 * z + 0.01 * rng.normal(size=z.shape)
    clean = ph.brain[None] * (1 + sig)
    # within-session motion (the phantom's slow ramp) on the weights' grid
    moved = np.stack([_move(clean[t], ph.motion[t], ph.affine, ph.affine, clean.shape[1:]) for t in range(N)])
    # the same session seen on another grid, its head moved by SHIFT
    a_s = _grid((28, 26, 20), (5.0, 5.5, 5.0), np.asarray(pcfg.center_mm) + [4.0, 2.0, -3.0], (0.0, 0.0, 4.0))
    truth = rigid_matrix(np.array([*SHIFT[0], *np.deg2rad(SHIFT[1])]), np.asarray(pcfg.center_mm))
    other = np.stack([_to_grid(moved[t], ph.affine, a_s, (28, 26, 20), truth) for t in range(N)])
    return w, X[2], moved.astype(np.float32), other.astype(np.float32), a_s, truth, np.asarray(pcfg.center_mm)


def _move(vol, p, affine, out_affine, out_shape):
    """The phantom's motion convention: output voxel → world → T_p⁻¹ → input voxel (trilinear)."""
    rot = Rotation.from_euler("XYZ", p[3:]).as_matrix()
    c = np.asarray(PhantomConfig(shape=(24, 24, 16), voxel_mm=(6.0, 6.0, 6.0)).center_mm)
    inv = np.eye(4)
    inv[:3, :3] = rot.T
    inv[:3, 3] = c - rot.T @ (c + p[:3])
    m = np.linalg.inv(affine) @ inv @ out_affine
    return affine_transform(vol, m[:3, :3], offset=m[:3, 3], output_shape=out_shape, order=1, mode="nearest")


def _to_grid(vol, affine, out_affine, out_shape, truth):
    """``vol`` (weights' grid) as a session on ``out_affine`` sees it with the head moved by ``truth``:
    S(y) = vol(T⁻¹ y)."""
    m = np.linalg.inv(affine) @ np.linalg.inv(truth) @ out_affine
    return affine_transform(vol, m[:3, :3], offset=m[:3, 3], output_shape=out_shape, order=3, mode="constant")


def _run(weights, X, vols, affine, **core) -> EncodingCore:
    c = EncodingCore(weights, CoreConfig(**core))
    trig = trigger_times_ns(N, TR, start_ns=10**12)
    vecs, frame_t = decisions_for_run(X, trig, TR, per_tr=1)
    for t, t_ns in enumerate(trig):
        c.on_trigger(t, int(t_ns))
    for i, (v, ft) in enumerate(zip(vecs, frame_t)):
        c.on_activation(Activation(agent_id="a", model="synthetic", condition="action", layers=[5], pooling="mean",
                                   frame_seqs=[i], t_ns=int(ft), vectors=v[None], frame_t_ns=int(ft)))
    c.finish()
    for t in range(N):
        c.on_volume(t, vols[t], list(np.asarray(affine, float).ravel()))
    return c


def _scores(core: EncodingCore) -> tuple[float, float]:
    """(running r of the whole-mask mean, mean of the per-voxel running r)."""
    return float(core.roi_scores.r()[0]), float(np.nanmean(core.voxel_scores.r()))


def test_a_session_on_another_grid_and_head_position_scores_like_the_aligned_one(case, tmp_path):
    w, X, moved, other, a_s, truth, center = case
    base = _run(w, X, moved, w.affine)
    shifted = _run(w, X, other, a_s)
    (r_base, v_base), (r_shifted, v_shifted) = _scores(base), _scores(shifted)
    al = shifted.preprocess.alignment
    mm, deg = alignment_error(al.matrix, truth, center)
    print(f"unshifted: r {r_base:.3f}, voxel r {v_base:.3f}; shifted on another grid, aligned: r {r_shifted:.3f}, "
          f"voxel r {v_shifted:.3f}; registration error {mm:.3f} mm {deg:.3f}°, match r {al.match_r:.3f}")
    # the session's first volume (its reference) is already moved by the ramp's start: within 0.5 mm / 0.5°
    assert al.converged and mm <= 0.5 and deg <= 0.5
    assert abs(r_shifted - r_base) < 0.05 and r_base > 0.8
    assert v_shifted > v_base - 0.1  # voxel by voxel too (two interpolations of 6 mm voxels blur a little)
    assert shifted.preprocess.counts.unaligned == 0
    # the same shifted head on the weights' own grid: taken as in the weights' space it scores far worse
    same_grid = np.stack([_to_grid(v, w.affine, w.affine, w.mask.shape, truth) for v in moved])
    (r_un, v_un), (r_re, v_re) = _scores(_run(w, X, same_grid, w.affine, align=False)), _scores(
        _run(w, X, same_grid, w.affine))
    print(f"same grid, shifted head: not aligned r {r_un:.3f} voxel r {v_un:.3f}; aligned r {r_re:.3f} voxel r "
          f"{v_re:.3f}")
    assert abs(r_re - r_base) < 0.05 and v_un < v_re - 0.2
    # QC files: motion per TR, tSNR per ROI, the registration and its overlay
    written = {p.name for p in shifted.write_qc(tmp_path, "a__action")}
    assert written == {"a__action_motion.tsv", "a__action_tsnr.tsv", "a__action_alignment.json",
                       "a__action_alignment.png"}
    info = json.loads((tmp_path / "a__action_alignment.json").read_text())
    assert info["converged"] and info["overlay"] == "a__action_alignment.png"
    assert (tmp_path / "a__action_alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shifted.registration()["overlay"].endswith("a__action_alignment.png")
    lines = (tmp_path / "a__action_motion.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:8] == ["tr_index", "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                                        "framewise_displacement"] and len(lines) == N + 1
    tsnr = (tmp_path / "a__action_tsnr.tsv").read_text().splitlines()
    assert tsnr[0].startswith("roi\tn_voxels\tn_volumes\ttsnr_median") and float(tsnr[1].split("\t")[3]) > 10


def test_unregistrable_session_and_off_grid_volumes_are_excluded_and_counted(case, tmp_path):
    w, X, moved, other, a_s, truth, center = case
    rng = np.random.default_rng(5)
    noise = rng.gamma(2.0, 100.0, other.shape).astype(np.float32)  # no head: nothing to register on
    c = _run(w, X, noise, a_s)
    al = c.preprocess.alignment
    assert al is not None and not al.converged and al.reason
    assert c.roi_scores.n == 0 and len(c.excluded_trs) == N
    assert c.preprocess.counts.unaligned == N
    assert "not aligned" in c.preprocess.trace[-1].reason
    written = {p.name for p in c.write_qc(tmp_path, "bad")}  # the overlay says NOT aligned; nothing raises
    assert "bad_alignment.png" in written
    assert json.loads((tmp_path / "bad_alignment.json").read_text())["converged"] is False
    # a volume whose affine changes mid-session: excluded, counted as another geometry
    ok = EncodingCore(w, CoreConfig())
    ok.on_volume(0, other[0], a_s)
    shifted_affine = a_s.copy()
    shifted_affine[:3, 3] += 7.0
    ok.on_volume(1, other[1], shifted_affine)
    ok.on_volume(2, other[2][:, :, :10], a_s)
    assert ok.excluded_trs >= {1, 2} and ok.preprocess.counts.bad_shape == 2
    assert "affine differs" in ok.preprocess.trace[1].reason
    # weights without a reference cannot take a session on another grid: refused, counted, no crash
    w_noref = _copy_without_reference(w)
    c2 = EncodingCore(w_noref, CoreConfig())
    with pytest.raises(Exception) as err:
        c2.on_volume(0, other[0], a_s)
    assert "shape" in str(err.value)


def _copy_without_reference(w):
    import copy

    w2 = copy.copy(w)
    w2.reference = None
    return w2


def test_batch_scoring_applies_the_weights_preprocessing_as_the_live_service(case, tmp_path):
    """``replay-session --batch`` scores a run through ``pipelines.batch.score_run``: the same LivePreprocess
    (motion, alignment to the weights' space, causal GLM, exclusions) as the live EncodingCore, so its r is the
    live running r; without the preprocessing it is the old per-voxel z-score of the raw run."""
    import dataclasses

    import nibabel as nib

    from encoders.score import pearson_r
    from encoders.weights import PreprocessRecord
    from pipelines.batch import score_run

    w, X, moved, other, a_s, truth, center = case
    img = nib.Nifti1Image(np.moveaxis(other, 0, -1), a_s)
    live = _run(w, X, other, a_s)
    batch = score_run(w, [X], img)
    r_batch = pearson_r(batch.measured.astype(np.float64), batch.predicted.astype(np.float64))
    assert batch.live is not None and batch.live.alignment.converged
    assert list(batch.scored_trs) == sorted(set(range(N)) - live.excluded_trs)
    np.testing.assert_allclose(r_batch, live.roi_scores.r(), atol=1e-5)
    assert {p.name for p in batch.live.write_qc(tmp_path, "s")} >= {"s_motion.tsv", "s_alignment.png"}
    # weights without a preprocessing record: the raw run z-scored per voxel, every TR scored (as before)
    raw = dataclasses.replace(w, preprocessing=PreprocessRecord())
    plain = score_run(raw, [X], nib.Nifti1Image(np.moveaxis(moved, 0, -1), w.affine))
    assert plain.live is None and len(plain.scored_trs) == N
