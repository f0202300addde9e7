"""Alignment of a session to the space the encoding weights were fit in (issue #13).

Once per session, the session's motion reference (its first usable volume) is registered to the weights'
reference volume (the mean EPI of the fit's runs, ``EncodingWeights.reference``, on the weights' grid and
affine): rigid, 6 parameters, least squares on intensity with a global scale and offset (same modality: EPI
to EPI), by :func:`encoders.motion.realign` sampling the session volume on its own grid. The start is the
shift between the two heads' centres of mass, then coarse to fine (both volumes smoothed, then not), so an
offset of several mm / degrees converges.

Every volume then goes into the weights' space with ONE reslice: the weights' voxel i is sampled in the
volume at A_s⁻¹ · M_t · T · A_w · i, where A_w, A_s are the weights' and the session's voxel → world
affines, T (:attr:`SessionAlignment.matrix`) maps weights world → session-reference world and M_t the
session reference's world → volume t's world (its motion parameters, :func:`encoders.motion.rigid_matrix`).

Conventions as :mod:`encoders.motion`: world mm of the affines; S(T(x)) = W(x) for x in the head, with
S the session reference and W the weights' reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.motion import grid_center, prepare_reference, realign, rigid_matrix

COARSE_TO_FINE_FWHM_MM = (8.0, 4.0, 0.0)
"""Smoothing of both volumes at each level of the registration, FWHM mm (0 = as they are)."""


@dataclass(frozen=True)
class TargetSpace:
    """The space every session volume is resliced into: the weights' grid."""

    reference: np.ndarray
    """(X, Y, Z) float32 reference volume of that space (the fit's mean EPI or boldref)."""
    affine: np.ndarray
    """(4, 4) voxel → world mm of the grid."""
    mask: np.ndarray | None = None
    """(X, Y, Z) bool voxels of the weights (the output voxels); None = the whole grid."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the grid."""
        return tuple(int(n) for n in np.shape(self.reference))  # type: ignore[return-value]


@dataclass
class SessionAlignment:
    """The session reference registered to the weights' reference (once per session)."""

    matrix: np.ndarray
    """(4, 4) world → world map T from the weights' space to the session reference's: S(T(x)) = W(x). The
    identity when the registration failed (the session is then flagged, its volumes excluded)."""
    params: np.ndarray
    """(6,) the same map as trans_x/y/z mm and rot_x/y/z radians about the weights' grid centre
    (:func:`encoders.motion.rigid_matrix` conventions)."""
    converged: bool
    """The finest level converged and the aligned session reference matches the weights' one."""
    match_r: float
    """Correlation of the aligned session reference with the weights' reference at the sample points."""
    iterations: int
    """Gauss–Newton iterations over all levels."""
    reason: str = ""
    """Why it failed ("" when it converged)."""
    start_shift_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """(3,) the centre-of-mass shift (session − weights) the iteration started from, mm."""
    seconds: float = 0.0
    """Wall time of the registration."""
    overlay: str = ""
    """Path of the overlay PNG (weights' reference with the aligned session reference's edges), once written."""

    @property
    def translation_mm(self) -> float:
        """Length of the translation part of :attr:`params`, mm."""
        return float(np.linalg.norm(self.params[:3]))

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation part, degrees."""
        return rotation_angle_deg(self.matrix[:3, :3])

    def to_dict(self) -> dict:
        """JSON-ready: params in mm and degrees, the matrix row-major, the outcome."""
        return {"converged": bool(self.converged), "reason": self.reason, "match_r": _num(self.match_r),
                "iterations": int(self.iterations), "seconds": round(float(self.seconds), 4),
                "trans_mm": [round(float(v), 4) for v in self.params[:3]],
                "rot_deg": [round(float(np.rad2deg(v)), 4) for v in self.params[3:]],
                "translation_mm": round(self.translation_mm, 4), "rotation_deg": round(self.rotation_deg, 4),
                "start_shift_mm": [round(float(v), 3) for v in self.start_shift_mm],
                "matrix": [float(v) for v in np.asarray(self.matrix).ravel()], "overlay": self.overlay}


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def rotation_angle_deg(r: np.ndarray) -> float:
    """Angle (degrees) of the rotation ``r`` (3, 3)."""
    return float(np.rad2deg(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def matrix_params(matrix: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(6,) trans mm, rot radians of a rigid world map ``matrix`` (4, 4) about ``center`` (3,): the inverse
    of :func:`encoders.motion.rigid_matrix`."""
    from scipy.spatial.transform import Rotation

    r = np.asarray(matrix, float)[:3, :3]
    t = matrix[:3, :3] @ center + matrix[:3, 3] - center
    return np.concatenate([t, Rotation.from_matrix(r).as_euler("XYZ")])


def center_of_mass(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World mm (3,) of the intensity centre of the head of ``volume`` (X, Y, Z): voxels above the mean,
    weighted by intensity (the background's noise does not pull it)."""
    v = np.asarray(volume, np.float64)
    w = np.where(v > v.mean(), v, 0.0)
    total = w.sum()
    if not total > 0:
        return grid_center(v.shape, affine)
    ijk = np.array([(w.sum(axis=tuple(a for a in range(3) if a != k)) * np.arange(v.shape[k])).sum()
                    for k in range(3)]) / total
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _smooth(volume: np.ndarray, affine: np.ndarray, fwhm_mm: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if fwhm_mm <= 0:
        return np.asarray(volume, np.float32)
    vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    return gaussian_filter(np.asarray(volume, np.float32), fwhm_mm / np.sqrt(8 * np.log(2)) / vox, output=np.float32)


def register_to_target(session_ref: np.ndarray, session_affine: np.ndarray, target: TargetSpace, *,
                       levels: tuple[float, ...] = COARSE_TO_FINE_FWHM_MM, n_samples: int = 20000,
                       max_iter: int = 40, tol_mm: float = 0.005, min_match_r: float = 0.8) -> SessionAlignment:
    """Register ``session_ref`` (X', Y', Z') on its grid ``session_affine`` (4, 4) to ``target``'s reference.

    Never raises for a registration that fails (unusable volume, divergence, no convergence, poor match):
    the result says so (``converged=False``, ``reason``) with the identity as its matrix, and the caller
    flags the session (``encoders.preprocess.MotionCorrector`` excludes its volumes, counted as ``unaligned``).
    """
    t0 = time.perf_counter()
    a_s = np.asarray(session_affine, float)
    a_w = np.asarray(target.affine, float)

    def failed(reason: str, iterations: int = 0, match_r: float = float("nan"),
               shift: np.ndarray | None = None) -> SessionAlignment:
        return SessionAlignment(np.eye(4), np.zeros(6), False, match_r, iterations, reason,
                                np.zeros(3) if shift is None else shift, time.perf_counter() - t0)

    s = np.asarray(session_ref, np.float32)
    w = np.asarray(target.reference, np.float32)
    for name, v, a in (("session reference", s, a_s), ("weights' reference", w, a_w)):
        if v.ndim != 3:
            return failed(f"{name} is not a 3-D volume (shape {v.shape})")
        if not np.isfinite(v).all():
            return failed(f"{name} has non-finite values")
        if a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-9:
            return failed(f"{name}'s affine is not an invertible 4×4 matrix")
        if not v.max() > v.min():
            return failed(f"{name} is blank (no contrast to register on)")
    shift = center_of_mass(s, a_s) - center_of_mass(w, a_w)
    pre = np.eye(4)
    pre[:3, 3] = shift  # the session moved by the centres' difference: realign's limits apply to the rest
    moving_affine = np.linalg.inv(pre) @ a_s  # the session grid seen shifted back onto the weights' head
    center = grid_center(w.shape, a_w)
    p, iterations, fit = np.zeros(6), 0, None
    for k, fwhm in enumerate(levels):
        last = k == len(levels) - 1
        try:
            ref = prepare_reference(_smooth(w, a_w, fwhm), a_w, None, n_samples=n_samples)
        except ValueError as e:
            return failed(f"weights' reference: {e}", iterations, shift=shift)
        fit = realign(_smooth(s, a_s, fwhm), ref, a_w, init=p, max_iter=max_iter, tol_mm=tol_mm if last else 0.05,
                      min_match_r=min_match_r if last else 0.0, moving_affine=moving_affine)
        iterations += fit.iterations
        if fit.reason == "diverged" or not np.isfinite(fit.params).all():
            return failed(f"diverged at the {fwhm:g} mm level", iterations, fit.match_r, shift)
        p = fit.params
    assert fit is not None
    if not fit.converged:
        return failed(fit.reason, iterations, fit.match_r, shift)
    matrix = pre @ rigid_matrix(p, center)
    return SessionAlignment(matrix, matrix_params(matrix, center), True, fit.match_r, iterations, "", shift,
                            time.perf_counter() - t0)


def voxel_map(session_affine: np.ndarray, target_affine: np.ndarray, world_map: np.ndarray,
              motion: np.ndarray | None = None, motion_center: np.ndarray | None = None) -> np.ndarray:
    """(4, 4) target voxel → session-volume voxel: A_s⁻¹ · M(motion) · T · A_w, with M the rigid map of
    ``motion`` (6,) about ``motion_center`` (3,) world mm (the session grid's centre), identity when None."""
    m = np.asarray(world_map, float)
    if motion is not None:
        m = rigid_matrix(motion, motion_center) @ m
    return np.linalg.inv(session_affine) @ m @ np.asarray(target_affine, float)


def reslice_to(volume: np.ndarray, session_affine: np.ndarray, target_affine: np.ndarray,
               target_shape: tuple[int, int, int], world_map: np.ndarray, motion: np.ndarray | None = None, *,
               order: int = 1, output: np.ndarray | None = None) -> np.ndarray:
    """``volume`` (X', Y', Z') of the session, motion-corrected by ``motion`` (6,) (about its grid centre)
    and moved by ``world_map`` (4, 4) into the target grid: (X, Y, Z) float32 of ``target_shape``, ONE
    interpolation. Edges extend outward (mode "nearest"), as :func:`encoders.motion.reslice`."""
    from scipy.ndimage import affine_transform

    vol = np.asarray(volume, np.float32)
    m = voxel_map(session_affine, target_affine, world_map, motion,
                  None if motion is None else grid_center(vol.shape, session_affine))
    return affine_transform(vol, m[:3, :3], offset=m[:3, 3], output_shape=tuple(target_shape), order=order,
                            mode="nearest", output=np.float32 if output is None else output)


def alignment_error(estimated: np.ndarray, truth: np.ndarray, center: np.ndarray) -> tuple[float, float]:
    """(mm, degrees): how far apart two rigid world maps (4, 4) are: the displacement of ``center`` (3,)
    and the angle of the rotation between them."""
    d = np.asarray(estimated, float) @ np.linalg.inv(np.asarray(truth, float))
    c = np.append(center, 1.0)
    return float(np.linalg.norm(d @ c - c)), rotation_angle_deg(d[:3, :3])


def write_overlay(path: str | Path, target: TargetSpace, session_ref: np.ndarray, session_affine: np.ndarray,
                  alignment: SessionAlignment, *, title: str = "") -> Path:
    """A PNG a person can check the alignment on: the weights' reference in grey, the session reference
    brought into the weights' space by ``alignment`` as red edges (its head's outline and inner contrast),
    three orthogonal planes through the grid centre plus two more axial slices. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = np.asarray(target.reference, np.float32)
    moved = reslice_to(session_ref, session_affine, target.affine, target.shape, alignment.matrix)
    head = moved[moved > moved.mean()]
    levels = sorted({float(np.percentile(head, q)) for q in (5, 60)}) if head.size else [float(moved.mean())]
    nx, ny, nz = w.shape
    planes = [("sagittal", lambda v: v[nx // 2, :, :]), ("coronal", lambda v: v[:, ny // 2, :]),
              ("axial", lambda v: v[:, :, nz // 2]), ("axial", lambda v: v[:, :, nz // 3]),
              ("axial", lambda v: v[:, :, (2 * nz) // 3])]
    vox = np.sqrt((np.asarray(target.affine)[:3, :3] ** 2).sum(0))
    aspects = [vox[2] / vox[1], vox[2] / vox[0], vox[1] / vox[0], vox[1] / vox[0], vox[1] / vox[0]]
    fig, axes = plt.subplots(1, len(planes), figsize=(3.0 * len(planes), 3.3))
    lo, hi = np.percentile(w, [1, 99.5])
    for ax, (name, cut), aspect in zip(axes, planes, aspects):
        ax.imshow(cut(w).T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        sl = cut(moved).T
        if sl.max() > min(levels):
            ax.contour(sl, levels=levels, colors=["#ff3030", "#ffb000"][: len(levels)], linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    state = (f"aligned: {alignment.translation_mm:.2f} mm, {alignment.rotation_deg:.2f}°, match r "
             f"{alignment.match_r:.3f}" if alignment.converged else f"NOT aligned: {alignment.reason}")
    fig.suptitle((title + " — " if title else "") + "weights' reference (grey), session reference in the weights' "
                 f"space (contours); {state}", fontsize=9)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    alignment.overlay = str(path)
    return path
