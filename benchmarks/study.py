"""`neuroarcade bench study`: a small study's wall time on local Ray vs the same tasks in one process.

A synthetic study (``pipelines.synth_study``, recorded and extracted once, outside the timing) is run twice from
empty caches, so every stage's tasks run in both: once on a local Ray instance (``num_cpus`` CPUs, one thread
per task; starting Ray is counted), once sequentially in this process with the same total threads (the fits'
BLAS gets ``num_cpus`` threads; extraction runs torch with one thread in both, as ``pipelines.batch.run_job``
always does). ``study_ratio`` = Ray wall / sequential wall (goal ≤ 1.1: Ray's bookkeeping and the cache cost
little next to the work; below 1 the two CPUs pay off). Both runs must give the same scores (checked).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def main(subjects: int = 3, runs: int = 3, trs: int = 24, num_cpus: int = 2, keep: str = "") -> dict:
    import numpy as np

    from pipelines.batch import init_ray
    from pipelines.study import load_study_config, run_study
    from pipelines.synth_study import SynthStudyConfig, make_synth_study

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-study-"))
    t0 = time.perf_counter()
    toml = make_synth_study(root / "data", SynthStudyConfig(subjects=subjects, runs=runs, trs=trs), sequential=True,
                            progress=False, say=lambda s: None)
    setup_s = time.perf_counter() - t0
    cfg = load_study_config(toml)

    t0 = time.perf_counter()
    seq = run_study(cfg, root / "seq", sequential=True, threads=num_cpus, progress=False, cache=root / "seq-cache",
                    report=False)
    seq_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_ray(None, num_cpus)
    ray_init_s = time.perf_counter() - t0
    par = run_study(cfg, root / "ray", num_cpus=num_cpus, progress=False, cache=root / "ray-cache", report=False)
    ray_s = time.perf_counter() - t0
    import ray

    ray.shutdown()

    a, b = seq.scores, par.scores
    same_cells = a[a.columns[:-1]].equals(b[b.columns[:-1]])
    max_diff = float(np.nanmax(np.abs(a["value"].to_numpy() - b["value"].to_numpy()))) if same_cells else float("nan")
    tasks = {k: v.tasks for k, v in par.stages.items()}
    print(f"{'stage':<10} {'tasks':>6} {'ray s':>8} {'sequential s':>13}")
    for k in par.stages:
        print(f"{k:<10} {tasks[k]:>6} {par.stages[k].seconds:>8.2f} {seq.stages[k].seconds:>13.2f}")
    print(f"{'total':<10} {sum(tasks.values()):>6} {ray_s:>8.2f} {seq_s:>13.2f}   (Ray start {ray_init_s:.1f} s)")
    result = {
        "bench": "study", "subjects": subjects, "runs": runs, "trs": trs, "num_cpus": num_cpus,
        "tasks": tasks, "ray_s": round(ray_s, 3), "sequential_s": round(seq_s, 3), "ray_init_s": round(ray_init_s, 3),
        "study_ratio": round(ray_s / seq_s, 4),
        "ray_stage_s": {k: round(v.seconds, 3) for k, v in par.stages.items()},
        "sequential_stage_s": {k: round(v.seconds, 3) for k, v in seq.stages.items()},
        "setup_s": round(setup_s, 2), "same_cells": bool(same_cells), "max_score_diff": max_diff,
        "failures": len(par.failures) + len(seq.failures),
    }
    print(json.dumps(result))
    return result
