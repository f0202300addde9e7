"""Real-BOLD preprocessing against a known answer: a synthetic 64×64×36 run (3×3×3.5 mm voxels) with planted
rigid motion (slow ramps and two jerks, up to ~3 mm / 3°), multiplicative drift (linear + quadratic), noise and
a slab spike (``encoders.phantom``; the analytic brain evaluated at the moved coordinates, no interpolation).
Motion comes back within 0.1 mm / 0.1°, jerks and the spike are censored, the streaming core equals the offline
causal computation, drift is gone, and bad volumes and inputs are flagged or refused, never a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from encoders.motion import framewise_displacement, prepare_reference, realign, reslice
from encoders.phantom import PhantomConfig, phantom_run
from encoders.preprocess import (MotionCorrector, OnlineGLM, PreprocessConfig, PreprocessError, Preprocessor,
                                 clean_series, confound_design, cosine_drift, preprocess_run)
from neuroarcade.cli import app

CFG = PreprocessConfig()  # defaults: motion correction, constant + 1/128 Hz cosines (no motion), warm-up 15


@pytest.fixture(scope="module")
def phantom():
    return phantom_run(PhantomConfig())


@pytest.fixture(scope="module")
def stream(phantom):
    """The streaming core fed volume by volume: (Preprocessor, [PreprocessedVolume])."""
    pre = Preprocessor(CFG, phantom.affine)
    return pre, [pre.push(v, t * phantom.tr) for t, v in enumerate(phantom.volumes)]


@pytest.fixture(scope="module")
def offline_causal(phantom):
    return preprocess_run(phantom.to_nifti(), CFG, causal=True)


@pytest.fixture(scope="module")
def offline(phantom):
    return preprocess_run(phantom.to_nifti(), CFG, causal=False)


# ------------------------------------------------------------------------------------------- config


def test_config_round_trips_through_flat_json():
    cfg = PreprocessConfig(confounds=("constant", "drift", "motion", "motion_derivatives"), smoothing_fwhm_mm=6,
                           dummy_scans=2, warmup_trs=8)
    flat = cfg.to_dict()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values()), flat
    assert flat["confounds"] == "constant,drift,motion,motion_derivatives" and flat["smoothing_fwhm_mm"] == 6.0
    assert PreprocessConfig.from_json(json.dumps(flat)) == cfg
    assert PreprocessConfig.from_dict({**flat, "confounds": ["constant"]}).confounds == ("constant",)
    assert PreprocessConfig().high_pass_hz == 1 / 128 and PreprocessConfig().fd_threshold_mm == 0.5


@pytest.mark.parametrize("bad, words", [
    ({"confounds": "constant,wobble"}, "confounds must be families among"),
    ({"motion_correction": False, "confounds": "constant,motion"}, "motion_correction is off"),
    ({"smoothing_fwhm_mm": -1.0}, "smoothing_fwhm_mm must be ≥ 0"),
    ({"high_pass_hz": 0.0}, "high_pass_hz must be > 0 with the \"drift\" family"),
    ({"dvars_threshold": 0.8}, "dvars_threshold must be 0"),
    ({"reference": "middle"}, "reference must be one of first, given"),
    ({"warmup_trs": 2.5}, "warmup_trs must be an integer"),
    ({"standardize": "yes"}, "standardize must be true or false"),
    ({"fd_threshold_mm": float("nan")}, "fd_threshold_mm must be a finite number"),
    ({"speed": 1}, "unknown preprocess setting"),
])
def test_config_refuses_bad_values_naming_them(bad, words):
    with pytest.raises(PreprocessError, match=words) as err:
        PreprocessConfig.from_dict(bad)
    assert isinstance(err.value, ValueError)


# ------------------------------------------------------------------------------------------- motion


def test_realign_recovers_planted_motion(phantom, stream):
    pre, outs = stream
    assert pre.counts.not_converged == 0 and all(o.converged for o in outs)
    est = np.stack([o.params for o in outs])
    err = np.abs(est - phantom.motion)
    err_mm, err_deg = float(np.median(err[:, :3])), float(np.rad2deg(np.median(err[:, 3:])))
    print(f"motion recovery: median {err_mm:.4f} mm / {err_deg:.4f}°, worst {err[:, :3].max():.3f} mm / "
          f"{np.rad2deg(err[:, 3:].max()):.3f}°")
    assert err_mm <= 0.1 and err_deg <= 0.1
    assert np.abs(phantom.motion[:, :3]).max() > 1.5 and np.rad2deg(np.abs(phantom.motion[:, 3:]).max()) > 1.5
    # the realigned volumes sit on the unmoved brain
    ref_mask = phantom.head
    late = outs[-1].realigned[ref_mask]
    assert np.corrcoef(late, phantom.brain[ref_mask])[0, 1] > 0.99


def test_realign_honours_an_off_centre_affine_and_reslice_undoes_the_motion(phantom):
    # the grid centre is at (4, -10, 12) mm: rotations pivot there, not at the world origin
    t = 30
    fit = realign(phantom.volumes[t], phantom.volumes[0], phantom.affine)
    assert fit.converged and np.abs(fit.params - phantom.motion[t])[:3].max() < 0.1
    head = phantom.head
    truth = phantom.brain[head] * (1 + phantom.drift[t])  # unmoved, noiseless, drifted
    back = reslice(phantom.volumes[t], fit.params, phantom.affine)[head]
    before, after = np.abs(phantom.volumes[t][head] - truth).mean(), np.abs(back - truth).mean()
    assert after < 0.3 * before and after < 1.5 * PhantomConfig().noise * 600  # down to about the noise


def test_framewise_displacement_is_power_2012():
    params = np.zeros((3, 6))
    params[1, 0], params[2, 3] = 0.3, np.deg2rad(1.0)  # 0.3 mm, then 1° back on a 50 mm sphere
    fd = framewise_displacement(params)
    assert fd[0] == 0 and fd[1] == pytest.approx(0.3) and fd[2] == pytest.approx(0.3 + 50 * np.deg2rad(1.0))


def test_jerks_and_the_spike_are_censored(phantom, stream):
    pre, outs = stream
    planted_fd = framewise_displacement(phantom.motion)
    for j in PhantomConfig().jerks:
        assert planted_fd[j] > 1 and outs[j].fd > CFG.fd_threshold_mm
        assert outs[j].excluded and "FD" in outs[j].reason, outs[j].reason
    spike = PhantomConfig().spikes[0]
    assert outs[spike].excluded and "DVARS" in outs[spike].reason and outs[spike].std_dvars > 3
    # the slab does not pull the registration: no FD censoring around the spike
    assert "FD" not in outs[spike].reason and "FD" not in outs[spike + 1].reason
    steady = [o for i, o in enumerate(outs) if i not in (*PhantomConfig().jerks, spike, spike + 1)]
    assert all("FD" not in o.reason and "DVARS" not in o.reason for o in steady), [o.reason for o in steady]
    assert pre.counts.fd == 2 and pre.counts.warmup == CFG.warmup_trs
    assert all(o.excluded == bool(o.reason) for o in outs)


# ------------------------------------------------------------------------------------------- GLM


def test_streaming_equals_offline_causal(stream, offline_causal):
    _, outs = stream
    streamed = np.stack([o.data for o in outs])
    assert streamed.shape == offline_causal.data.shape
    assert np.abs(streamed - offline_causal.data).max() <= 1e-5
    assert [o.reason for o in outs] == offline_causal.reasons
    assert np.array_equal(np.stack([o.params for o in outs]), offline_causal.motion)
    assert np.allclose([o.fd for o in outs], offline_causal.fd) and np.allclose([o.dvars for o in outs],
                                                                               offline_causal.dvars)


def test_streaming_equals_offline_causal_with_staged_motion_regressors(phantom):
    """The opt-in motion families, staged (they enter the GLM at volume 20): still one computation live and
    offline-causal, and the design grows by their 12 columns exactly there."""
    cfg = PreprocessConfig(confounds=("constant", "drift", "motion", "motion_derivatives"), motion_min_volumes=20)
    pre = Preprocessor(cfg, phantom.affine)
    outs = [pre.push(v, t * phantom.tr) for t, v in enumerate(phantom.volumes)]
    offline = preprocess_run(phantom.to_nifti(), cfg, causal=True)
    assert np.abs(np.stack([o.data for o in outs]) - offline.data).max() <= 1e-5
    assert [o.reason for o in outs] == offline.reasons
    times, motion = np.arange(25) * 2.0, np.cumsum(np.full((25, 6), 0.01), axis=0)
    widths = [confound_design(times[:n], motion[:n], cfg.confounds, cfg.high_pass_hz, 20).shape[1] for n in (19, 20)]
    assert widths[1] - widths[0] == 12


def test_whole_run_mode_keeps_all_but_the_censored_and_z_scores_them(offline, offline_causal):
    censored = [i for i, r in enumerate(offline_causal.reasons) if r and r != "warm-up"]
    assert [i for i, r in enumerate(offline.reasons) if r] == censored  # no warm-up without causality
    kept = offline.data[~offline.excluded].astype(np.float64)
    assert np.allclose(kept.mean(0), 0, atol=1e-4) and np.allclose(kept.std(0, ddof=1), 1, atol=1e-4)
    assert np.array_equal(offline.motion, offline_causal.motion)


def test_online_glm_is_least_squares_on_the_volumes_so_far():
    """Brute force per t (lstsq on rows 0..t of the design evaluated on them), and at the last volume the
    whole-run fit on nilearn's design: both equal what OnlineGLM returns."""
    rng = np.random.default_rng(3)
    n, v, tr = 70, 40, 2.0
    times = np.arange(n) * tr
    motion = np.cumsum(rng.normal(0, 0.05, (n, 6)), axis=0)
    y = 100 + rng.normal(size=(n, v)) + np.outer(np.linspace(0, 3, n) ** 2, rng.uniform(0.5, 1, v))
    include = np.ones(n, bool)
    include[[20, 41]] = False
    fams = ("constant", "drift", "motion", "motion_derivatives")
    glm = OnlineGLM(v, fams, 1 / 64)
    for t in range(n):
        step = glm.update(y[t], times[t], motion[t], include[t])
        x = confound_design(times[:t + 1], motion[:t + 1], fams, 1 / 64)
        if step.determined:
            beta, *_ = np.linalg.lstsq(x[:t + 1][include[:t + 1]], y[:t + 1][include[:t + 1]], rcond=None)
            assert np.allclose(step.residual, y[t] - x[-1] @ beta, atol=1e-8), t
    assert cosine_drift(times, 1 / 64).shape[1] == 4  # the drift basis grew to 4 cosines over 140 s
    whole = clean_series(y, times, motion, include, PreprocessConfig(confounds=fams, high_pass_hz=1 / 64), False)
    assert np.allclose(step.residual, whole.residuals[-1], atol=1e-8)


@pytest.mark.parametrize("n", [10, 33, 64, 200])
def test_cosine_drift_is_nilearns(n):
    from nilearn.signal import create_cosine_drift

    times = np.arange(n) * 2.0
    assert np.allclose(cosine_drift(times, 1 / 128), create_cosine_drift(1 / 128, times)[:, :-1])


def test_drift_is_removed():
    """Per voxel, correlation with the planted drift over the scored volumes: high in the realigned data,
    gone after the GLM, causal and whole-run. A 4-min run on a coarse grid: at the default 1/128 Hz a
    shorter run has no cosine to remove a drift with (and motion ramps would do it instead)."""
    n = 120
    ph = phantom_run(PhantomConfig(shape=(32, 32, 18), voxel_mm=(6.0, 6.0, 7.0), n_volumes=n, jerks=(40,),
                                   spikes=(), seed=5))
    mc = MotionCorrector(CFG, ph.affine)
    steps = [mc.step(v, t * ph.tr) for t, v in enumerate(ph.volumes)]
    y = np.stack([s.data for s in steps])
    include = np.array([not s.reasons for s in steps])
    motion, times = np.stack([s.params for s in steps]), np.arange(n) * ph.tr
    scored = include & (np.arange(n) >= CFG.warmup_trs)
    drift = ph.drift[scored] - ph.drift[scored].mean()

    def r_with_drift(x: np.ndarray) -> tuple[float, float]:
        """Mean r over voxels (a leftover drift has one sign everywhere) and median |r|."""
        xc = x[scored] - x[scored].mean(0)
        r = (drift @ xc) / np.sqrt((xc * xc).sum(0) * (drift @ drift) + 1e-30)
        return float(r.mean()), float(np.median(np.abs(r)))

    raw = r_with_drift(y)
    causal = r_with_drift(clean_series(y, times, motion, include, CFG, causal=True).data)
    whole = r_with_drift(clean_series(y, times, motion, include, CFG, causal=False).data)
    chance = 0.6745 / np.sqrt(scored.sum() - 1)  # median |r| of unrelated series
    print(f"r with the planted drift (mean, median |r|): realigned {raw[0]:.2f} {raw[1]:.2f}, causal "
          f"{causal[0]:.2f} {causal[1]:.2f}, whole-run {whole[0]:.2f} {whole[1]:.2f}; chance |r| {chance:.2f}")
    assert raw[0] > 0.5 and raw[1] > 0.7
    assert abs(causal[0]) < 0.15 and causal[1] < 2 * chance
    assert abs(whole[0]) < 0.05 and whole[1] < 1.2 * chance


def test_warm_up_waits_for_a_determined_glm():
    cfg = PreprocessConfig(warmup_trs=0, confounds=("constant", "motion"), fd_threshold_mm=0, dvars_threshold=0)
    ph = phantom_run(PhantomConfig(shape=(24, 24, 14), voxel_mm=(8.0, 8.0, 9.0), n_volumes=12, jerks=(), spikes=()))
    pre = Preprocessor(cfg, ph.affine)
    outs = [pre.push(v, t * ph.tr) for t, v in enumerate(ph.volumes)]
    # 7 regressors: the first volume with residual degrees of freedom is the 8th; SD needs 2 of them
    assert [o.excluded for o in outs] == [True] * 8 + [False] * 4, [o.reason for o in outs]


# ------------------------------------------------------------------------------- bad volumes and inputs


def test_a_wrong_shape_or_broken_volume_is_excluded_counted_and_the_stream_goes_on(phantom):
    pre = Preprocessor(CFG, phantom.affine)
    outs = [pre.push(v, t * phantom.tr) for t, v in enumerate(phantom.volumes[:4])]
    bad = pre.push(np.ones((32, 32, 18), np.float32), 8.0)
    assert bad.excluded and "shape (32, 32, 18) differs from the run's (64, 64, 36)" in bad.reason
    assert bad.data.shape == outs[0].data.shape and np.isnan(bad.data).all()
    nan_vol = phantom.volumes[4].copy()
    nan_vol[3, 3, 3] = np.nan
    assert "non-finite" in pre.push(nan_vol, 10.0).reason
    assert "not after the previous" in pre.push(phantom.volumes[4], 6.0).reason
    good = pre.push(phantom.volumes[4], 8.0)
    assert good.converged and "shape" not in good.reason and np.isfinite(good.data).all()
    c = pre.counts
    assert (c.volumes, c.bad_shape, c.non_finite, c.bad_time) == (8, 1, 1, 1)


def test_a_pure_noise_volume_is_flagged_not_converged(phantom):
    noise = np.random.default_rng(1).normal(500, 150, phantom.volumes[0].shape).astype(np.float32)
    fit = realign(noise, prepare_reference(phantom.volumes[0], phantom.affine), phantom.affine)
    assert not fit.converged and fit.reason, fit
    pre = Preprocessor(CFG, phantom.affine)
    outs = [pre.push(v, t * phantom.tr) for t, v in enumerate(phantom.volumes[:5])]
    flagged = pre.push(noise, 5 * phantom.tr)
    assert not flagged.converged and flagged.excluded and "registration failed" in flagged.reason
    assert np.array_equal(flagged.params, outs[-1].params)  # the last good estimate, not the failed one
    after = pre.push(phantom.volumes[6], 6 * phantom.tr)
    assert after.converged and np.abs(after.params - phantom.motion[6])[:3].max() < 0.1
    assert pre.counts.not_converged == 1


def test_offline_refuses_a_3d_image_and_a_mismatched_reference(phantom):
    img3 = nib.Nifti1Image(phantom.volumes[0], phantom.affine)
    with pytest.raises(PreprocessError, match="not a 4-D BOLD run"):
        preprocess_run(img3, CFG)
    with pytest.raises(PreprocessError, match="reference shape"):
        preprocess_run(phantom.to_nifti(), PreprocessConfig(reference="given"), np.zeros((8, 8, 8)))
    with pytest.raises(PreprocessError, match="exactly when config.reference"):
        Preprocessor(CFG, phantom.affine, reference=phantom.volumes[0])


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("preprocess")
    ph = phantom_run(PhantomConfig(shape=(32, 32, 18), voxel_mm=(6.0, 6.0, 7.0), n_volumes=24, jerks=(10,),
                                   spikes=(), seed=2))
    path = d / "sub-01_task-pong_run-1_bold.nii.gz"
    nib.save(ph.to_nifti(), path)
    return path, ph


def test_cli_writes_fmriprep_style_outputs(small_run, tmp_path):
    from nilearn.interfaces.fmriprep import load_confounds

    path, ph = small_run
    res = CliRunner().invoke(app, ["preprocess", str(path), "--out", str(tmp_path), "--causal", "--warmup", "8",
                                   "--high-pass", "0.02"])
    assert res.exit_code == 0, res.output
    stem = tmp_path / "sub-01_task-pong_run-1"
    realigned = nib.load(f"{stem}_desc-realigned_bold.nii.gz")
    preproc = nib.load(f"{stem}_desc-preproc_bold.nii.gz")
    assert realigned.shape == preproc.shape == (32, 32, 18, 24) and preproc.header.get_zooms()[3] == 2.0
    lines = Path(f"{stem}_desc-confounds_timeseries.tsv").read_text().splitlines()
    cols = lines[0].split("\t")
    assert cols[:6] == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    assert {"framewise_displacement", "dvars", "std_dvars", "trans_x_derivative1", "cosine00",
            "motion_outlier00", "non_steady_state_outlier00"} <= set(cols)
    assert len(lines) == 1 + 24
    rows = [dict(zip(cols, line.split("\t"))) for line in lines[1:]]
    assert rows[0]["framewise_displacement"] == "n/a" and rows[0]["dvars"] == "n/a"
    trans = np.array([[float(r[c]) for c in cols[:3]] for r in rows])  # mm
    rot = np.array([[float(r[c]) for c in cols[3:6]] for r in rows])  # radians
    assert np.abs(trans - ph.motion[:, :3]).max() < 0.15 and np.abs(rot - ph.motion[:, 3:]).max() < 0.003
    assert float(rows[10]["framewise_displacement"]) > 0.5 and rows[10]["motion_outlier00"] == "1"
    side = json.loads(Path(f"{stem}_desc-preproc_bold.json").read_text())
    assert side["CausalGLM"] is True and PreprocessConfig.from_dict(side["Preprocessing"]).warmup_trs == 8
    # nilearn reads it as fMRIPrep output
    conf, _ = load_confounds(f"{stem}_desc-preproc_bold.nii.gz", strategy=("motion",), motion="basic",
                             demean=False)
    assert np.allclose(conf[cols[:6]].to_numpy(), np.hstack([trans, rot]), atol=1e-8)
    assert "wrote" in res.output and "24 volumes" in res.output


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("case", ["missing", "three_d", "truncated", "bad_option"])
def test_cli_bad_input_is_one_error_line_and_exit_2(small_run, tmp_path, case):
    path, ph = small_run
    args = []
    if case == "missing":
        target, want = tmp_path / "nowhere_bold.nii.gz", "no such BOLD run file"
    elif case == "three_d":
        target = tmp_path / "vol_bold.nii.gz"
        nib.save(nib.Nifti1Image(ph.volumes[0], ph.affine), target)
        want = "not a 4-D BOLD run (shape (32, 32, 18))"
    elif case == "truncated":
        target, want = _truncate(path, tmp_path / "cut_bold.nii.gz"), "truncated or damaged NIfTI"
    else:
        target, want, args = path, "fd_threshold_mm must be ≥ 0", ["--fd-threshold", "-1"]
    res = CliRunner().invoke(app, ["preprocess", str(target), "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_bench_preprocess_prints_its_figures():
    res = CliRunner().invoke(app, ["bench", "preprocess", "--volumes", "6", "--shape", "24,24,14", "--voxel-mm",
                                   "8,8,9", "--large-volumes", "3", "--large-shape", "20,24,20", "--large-voxel-mm",
                                   "9,9,9"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for prefix in ("", "large_"):
        for key in ("preprocess_ratio", "ratio_p99", "ours_p50_ms", "ours_p99_ms", "bare_p50_ms", "bare_p99_ms"):
            assert isinstance(out[prefix + key], float) and math.isfinite(out[prefix + key]) and out[prefix + key] > 0
        assert set(out[prefix + "stage_p50_ms"]) == {"realign_ms", "reslice_ms", "mask_ms", "glm_ms",
                                                     "standardize_ms"}
    assert out["shape"] == [24, 24, 14] and out["large_shape"] == [20, 24, 20] and out["threads"] == 1
    assert out["bench"] == "preprocess" and out["volumes"] == 6
