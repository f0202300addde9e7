"""`neuroarcade study` on a synthetic study with planted group effects: recovery, SIGKILL resume, equality with
extract + fit + group statistics by hand, and bad inputs.

Real everything: recordings played headless in ALE, the tiny VLM and LAM built locally, a real local Ray instance
(2 CPUs, once for the module), real NIfTI, the real fits. The synthetic dataset (10 subjects × 3 runs × 36 TRs)
is made once for the module; its extraction is the study's own extract stage, whose cache the dataset's
study.toml reuses (same fingerprints), so the main study run fits and scores only; the resume and bad-input
tests extract from empty caches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.study import LEDGER, load_study_config, ledger, run_study

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # Ray, two tiny models, hundreds of fits; minutes

SUBJECTS = 10


@pytest.fixture(scope="module")
def local_ray():
    from pipelines.batch import init_ray

    ray = init_ray(None, num_cpus=2, object_store_mb=80)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, local_ray) -> Path:
    from pipelines.synth_study import SynthStudyConfig, make_synth_study

    root = tmp_path_factory.mktemp("study") / "data"
    return make_synth_study(root, SynthStudyConfig(subjects=SUBJECTS), progress=False, say=lambda s: None)


@pytest.fixture(scope="module")
def study(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("study-out")
    return run_study(load_study_config(dataset), out, progress=False)


def _truth(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset.parent / "derivatives" / "truth" / "truth.tsv", sep="\t", keep_default_na=False,
                       dtype=str)


# --- the known answer --------------------------------------------------------------------------------------


def test_report_recovers_the_planted_group_effects(dataset, study):
    from pipelines.group import KEY_COLUMNS, match_truth, recovery

    assert not study.failures and not study.problems, (study.failures, study.problems)
    truth = _truth(dataset)
    rec = recovery(study.group, truth)
    matched = match_truth(study.group, truth)
    planted = matched[matched["planted_sign"] != 0]
    missed = planted[~planted["recovered"]]
    assert rec.n_missing == 0
    assert rec.n_planted >= 30 and rec.n_null >= 20, rec
    # every planted effect significant at q = 0.05 with its sign ...
    assert rec.all_planted_recovered and rec.n_planted_wrong_sign == 0, \
        missed[[*KEY_COLUMNS, "planted_sign", "estimate", "q"]].to_string()
    # ... and the false discoveries among the planted nulls within what BH allows: it bounds their expected share
    # of the discoveries by alpha; one realisation may exceed that by its Poisson spread (2 sd)
    nulls = matched[matched["planted_sign"] == 0]
    expected = 0.05 * rec.n_significant
    assert rec.n_null_significant <= expected + 2 * expected ** 0.5, nulls[nulls["significant"]].to_string()
    # the headline effect of the design: the VLM's reasoning prompt adds unique variance in prefrontal, the LAM's not
    g = study.group
    row = g[(g.test == "one_sample") & (g.model == "vlm") & (g.measure == "unique_b") & (g.roi == "prefrontal")]
    assert bool(row["significant"].iloc[0]) and row["estimate"].iloc[0] > 0
    # the test can fail: the same table read against flipped signs recovers nothing planted
    flipped = truth.assign(planted_sign=(-pd.to_numeric(truth["planted_sign"])).astype(str))
    bad = recovery(study.group, flipped)
    assert bad.n_planted_recovered == 0 and bad.n_planted_wrong_sign == rec.n_planted

    # what the study wrote beside the report
    out = study.out
    for name in ("scores.tsv", "group.tsv", "summary.json", "report.html", "recovery.tsv", "study.json"):
        assert (out / name).is_file(), name
    assert {"roi_bars", "partition", "dim_curve", "contrasts"} <= set(study.report.figures)
    scores = pd.read_csv(out / "scores.tsv", sep="\t")
    assert scores["subject"].nunique() == SUBJECTS and set(scores["measure"]) == {"r", "r2", "unique_a", "unique_b",
                                                                                  "shared"}
    assert scores.groupby(["model", "condition", "layer", "dim", "roi", "measure"]).size().eq(SUBJECTS).all()
    group = pd.read_csv(out / "group.tsv", sep="\t", keep_default_na=False)
    assert list(group.columns[:8]) == list(KEY_COLUMNS)
    assert json.loads((out / "study.json").read_text())["recovery"]["n_planted"] == rec.n_planted
    # the main run reused the generator's extraction (same fingerprints) and fitted everything itself
    assert study.stages["extract"].cached == study.stages["extract"].tasks == SUBJECTS * 3 * 2
    assert study.stages["fit"].executed == study.stages["fit"].tasks == SUBJECTS * 2 * 2 * 2 * 3


# --- equal to doing it by hand -----------------------------------------------------------------------------


def test_scores_equal_extract_fit_and_group_statistics_by_hand(dataset, study, tmp_path):
    """Subject 01, the VLM's action features at PCA 8: `extract`'s job function on each recording, `fit`'s
    run_fit on two runs, the weights predicting the third, r per voxel, ROI means; then group_table."""
    import nibabel as nib

    from encoders.data import load_atlas, load_bold
    from encoders.fit import FitConfig, zscore_run
    from encoders.score import mean_r, pearson_r
    from encoders.weights import EncodingWeights
    from pipelines.batch import Job, run_job
    from pipelines.fit import FitRunConfig, SpaceFiles, run_fit
    from pipelines.group import Comparison, group_table
    from pipelines.study import _agent_spec

    cfg = load_study_config(dataset)
    root = dataset.parent
    events = sorted((root / "sub-01" / "func").glob("*_events.tsv"))
    bold = [next((root / "derivatives" / "fmriprep" / "sub-01" / "func").glob(
        e.name.replace("_events.tsv", "_space-*_desc-preproc_bold.nii.gz"))) for e in events]
    recordings = [root / pd.read_csv(e, sep="\t")["stim_file"].iloc[0] for e in events]
    vlm = next(a for a in cfg.agents if a.name == "vlm")
    space = "vlm_action_last_token_l2"
    feats = []
    for i, (rec, b) in enumerate(zip(recordings, bold)):
        res = run_job(Job(str(rec), f"run-{i}", _agent_spec(vlm), cfg.extract))
        n = nib.load(str(b)).shape[3]
        np.save(tmp_path / f"run{i}.npy", res.features[space][:n])
        feats.append(tmp_path / f"run{i}.npy")
    pred, ys = [], []
    for k in range(3):
        train = [i for i in range(3) if i != k]
        w = run_fit(FitRunConfig(out=tmp_path / f"w{k}.safetensors", bold=[bold[i] for i in train],
                                 spaces=[SpaceFiles(space, [feats[i] for i in train])], mask=cfg.mask, tr=1.0,
                                 fit=FitConfig(delays=[1, 2, 3, 4], pca=8, alphas=np.asarray(cfg.fit.alphas),
                                               score=False, progress=False, banded_iter=cfg.fit.banded_iter),
                                 reports=False, record_feature_files=False)).weights
        w = EncodingWeights.load(w)
        x = zscore_run(np.load(feats[k]))[0] * w.spaces[0].std + w.spaces[0].mean  # the held-out run on its own
        pred.append(w.predict([x]))
        ys.append(zscore_run(load_bold([bold[k]], cfg.mask, 1.0).runs[0])[0])
    r = pearson_r(np.concatenate(ys).astype(np.float64), np.concatenate(pred).astype(np.float64))
    ref = load_bold([bold[0]], cfg.mask, 1.0)
    labels, names = load_atlas(cfg.atlas, cfg.atlas_labels, ref.mask, ref.affine)
    by_hand = {names[k]: mean_r(r[labels == k])[0] for k in sorted(names)}
    s = study.scores
    mine = s[(s.subject == "01") & (s.model == "vlm") & (s.condition == "action") & (s.dim == 8) & (s.measure == "r")]
    # the same functions on the same bytes; BLAS may sum in another order than the study's one-thread tasks
    got = dict(zip(mine["roi"], mine["value"]))
    assert set(got) == set(by_hand) and all(abs(got[k] - by_hand[k]) < 1e-7 for k in got), (got, by_hand)

    # the statistics by hand on the study's own scores table
    comps = [Comparison(c.name, dict(c.a), dict(c.b)) for c in cfg.comparisons]
    scores = pd.read_csv(study.out / "scores.tsv", sep="\t", keep_default_na=False, dtype={"subject": str})
    again = group_table(scores, comps, alpha=cfg.stats.alpha, n_perm=cfg.stats.n_perm, seed=cfg.stats.seed)
    written = pd.read_csv(study.out / "group.tsv", sep="\t", keep_default_na=False)
    again.to_csv(tmp_path / "group.tsv", sep="\t", index=False, na_rep="n/a")
    assert (tmp_path / "group.tsv").read_bytes() == (study.out / "group.tsv").read_bytes()
    assert len(written) == len(again)


# --- SIGKILL and resume ------------------------------------------------------------------------------------


SMALL = """
[study]
title = "small"
bids = "{root}"
bold = "{root}/derivatives/fmriprep"
space = "MNI152NLin2009cAsym"
subjects = ["01", "02"]
runs = ["1", "2", "3"]
atlas = "{root}/derivatives/atlas/atlas.nii.gz"
atlas_labels = "{root}/derivatives/atlas/atlas_labels.tsv"
mask = "{root}/derivatives/atlas/mask.nii.gz"
{extra}

[extract]
stride = 15
tr = 1.0

[fit]
dims = [8]
banded_iter = 5

[[agents]]
name = "vlm"
kind = "vlm"
model = "{root}/derivatives/models/tiny-vlm"
conditions = ["action", "reasoning"]
layers = [2]
{agents}

[[partition]]
model = "vlm"
a = "action"
b = "reasoning"

[[comparisons]]
name = "reasoning-action"
a = {{ model = "vlm", condition = "reasoning" }}
b = {{ model = "vlm", condition = "action" }}
{comparisons}
[stats]
n_perm = 1000
"""


def _small(tmp: Path, root: Path, name: str = "small.toml", extra: str = "", agents: str = "",
           comparisons: str = "") -> Path:
    path = tmp / name
    path.write_text(SMALL.format(root=root, extra=extra, agents=agents, comparisons=comparisons))
    return path


def _outputs(out: Path) -> dict[str, bytes]:
    files = {"scores.tsv", "group.tsv", "report.html"}
    got = {f: (out / f).read_bytes() for f in files}
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("written")
    got["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    got["report.html"] = b"".join(line for line in got["report.html"].splitlines(True) if b"written" not in line)
    got |= {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "figures").glob("*.png"))}
    return got


def test_killed_study_resumes_without_redoing_finished_tasks(dataset, local_ray, tmp_path):
    toml = _small(tmp_path, dataset.parent)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "neuroarcade.cli", "study", str(toml), "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--sequential", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = ledger(out)
            if any(r["stage"] == "fit" for r in done):  # extraction finished, fits under way
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"study ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    first = ledger(out)
    assert {r["stage"] for r in first} >= {"extract", "fit"} and not (out / "group.tsv").exists()

    resumed = run_study(load_study_config(toml), out, cache=tmp_path / "cache", progress=False)  # on Ray
    assert not resumed.failures and not resumed.problems
    rows = ledger(out)
    keys = [(r["stage"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), "a finished task was executed again"
    total = sum(s.tasks for s in resumed.stages.values())
    assert len(rows) == total  # every task executed exactly once over the two sessions
    assert sum(s.cached for s in resumed.stages.values()) == len(first)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "temp files left behind"

    # the same outputs as an uninterrupted run (in this process, from a cache holding only the extraction, which
    # the killed session had finished: every fit, partition, score and the statistics computed afresh)
    shutil.copytree(tmp_path / "cache" / "extract", tmp_path / "ref-cache" / "extract")
    reference = run_study(load_study_config(toml), tmp_path / "ref", cache=tmp_path / "ref-cache", sequential=True,
                          progress=False)
    assert sum(s.executed for s in reference.stages.values()) == total - reference.stages["extract"].tasks
    assert _outputs(out) == _outputs(tmp_path / "ref")
    # and a third run has nothing left to do
    before = (out / LEDGER).read_bytes()
    again = run_study(load_study_config(toml), out, cache=tmp_path / "cache", progress=False)
    assert sum(s.executed for s in again.stages.values()) == 0 and (out / LEDGER).read_bytes() == before
    assert _outputs(out) == _outputs(tmp_path / "ref")


# --- bad input ---------------------------------------------------------------------------------------------


def _tamper(src: Path, dst: Path) -> None:
    """Rewrite one step's recorded frame hash, as a corrupted recording would have it (CRCs kept valid)."""
    import struct
    import zlib

    import msgspec

    from services.plumbing.recording import MAGIC, Step, iter_records

    raw = src.read_bytes()
    out = bytearray(MAGIC)
    pos, n_steps = len(MAGIC), 0
    enc = msgspec.msgpack.Encoder()
    for rec in iter_records(src):
        length, _ = struct.unpack_from("<II", raw, pos)
        payload = raw[pos + 8: pos + 8 + length]
        pos += 8 + length
        if isinstance(rec, Step):
            n_steps += 1
            if n_steps == 100:
                payload = enc.encode(msgspec.structs.replace(rec, frame_hash="0" * 16))
        out += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    dst.write_bytes(bytes(out))


def test_bad_inputs_are_named_and_the_rest_of_the_study_goes_on(dataset, local_ray, tmp_path):
    from typer.testing import CliRunner

    from neuroarcade.cli import app

    src = dataset.parent
    root = tmp_path / "bids"  # subjects 01–03 of the dataset, with faults
    for sub in ("01", "02", "03"):
        func = root / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        for ev in sorted((src / f"sub-{sub}" / "func").glob("*_events.tsv")):
            table = pd.read_csv(ev, sep="\t")
            rec = src / table["stim_file"].iloc[0]
            if sub == "03" and "_run-2_" in ev.name:
                rec = tmp_path / "tampered.narec"
                _tamper(src / table["stim_file"].iloc[0], rec)
            table["stim_file"] = str(rec)
            if not (sub == "02" and "_run-3_" in ev.name):  # subject 02 is missing run 3
                table.to_csv(func / ev.name, sep="\t", index=False)
    text = SMALL.format(root=src, extra='rois = ["visual", "hippocampus", "temporal"]\ncache = "{}"\n'
                        'on_failure = "retry"\nretries = 1'.format(src / "derivatives" / "neuroarcade" / "cache"),
                        agents='\n[[agents]]\nname = "gpt"\nkind = "gpt"\nmodel = "x"',
                        comparisons='\n[[comparisons]]\nname = "vs-unknown"\na = { model = "vlm" }\n'
                                    'b = { model = "clip" }\n')
    text = text.replace(f'bids = "{src}"', f'bids = "{root}"').replace('subjects = ["01", "02"]',
                                                                       'subjects = ["01", "02", "03"]')
    text = text.replace("[fit]\n", "[fit]\nmin_runs = 2\n")
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    res = CliRunner().invoke(app, ["study", str(toml), "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    # each fault named by its file or key
    assert f"{root / 'sub-02'}" in out and "sub-02 run-3: run missing" in out
    assert "tampered.narec" in out and "diverged" in out and "2 tries" in out
    assert f"{toml}: agents[1] (gpt).kind" in out and "unknown agent kind 'gpt'" in out
    assert f"{toml}: comparisons[1] (vs-unknown)" in out and "unknown agent 'clip'" in out
    assert f"{toml}: study.rois[1]" in out and "unknown ROI 'hippocampus'" in out
    # and the rest of the study went on: every subject scored on the runs it has, the good ROIs and comparison
    study_json = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [f["inputs"]["recording"] for f in study_json["failures"]] == [str(tmp_path / "tampered.narec")]
    scores = pd.read_csv(tmp_path / "out" / "scores.tsv", sep="\t", dtype={"subject": str})
    assert set(scores["subject"]) == {"01", "02", "03"} and set(scores["roi"]) == {"visual", "temporal"}
    group = pd.read_csv(tmp_path / "out" / "group.tsv", sep="\t", keep_default_na=False)
    assert set(group["contrast"]) == {"", "reasoning-action"}
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["stages"]["extract"]["failed"] == 1 and summary["stages"]["extract"]["executed"] == 0

    # a config that cannot be read stops before anything runs, naming the file and the key
    for bad, key in ((text.replace("[fit]\n", "[fit]\nlambda = 3\n"), "fit.lambda"),
                     (text.replace("dims = [8]", "dims = 8"), "fit.dims"),
                     (text.replace('kind = "gpt"\n', ""), "agents[1].kind"),
                     (text + "\n[extras]\n", "extras")):
        toml.write_text(bad)
        res = CliRunner().invoke(app, ["study", str(toml), "--out", str(tmp_path / "never")])
        assert res.exit_code == 2 and f"{toml}: {key}" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "never").exists()
