"""`neuroarcade fit` as a new user meets it: a bad input is one line naming the file and exit status 2,
never a traceback; a fit on one run says what it could not do. Real NIfTI files written with nibabel; the
command in-process (typer's runner) and once as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from neuroarcade.cli import app

N_TRS = 30


def _write_run(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = nib.Nifti1Image(rng.normal(size=(4, 4, 3, N_TRS)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header["pixdim"][4] = 2.0  # the TR, read from the header
    nib.save(img, path)
    return path


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fit-inputs")
    rng = np.random.default_rng(0)
    for i in (1, 2):
        _write_run(d / f"run-{i}_bold.nii.gz", seed=i)
        np.save(d / f"run-{i}_features.npy", rng.normal(size=(N_TRS, 5)).astype(np.float32))
    np.save(d / "short_features.npy", rng.normal(size=(N_TRS - 2, 5)).astype(np.float32))
    _truncate(d / "run-1_bold.nii.gz", d / "truncated_bold.nii.gz")
    _truncate(_write_run(d / "plain_bold.nii", seed=3), d / "truncated_bold.nii")
    return d


def _args(bold: list[Path], features: list[Path], out: Path) -> list[str]:
    return ["fit", "--bold", *map(str, bold), "--features", *map(str, features), "--out", str(out), "--quiet"]


def _mismatched_rows(d: Path) -> tuple[list[Path], list[Path], str]:
    bold = [d / "run-1_bold.nii.gz", d / "run-2_bold.nii.gz"]
    feats = [d / "run-1_features.npy", d / "short_features.npy"]
    return bold, feats, (f"error: --features: {feats[1]}: {N_TRS - 2} feature rows, but {bold[1]} has {N_TRS} "
                         "volumes (one row per TR)")


@pytest.mark.parametrize("case", ["mismatched_rows", "truncated_gz", "truncated_nii", "missing_features"])
def test_a_bad_input_is_one_line_naming_the_file_and_exit_2(inputs, tmp_path, case):
    d = inputs
    bold = [d / "run-1_bold.nii.gz", d / "run-2_bold.nii.gz"]
    feats = [d / "run-1_features.npy", d / "run-2_features.npy"]
    if case == "mismatched_rows":
        bold, feats, want = _mismatched_rows(d)
    elif case == "truncated_gz":
        bold[0] = d / "truncated_bold.nii.gz"
        want = f"error: {bold[0]}: truncated or damaged NIfTI (EOFError: "
    elif case == "truncated_nii":
        bold[0] = d / "truncated_bold.nii"
        want = f"error: {bold[0]}: truncated or damaged NIfTI (OSError: "
    else:
        feats[0] = d / "nowhere.npy"
        want = f"error: --features: {feats[0]}: no such feature file"
    out = tmp_path / "w.safetensors"
    res = CliRunner().invoke(app, _args(bold, feats, out))
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception  # typer.Exit, no crash
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), res.stderr
    assert not out.exists()


@pytest.mark.slow  # a process of its own
def test_the_real_process_prints_the_line_and_no_traceback(inputs, tmp_path):
    bold, feats, want = _mismatched_rows(inputs)
    res = subprocess.run([sys.executable, "-m", "neuroarcade.cli", *_args(bold, feats, tmp_path / "w.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.stderr.strip().splitlines() == [want]


@pytest.mark.slow  # a fit
def test_a_single_run_fit_warns_that_alphas_were_not_chosen_by_loro_and_nothing_is_held_out(inputs, tmp_path):
    from encoders.weights import EncodingWeights

    out = tmp_path / "w.safetensors"
    res = CliRunner().invoke(app, _args([inputs / "run-1_bold.nii.gz"], [inputs / "run-1_features.npy"], out))
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, res.stderr
    assert "one run only" in warnings[0] and "not by leave-one-run-out CV" in warnings[0]
    assert "no held-out scores" in warnings[0]
    w = EncodingWeights.load(out)  # still written, and its provenance says the same
    assert w.cv_r is None and w.provenance["warnings"] == [warnings[0].removeprefix("warning: ")]
    assert w.provenance["alpha_cv"].startswith("5 contiguous folds")
