"""`neuroarcade fit` on fMRIPrep derivatives of a BIDS dataset: runs, brain masks and confounds found by
their BIDS entities, the BOLD cleaned before the ridge (--preprocess, --confounds) and the cleaning recorded
in the weights. A small fMRIPrep-layout folder written with nibabel: 3 runs of 80 TRs on a 10×10×8 grid,
BOLD = planted signal from the features + a motion-driven artefact (the 6 motion parameters × a loading
per voxel) + an aCompCor-driven one + drift + noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from neuroarcade.cli import app

N_RUNS, N_TRS, TR, DIM = 3, 80, 2.0, 4
GRID = (10, 10, 8)
SPACE = "MNI152NLin2009cAsym"
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _zs(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0)


def _write_confounds(path: Path, motion: np.ndarray, compcor: np.ndarray, drop: tuple[str, ...] = ()) -> None:
    """fMRIPrep's table: motion, its derivatives and squares (n/a on the first row where fMRIPrep has it),
    framewise displacement, aCompCor, cosines; and the JSON sidecar nilearn reads the aCompCor masks from."""
    n = len(motion)
    cols: dict[str, np.ndarray] = {}
    deriv = np.vstack([np.full((1, 6), np.nan), np.diff(motion, axis=0)])
    for k, name in enumerate(MOTION):
        cols[name] = motion[:, k]
        cols[f"{name}_derivative1"] = deriv[:, k]
        cols[f"{name}_power2"] = motion[:, k] ** 2
        cols[f"{name}_derivative1_power2"] = deriv[:, k] ** 2
    fd = np.abs(deriv[:, :3]).sum(1) + 50 * np.abs(deriv[:, 3:]).sum(1)
    cols["framewise_displacement"] = fd
    for k in range(compcor.shape[1]):
        cols[f"a_comp_cor_{k:02d}"] = compcor[:, k]
    n_cos = int(np.floor(2 * n * TR / 128))
    for k in range(n_cos):
        cols[f"cosine{k:02d}"] = np.sqrt(2 / n) * np.cos(np.pi / n * (np.arange(n) + 0.5) * (k + 1))
    names = [c for c in cols if c not in drop]
    lines = ["\t".join(names)]
    lines += ["\t".join("n/a" if np.isnan(cols[c][t]) else f"{cols[c][t]:.8g}" for c in names) for t in range(n)]
    path.write_text("\n".join(lines) + "\n")
    meta = {f"a_comp_cor_{k:02d}": {"Method": "aCompCor", "Mask": "combined", "Retained": True}
            for k in range(compcor.shape[1])}
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    rng = np.random.default_rng(13)
    root = tmp_path_factory.mktemp("bids")
    func = root / "derivatives" / "fmriprep" / "sub-01" / "func"
    feat = root / "derivatives" / "features" / "sub-01" / "func"
    func.mkdir(parents=True)
    feat.mkdir(parents=True)
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    affine[:3, 3] = [-15, -15, -12]
    ijk = np.stack(np.meshgrid(*map(np.arange, GRID), indexing="ij"), -1)
    brain = (((ijk - [4.5, 4.5, 3.5]) / [4.2, 4.2, 3.3]) ** 2).sum(-1) <= 1
    n_vox = int(brain.sum())
    planted = rng.random(n_vox) < 0.5  # the voxels that carry the features' signal
    w = rng.normal(size=(2 * DIM, n_vox))  # delays 1 and 2
    motion_load = rng.normal(scale=0.8, size=(6, n_vox))
    compcor_load = rng.normal(scale=0.6, size=(5, n_vox))
    drift_load = rng.normal(scale=1.5, size=(2, n_vox))
    base = 100 + rng.normal(scale=5, size=n_vox)
    raw_means = []
    for run in range(1, N_RUNS + 1):
        stem = f"sub-01_task-game_run-{run}"
        x = rng.normal(size=(N_TRS, DIM))
        for t in range(1, N_TRS):  # smooth features, like activations at TR pace
            x[t] = 0.4 * x[t - 1] + 0.9 * x[t]
        np.save(feat / f"{stem}_desc-action_features.npy", x.astype(np.float32))
        design = np.hstack([np.vstack([np.zeros((lag, DIM)), x[:-lag]]) for lag in (1, 2)])
        signal = _zs(design @ w) * planted
        motion = np.cumsum(rng.normal(scale=[0.05] * 3 + [0.001] * 3, size=(N_TRS, 6)), axis=0)  # mm, rad
        motion[N_TRS // 2:, :3] += rng.normal(scale=0.8, size=3)  # a jerk
        compcor = _zs(rng.normal(size=(N_TRS, 5)).cumsum(0) * 0.3 + rng.normal(size=(N_TRS, 5)))
        t = np.arange(N_TRS) / N_TRS
        drift = np.stack([t - 0.5, np.cos(np.pi * t)], 1) @ drift_load
        noise = rng.normal(scale=0.6, size=(N_TRS, n_vox))
        y = base + signal + _zs(motion) @ motion_load + compcor @ compcor_load + drift + noise
        vol = np.zeros((*GRID, N_TRS), np.float32)
        vol[brain] = y.T
        raw_means.append(vol.mean(3))
        for space in (SPACE, "T1w"):  # two output spaces: --output-space picks one
            prefix = func / f"{stem}_space-{space}"
            img = nib.Nifti1Image(vol, affine)
            img.header["pixdim"][4] = TR
            nib.save(img, f"{prefix}_desc-preproc_bold.nii.gz")
            Path(f"{prefix}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
            nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), f"{prefix}_desc-brain_mask.nii.gz")
        _write_confounds(func / f"{stem}_desc-confounds_timeseries.tsv", motion, compcor)
    return {"root": root, "derivatives": root / "derivatives" / "fmriprep", "brain": brain, "planted": planted,
            "mean_epi": np.mean(raw_means, axis=0)}


def _fit(ds: dict, out: Path, *extra: str, derivatives: Path | None = None):
    args = ["fit", "--bids", str(ds["root"]), "--derivatives", str(derivatives or ds["derivatives"]),
            "--subject", "01", "--task", "game", "--output-space", SPACE, "--delays", "1", "2",
            "--alphas", "1", "10", "100", "1000", "--out", str(out), "--quiet", *extra]
    if "--preprocess" not in extra:  # cleaning is opt-in (the default is none)
        args += ["--preprocess", "offline"]
    return CliRunner().invoke(app, args)


def test_fit_on_fmriprep_derivatives_regresses_confounds_and_records_it(dataset, tmp_path):
    from encoders.preprocess import PreprocessConfig
    from encoders.weights import EncodingWeights

    clean, raw = tmp_path / "clean.safetensors", tmp_path / "raw.safetensors"
    res = _fit(dataset, clean, "--preprocess", "offline", "--confounds", "motion24,acompcor")
    assert res.exit_code == 0, res.output
    res = _fit(dataset, raw, "--preprocess", "none")
    assert res.exit_code == 0, res.output

    w = EncodingWeights.load(clean)
    assert w.preprocess_mode == "offline"
    cfg = w.preprocess
    assert isinstance(cfg, PreprocessConfig)
    assert cfg.confounds == ("constant", "drift", "motion", "motion_derivatives")
    assert cfg.high_pass_hz == pytest.approx(1 / 128) and cfg.standardize and cfg.motion_correction
    rec = w.preprocessing
    assert rec.confounds == ["motion24", "acompcor"] and rec.source == "fmriprep"
    assert rec.load_confounds["motion"] == "full" and rec.load_confounds["n_compcor"] == 5
    assert len(rec.columns) == N_RUNS and all(len(c) == 24 + 5 for c in rec.columns)
    assert not any(c.startswith("cosine") for c in rec.columns[0])  # the drift basis is ours
    assert np.array_equal(w.mask, dataset["brain"])  # fMRIPrep's brain mask, no --mask given
    np.testing.assert_allclose(w.reference, dataset["mean_epi"], rtol=1e-5, atol=1e-3)  # the mean EPI
    assert w.provenance["bold"][0].endswith(f"sub-01_task-game_run-1_space-{SPACE}_desc-preproc_bold.nii.gz")

    w_raw = EncodingWeights.load(raw)
    assert w_raw.preprocess_mode == "none" and w_raw.preprocess is None
    planted = dataset["planted"]
    r_clean, r_raw = float(w.cv_r[planted].mean()), float(w_raw.cv_r[planted].mean())
    # confound regression removes the motion and aCompCor artefacts and the drift: the held-out r in the
    # planted voxels rises (measured: 0.57 vs 0.25; 0.52 with motion6 only, 0.43 with the drift alone). The
    # ceiling is lowered by the 31 regressors on 80 TRs, which also take a share of the planted signal.
    assert r_clean > r_raw + 0.2, (r_clean, r_raw)
    assert r_clean > 0.45, r_clean


def test_weights_without_a_preprocess_record_load_as_none(dataset, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from encoders.weights import EncodingWeights

    out = tmp_path / "w.safetensors"
    assert _fit(dataset, out, "--no-score").exit_code == 0
    w = EncodingWeights.load(out)  # the default: offline, auto confounds = motion6 for fMRIPrep runs
    assert w.preprocess_mode == "offline" and w.preprocessing.confounds == ["motion6"]
    assert w.preprocess.confounds == ("constant", "drift", "motion")
    with safe_open(str(out), framework="numpy") as f:
        meta = json.loads(f.metadata()["neuroarcade"])
    meta.pop("preprocess")
    tensors = {k: v for k, v in load_file(str(out)).items() if k != "reference"}
    old = tmp_path / "old.safetensors"  # as written before the record existed
    save_file(tensors, str(old), metadata={"neuroarcade": json.dumps(meta)})
    w_old = EncodingWeights.load(old)
    assert w_old.preprocess_mode == "none" and w_old.preprocess is None and w_old.reference is None
    np.testing.assert_array_equal(w_old.coef, w.coef)


def test_causal_fit_records_the_live_cores_config_and_zeroes_the_warm_up(dataset, tmp_path):
    from encoders.weights import EncodingWeights

    out = tmp_path / "causal.safetensors"
    res = _fit(dataset, out, "--preprocess", "causal", "--confounds", "motion12", "--no-score")
    assert res.exit_code == 0, res.output
    w = EncodingWeights.load(out)
    assert w.preprocess_mode == "causal"
    assert w.preprocess.confounds == ("constant", "drift", "motion", "motion_derivatives")
    assert all(z[:w.preprocess.warmup_trs] == list(range(w.preprocess.warmup_trs)) for z in w.preprocessing.zeroed)
    bad = _fit(dataset, out, "--preprocess", "causal", "--confounds", "acompcor")
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: --preprocess causal --confounds acompcor")


def test_offline_cleaning_is_the_cores_clean_series(dataset):
    """One definition: with the 6 motion parameters, the fit's cleaning (nilearn's load_confounds and
    signal.clean) equals the preprocessing core's whole-run GLM on the same parameters."""
    from encoders.data import FitPreprocess, clean_bold, fmriprep_runs, load_bold, load_run_confounds
    from encoders.preprocess import PreprocessConfig, clean_series

    runs = fmriprep_runs(dataset["root"], dataset["derivatives"], "01", "game", None, SPACE)
    bold = load_bold(runs.bold[:1], run_masks=runs.masks[:1])
    cleaned, record = clean_bold(bold, FitPreprocess(mode="offline", confounds=("motion6",)))
    motion = load_run_confounds(runs.bold[0], N_TRS, ("motion6",), demean=False).values
    core = clean_series(bold.runs[0], np.arange(N_TRS) * TR, motion, np.ones(N_TRS, bool),
                        PreprocessConfig.from_dict(record.config), causal=False)
    np.testing.assert_allclose(cleaned[0], core.data, atol=1e-4)


@pytest.mark.parametrize("case", ["missing_column", "two_spaces"])
def test_unusable_derivatives_are_one_error_line(dataset, tmp_path, case):
    deriv = dataset["derivatives"]
    want = "error: --derivatives"
    extra: list[str] = []
    if case == "missing_column":
        deriv = tmp_path / "fmriprep"
        shutil.copytree(dataset["derivatives"], deriv)
        tsv = deriv / "sub-01" / "func" / "sub-01_task-game_run-2_desc-confounds_timeseries.tsv"
        lines = [line.split("\t") for line in tsv.read_text().splitlines()]
        drop = lines[0].index("trans_y")
        tsv.write_text("\n".join("\t".join(c for k, c in enumerate(row) if k != drop) for row in lines) + "\n")
        want = f"error: {tsv}: missing column(s) trans_y (needed by --confounds motion24)"
        extra = ["--confounds", "motion24", "--preprocess", "offline"]
    args = ["fit", "--bids", str(dataset["root"]), "--derivatives", str(deriv), "--subject", "01",
            "--out", str(tmp_path / "w.safetensors"), "--quiet", *extra]
    if case == "missing_column":
        args[7:7] = ["--output-space", SPACE]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), res.stderr
    if case == "two_spaces":
        assert "--output-space" in lines[0] and SPACE in lines[0] and "T1w" in lines[0]
    assert not (tmp_path / "w.safetensors").exists()
