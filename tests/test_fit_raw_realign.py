"""`neuroarcade fit --preprocess causal|offline` on raw (not fMRIPrep) 4-D runs with planted head motion
(issue #13): the fit realigns and reslices the volumes as the live path will, records it
(motion_correction, the reference volume the runs were registered to), and a run fed volume by volume
through the live core (``encoders.stream.LivePreprocess``) gives the fit's preprocessed series.

The runs: a phantom head (20×20×10, 4×4×5 mm) carrying 1 % planted signal from the features, moved by
``encoders.faults`` (slow drift + a jerk, up to ~2 mm / 2°), scanner drift and noise; run 2 also starts
with the head 2 mm off run 1's position (a new run after a pause), which the fit must register away."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from encoders.faults import FaultConfig, fault_schedule, apply_faults, move_head
from encoders.phantom import PhantomConfig, phantom_run
from neuroarcade.cli import app

N_RUNS, N, TR, DIM = 2, 60, 2.0, 4
SHAPE, VOXEL_MM = (20, 20, 10), (4.0, 4.0, 5.0)
FAULTS = FaultConfig(motion_mm=1.0, motion_deg=1.0, jerks=1, jerk_mm=1.0, jerk_deg=1.0, drift_linear=0.02)
RUN2_OFFSET = np.array([2.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # trans_x mm: run 2's head position vs run 1's


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    ph = phantom_run(PhantomConfig(shape=SHAPE, voxel_mm=VOXEL_MM, n_volumes=1, jerks=(), spikes=(), drift=0.0,
                                   noise=0.0, seed=4))
    rng = np.random.default_rng(0)
    loading = rng.standard_normal((DIM, int(ph.head.sum())))
    bold, feats = [], []
    for r in range(N_RUNS):
        x = np.cumsum(rng.standard_normal((N, DIM)), axis=0) * 0.3 + rng.standard_normal((N, DIM))
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
        sched = fault_schedule(FAULTS.replace(seed=20 + r), N, TR, SHAPE)
        vols = []
        for t in range(N):
            v = ph.brain.copy()
            v[ph.head] *= 1 + 0.01 * (x[t] @ loading) / np.sqrt(DIM)
            if r == 1:
                v = move_head(v, RUN2_OFFSET, ph.affine)
            v = apply_faults(v, t, sched, ph.affine) + rng.normal(0, 6.0, SHAPE).astype(np.float32)
            vols.append(np.abs(v))
        img = nib.Nifti1Image(np.stack(vols, axis=-1).astype(np.float32), ph.affine)
        img.header["pixdim"][4] = TR
        bold.append(root / f"sub-01_task-game_run-{r + 1}_bold.nii.gz")
        nib.save(img, bold[-1])
        feats.append(root / f"run-{r + 1}_features.npy")
        np.save(feats[-1], x)
    mask = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(ph.head.astype(np.uint8), ph.affine), mask)
    return {"bold": bold, "features": feats, "mask": mask, "head": ph.head}


def _fit(ds: dict, out: Path, mode: str, *extra: str):
    args = ["fit", "--bold", *map(str, ds["bold"]), "--features", *map(str, ds["features"]), "--mask",
            str(ds["mask"]), "--preprocess", mode, "--delays", "1", "2", "--alphas", "1", "100", "--no-score",
            "--out", str(out), "--quiet", *extra]
    return CliRunner().invoke(app, args)


def test_causal_fit_realigns_raw_runs_and_the_live_core_sees_the_same_series(dataset, tmp_path):
    from encoders.data import FitPreprocess, load_bold, preprocess_bold
    from encoders.stream import LivePreprocess
    from encoders.weights import EncodingWeights

    out = tmp_path / "w.safetensors"
    res = _fit(dataset, out, "causal")
    assert res.exit_code == 0, res.output + str(res.exception)
    w = EncodingWeights.load(out)
    assert w.preprocess_mode == "causal" and w.preprocessing.source == "bold"
    assert w.preprocess.motion_correction and w.preprocess.reference == "first"
    assert "motion" not in w.preprocess.confounds  # the core's default (PreprocessConfig.confounds)
    first = np.asarray(nib.load(dataset["bold"][0]).dataobj[..., 0], np.float32)
    assert np.array_equal(w.reference, first)  # the volume the runs were registered to

    # the fit's series, by the function run_fit calls, against run 2 fed live (registered to the weights'
    # reference, realigned, causal GLM): the same numbers
    bold = load_bold(dataset["bold"], dataset["mask"])
    fitted = preprocess_bold(bold, FitPreprocess(mode="causal"))
    assert fitted.record.zeroed == w.preprocessing.zeroed
    live = LivePreprocess(w)
    vols = np.asarray(nib.load(dataset["bold"][1]).dataobj, np.float32)
    outs = [live.push(t, np.ascontiguousarray(vols[..., t]), t * TR) for t in range(N)]
    scored = np.array([not o.excluded for o in outs])
    assert np.flatnonzero(~scored).tolist() == w.preprocessing.zeroed[1]
    streamed = np.stack([o.data for o in outs])[scored]
    assert np.abs(streamed - fitted.runs[1][scored]).max() <= 1e-5
    assert not fitted.runs[1][~scored].any()
    # run 2's start position was registered away (the fit and the live core share that registration)
    assert live.alignment.converged and abs(live.alignment.translation_mm - 2.0) < 0.2
    assert scored.sum() >= N - 15 - 4  # warm-up + the jerk (and a spike, if any): the rest is fitted
    # a held-out run cleaned alone for these weights (registered to their reference): the same series
    alone = preprocess_bold(load_bold([dataset["bold"][1]], dataset["mask"]), FitPreprocess(mode="causal"),
                            reference=w.reference)
    assert np.abs(alone.runs[0] - fitted.runs[1]).max() <= 1e-5


def test_offline_fit_of_raw_runs_realigns_too(dataset, tmp_path):
    from encoders.weights import EncodingWeights

    out = tmp_path / "w.safetensors"
    res = _fit(dataset, out, "offline")
    assert res.exit_code == 0, res.output + str(res.exception)
    w = EncodingWeights.load(out)
    assert w.preprocess_mode == "offline" and w.preprocess.motion_correction
    assert w.reference is not None and w.reference.shape == SHAPE
    assert all(len(z) < N // 4 for z in w.preprocessing.zeroed)  # only censored volumes, no warm-up
    bad = _fit(dataset, tmp_path / "x.safetensors", "offline", "--confounds", "acompcor")  # no table for raw runs
    assert bad.exit_code == 2 and "raw runs take motion6 or motion12" in bad.stderr
