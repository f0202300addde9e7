"""Preprocessing benchmark: the streaming core per volume vs one bare scipy reslice of the same volume.

A synthetic run (``encoders.phantom``: a smooth head with planted slow motion, drift and noise; volumes
made by scipy reslicing, ``exact=False``) goes through ``Preprocessor.push`` — rigid realignment, reslice,
causal GLM on volumes 0..t (constant, cosine drift, motion), running standardisation; no smoothing —
and, interleaved volume by volume, through one bare ``scipy.ndimage.affine_transform`` with the same
spline order: the floor, since a realigned volume needs at least one reslice. One BLAS thread. The
reference volume (mask, sample points) is left out of the figures. The GLM's cost grows with t, so p50
is about the middle of the run.

Two grids: a 64×64×36 EPI (3×3×3.5 mm) and a 97×115×97 whole-brain volume (MNI 2 mm).

Last line: one JSON object with ``preprocess_ratio`` (our p50 / floor p50 on the EPI grid, target ≤ 2.0),
absolute p50/p99 ms of both, per-stage p50 ms, the same for the large grid (``large_*``), and the
median realignment error against the planted motion.
"""

from __future__ import annotations

import json
import time

import numpy as np


def _parse(text: str, kind=float) -> tuple:
    return tuple(kind(v) for v in str(text).split(","))


def bench_grid(shape: tuple[int, int, int], voxel_mm: tuple[float, float, float], n_volumes: int, order: int,
               seed: int = 0) -> dict:
    """Per-volume timings of ours and of the floor on one grid."""
    from scipy.ndimage import affine_transform

    from encoders.motion import grid_center, rigid_matrix
    from encoders.phantom import PhantomConfig, phantom_run
    from encoders.preprocess import PreprocessConfig, Preprocessor

    ph = phantom_run(PhantomConfig(shape=shape, voxel_mm=voxel_mm, n_volumes=n_volumes, jerks=(), spikes=(),
                                   exact=False, seed=seed))
    pre = Preprocessor(PreprocessConfig(reslice_order=order), ph.affine)
    center = grid_center(shape, ph.affine)
    inv_affine = np.linalg.inv(ph.affine)
    ours, floor, stages, params = [], [], [], []
    for t, vol in enumerate(ph.volumes):
        t0 = time.perf_counter()
        out = pre.push(vol, t * ph.tr)
        t1 = time.perf_counter()
        m = inv_affine @ rigid_matrix(ph.motion[t], center) @ ph.affine  # the same kind of map, from the truth
        affine_transform(vol, m[:3, :3], offset=m[:3, 3], order=order, mode="nearest", output=np.float32)
        t2 = time.perf_counter()
        params.append(out.params)
        if t >= 1:
            ours.append(1e3 * (t1 - t0))
            floor.append(1e3 * (t2 - t1))
            stages.append(out.timings)
    err = np.abs(np.asarray(params) - ph.motion)
    stage_p50 = {k: round(float(np.median([getattr(s, k) for s in stages])), 3)
                 for k in ("realign_ms", "reslice_ms", "mask_ms", "glm_ms", "standardize_ms")}
    return {"ours_p50_ms": float(np.percentile(ours, 50)), "ours_p99_ms": float(np.percentile(ours, 99)),
            "bare_p50_ms": float(np.percentile(floor, 50)), "bare_p99_ms": float(np.percentile(floor, 99)),
            "stage_p50_ms": stage_p50, "voxels_in_mask": int(pre.mask.sum()), "volumes": n_volumes,
            "not_converged": pre.counts.not_converged,
            "motion_err_mm": float(np.median(err[:, :3])), "motion_err_deg": float(np.rad2deg(np.median(err[:, 3:])))}


def main(volumes: int = 200, shape: str = "64,64,36", voxel_mm: str = "3,3,3.5", large_volumes: int = 60,
         large_shape: str = "97,115,97", large_voxel_mm: str = "2,2,2", order: int = 1) -> dict:
    from rich.console import Console
    from rich.table import Table
    from threadpoolctl import threadpool_limits

    grids = [("", _parse(shape, int), _parse(voxel_mm), volumes)]
    if large_volumes > 0:
        grids.append(("large_", _parse(large_shape, int), _parse(large_voxel_mm), large_volumes))
    out: dict = {"bench": "preprocess"}
    table = Table(title="bench preprocess: ms per volume, 1 thread")
    for col in ("grid", "vols", "voxels", "ours p50", "p99", "bare p50", "p99", "ratio"):
        table.add_column(col)
    stages = Table(title="stages p50 (ms) and realignment error vs planted")
    for col in ("grid", "realign", "reslice", "mask", "glm", "std", "err mm", "err °"):
        stages.add_column(col)
    with threadpool_limits(limits=1):
        for prefix, shp, vox, n in grids:
            r = bench_grid(shp, vox, n, order)
            ratio = r["ours_p50_ms"] / r["bare_p50_ms"]
            out |= {f"{prefix}preprocess_ratio": round(ratio, 4),
                    f"{prefix}ratio_p99": round(r["ours_p99_ms"] / r["bare_p99_ms"], 4),
                    **{f"{prefix}{k}": (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()},
                    f"{prefix}shape": list(shp), f"{prefix}voxel_mm": list(vox)}
            grid = "x".join(map(str, shp))
            table.add_row(grid, str(n), str(r["voxels_in_mask"]), f"{r['ours_p50_ms']:.1f}",
                          f"{r['ours_p99_ms']:.1f}", f"{r['bare_p50_ms']:.1f}", f"{r['bare_p99_ms']:.1f}",
                          f"{ratio:.2f}")
            stages.add_row(grid, *(f"{v:.1f}" for v in r["stage_p50_ms"].values()), f"{r['motion_err_mm']:.3f}",
                           f"{r['motion_err_deg']:.3f}")
    out |= {"reslice_order": order, "threads": 1}
    console = Console()
    console.print(table)
    console.print(stages)
    print(json.dumps(out))
    return out
