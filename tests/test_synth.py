"""`neuroarcade synth` → `neuroarcade fit` → `neuroarcade predict` through the real CLI commands."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from encoders.weights import EncodingWeights
from neuroarcade.commands import encoding


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    encoding.register(app)
    return app


@pytest.fixture(scope="module")
def dataset(app, tmp_path_factory):
    out = tmp_path_factory.mktemp("bids") / "ds"
    res = CliRunner().invoke(app, ["synth", str(out), "--runs", "3", "--trs", "40", "--voxel-mm", "14", "--seed", "4"])
    assert res.exit_code == 0, res.output
    return out


def test_synth_writes_a_bids_dataset_with_truth(dataset):
    func = dataset / "sub-01" / "func"
    runs = sorted(func.glob("*_bold.nii.gz"))
    assert [r.name for r in runs] == [f"sub-01_task-game_run-{i}_bold.nii.gz" for i in (1, 2, 3)]
    img = nib.load(runs[0])
    mask = np.asarray(nib.load(dataset / "derivatives" / "atlas" / "mask.nii.gz").dataobj) > 0
    assert img.shape == mask.shape + (40,) and img.header.get_zooms()[3] == 2.0
    assert json.loads((func / "sub-01_task-game_run-1_bold.json").read_text())["RepetitionTime"] == 2.0
    events = list(csv.DictReader(open(func / "sub-01_task-game_run-1_events.tsv"), delimiter="\t"))
    assert len(events) == 40 and events[3]["trial_type"] == "trigger" and float(events[3]["onset"]) == 6.0
    atlas = np.asarray(nib.load(dataset / "derivatives" / "atlas" / "atlas.nii.gz").dataobj)
    assert set(np.unique(atlas[mask])) <= set(range(7)) and np.all(atlas[~mask] == 0)
    truth = np.load(dataset / "derivatives" / "truth" / "truth.npz", allow_pickle=False)
    assert truth["true_r"].shape == (mask.sum(),)
    data = np.asarray(img.dataobj)
    assert np.all(data[~mask] == 0) and np.all(data[mask].std(1) > 0)
    # determinism: the same seed gives the same data
    from encoders.synth import SynthConfig, generate

    again = generate(SynthConfig(n_runs=3, n_trs=40, voxel_mm=14, seed=4))
    np.testing.assert_allclose(again.bold[0].T, data[mask], rtol=1e-6)


def test_fit_then_predict_cli(app, dataset, tmp_path):
    func = dataset / "sub-01" / "func"
    feats = dataset / "derivatives" / "features" / "sub-01" / "func"
    bold = [str(func / f"sub-01_task-game_run-{i}_bold.nii.gz") for i in (1, 2, 3)]
    features = [str(feats / f"sub-01_task-game_run-{i}_desc-action_features.npy") for i in (1, 2, 3)]
    atlas = dataset / "derivatives" / "atlas"
    weights = tmp_path / "w.safetensors"
    res = CliRunner().invoke(app, [
        "fit", "--bold", *bold, "--features", *features, "--tr", "2.0", "--out", str(weights),
        "--mask", str(atlas / "mask.nii.gz"), "--delays", "1", "2", "3", "--pca", "8",
        "--atlas", str(atlas / "atlas.nii.gz"), "--atlas-labels", str(atlas / "atlas_labels.tsv"),
        "--layer", "7", "--quiet"])
    assert res.exit_code == 0, res.output
    w = EncodingWeights.load(weights)
    assert w.delays == [1, 2, 3] and w.spaces[0].out_dim == 8 and w.spaces[0].layer == 7
    assert w.spaces[0].model == "synthetic" and w.spaces[0].condition == "action"  # from the sidecar
    assert set(w.roi_names.values()) >= {"visual", "prefrontal"} and w.cv_r is not None
    scores = list(csv.DictReader(open(tmp_path / "w_scores.tsv"), delimiter="\t"))
    assert scores[0]["roi"] == "all" and scores[0]["kind"] == "cv_voxel_mean" and -1 <= float(scores[0]["r"]) <= 1
    assert scores[0]["n_undefined"] == "0" and "cv_r" not in scores[0] and float(scores[0]["r2"]) <= 1

    pred = tmp_path / "pred.nii.gz"
    res = CliRunner().invoke(app, ["predict", "--weights", str(weights), "--features", features[2], "--out", str(pred)])
    assert res.exit_code == 0, res.output
    img = nib.load(pred)
    ref = nib.load(bold[2])
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    vol = np.asarray(img.dataobj)
    np.testing.assert_allclose(vol[w.mask].T, w.predict([np.load(features[2])]), atol=1e-6)
    assert np.all(vol[~w.mask] == 0)

    # features of another model/dimension: a clear error, no traceback
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((10, 5), np.float32))
    res = CliRunner().invoke(app, ["predict", "--weights", str(weights), "--features", str(other), "--out",
                                   str(tmp_path / "x.nii.gz")])
    assert res.exit_code == 2 and "fitted on dim 16" in res.output


def test_fit_bids_two_spaces_with_partition(app, dataset, tmp_path):
    weights = tmp_path / "joint.safetensors"
    res = CliRunner().invoke(app, ["fit", "--bids", str(dataset), "--out", str(weights), "--mask",
                                   str(dataset / "derivatives" / "atlas" / "mask.nii.gz"), "--partition", "--quiet"])
    assert res.exit_code == 0, res.output
    w = EncodingWeights.load(weights)
    assert [s.name for s in w.spaces] == ["action", "reasoning"]
    header = open(tmp_path / "joint_scores.tsv").readline().rstrip("\n").split("\t")
    assert {"unique_action", "unique_reasoning", "shared"} <= set(header)
    assert (tmp_path / "joint_unique_action.nii.gz").is_file()


def test_synth_records_gameplay_linked_from_events(app, tmp_path):
    from services.plumbing.recording import read_recording

    out = tmp_path / "rec"
    res = CliRunner().invoke(app, ["synth", str(out), "--runs", "1", "--trs", "6", "--voxel-mm", "16", "--record"])
    assert res.exit_code == 0, res.output
    events = list(csv.DictReader(open(out / "sub-01" / "func" / "sub-01_task-game_run-1_events.tsv"), delimiter="\t"))
    stim = out / events[0]["stim_file"]
    rec = read_recording(stim)
    assert len(rec.triggers) >= 6 and rec.header.game == "ALE/Pong-v5"
    assert len(rec.frames()) == 6 * 2 * 60 // 4 + 1  # 12 s of game at 15 Hz, plus the reset frame


def test_synth_with_faults_writes_moved_runs_and_their_true_motion(app, tmp_path):
    from encoders.faults import FaultConfig, fault_schedule, read_motion_tsv
    from encoders.synth import SynthConfig, generate

    out = tmp_path / "faulty"
    res = CliRunner().invoke(app, ["synth", str(out), "--runs", "2", "--trs", "20", "--voxel-mm", "14", "--seed", "4",
                                   "--faults", "realistic,seed=3"])
    assert res.exit_code == 0, res.output
    truth_dir = out / "derivatives" / "truth"
    faults = FaultConfig.parse("realistic,seed=3")
    for run in (1, 2):
        tsv = truth_dir / f"sub-01_task-game_run-{run}_desc-truemotion_timeseries.tsv"
        motion = read_motion_tsv(tsv)
        assert motion.shape == (20, 6) and np.all(motion[0] == 0)
        # run N draws its faults with seed + N (pure: the schedule is reproducible from the config)
        np.testing.assert_allclose(motion, fault_schedule(faults.replace(seed=3 + run), 20, 2.0, (1, 1, 1)).motion,
                                   atol=1e-7)
    meta = json.loads((truth_dir / "truth.json").read_text())["faults"]
    assert meta["config"]["jerks"] == 2 and len(meta["runs"]["run-1"]["spikes"]) == 2
    img = nib.load(out / "sub-01" / "func" / "sub-01_task-game_run-1_bold.nii.gz")
    mask = np.asarray(nib.load(out / "derivatives" / "atlas" / "mask.nii.gz").dataobj) > 0
    data = np.asarray(img.dataobj)
    clean = generate(SynthConfig(n_runs=2, n_trs=20, voxel_mm=14, seed=4)).bold[0].T
    # volume 0 is the unmoved reference (only physiology, ≤ 2 %, on it); later ones moved and drifted
    assert (np.abs(data[mask][:, 0] - clean[:, 0]) / clean[:, 0]).max() < 0.02
    assert np.abs(data[mask][:, -1] - clean[:, -1]).mean() > 0.02 * clean.mean()
    assert (data[~mask][:, -1] > 0).any()  # the head moved into voxels outside the fit mask

    # a bad fault setting: one error line naming it, exit 2, nothing written
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "bad"), "--runs", "1", "--trs", "6", "--faults", "jerks=-1"])
    assert res.exit_code == 2 and "error: fault setting jerks must be ≥ 0" in res.output
    assert not (tmp_path / "bad").exists()
