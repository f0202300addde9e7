"""A synthetic EPI run with a known answer for the preprocessing tests and benchmark: a smooth "brain"
(an ellipsoidal head with a soft edge and Gaussian blobs inside), planted rigid motion (slow ramps up to
a few mm / degrees and abrupt jerks), multiplicative scanner drift (linear + quadratic), Rician-like noise
and slab spikes.

With ``exact=True`` each volume is the analytic brain evaluated at T_p⁻¹(x) (no interpolation), and the
rotation comes from scipy's ``Rotation``, not from :mod:`encoders.motion`, so recovering the planted
parameters checks realignment against an independent truth. ``exact=False`` reslices one analytic volume
with ``scipy.ndimage.affine_transform`` instead (fast, for benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhantomConfig:
    """Grid, motion, drift, noise and artefacts of a synthetic run."""

    shape: tuple[int, int, int] = (64, 64, 36)
    """Voxel grid (X, Y, Z)."""
    voxel_mm: tuple[float, float, float] = (3.0, 3.0, 3.5)
    """Voxel size, mm (anisotropic like most EPI)."""
    center_mm: tuple[float, float, float] = (4.0, -10.0, 12.0)
    """World position of the grid centre: off the origin, so the pivot must come from the affine."""
    n_volumes: int = 40
    """Volumes in the run."""
    tr: float = 2.0
    """Repetition time, s."""
    ramp_mm: float = 1.5
    """Largest slow translation (each axis gets a random share of it, either sign), mm."""
    ramp_deg: float = 1.5
    """Largest slow rotation, degrees."""
    jerks: tuple[int, ...] = (12, 27)
    """Volumes at which the head jumps (and stays): an FD spike."""
    jerk_mm: float = 1.5
    """Translation of a jerk (one axis), mm."""
    jerk_deg: float = 1.5
    """Rotation of a jerk (one axis), degrees."""
    drift: float = 0.05
    """Multiplicative drift at the end of the run (0.6 linear + 0.4 quadratic shares)."""
    noise: float = 0.01
    """Gaussian noise σ as a fraction of the head's baseline intensity."""
    spikes: tuple[int, ...] = (20,)
    """Volumes with a slab artefact (a DVARS spike)."""
    spike: float = 0.4
    """Relative intensity change of the spiked slab (3 slices)."""
    exact: bool = True
    """Analytic volumes at the moved coordinates (True) or one volume resliced by scipy (False)."""
    seed: int = 0
    """Random seed (brain texture, motion directions, noise)."""


@dataclass
class Phantom:
    """A synthetic run and its truth."""

    volumes: np.ndarray
    """(T, X, Y, Z) float32."""
    affine: np.ndarray
    """(4, 4) voxel → world mm."""
    tr: float
    """Repetition time, s."""
    motion: np.ndarray
    """(T, 6) planted trans_x/y/z mm, rot_x/y/z radians (:mod:`encoders.motion` conventions); row 0 is 0."""
    drift: np.ndarray
    """(T,) planted multiplicative drift (volume t is the brain × (1 + drift[t]))."""
    brain: np.ndarray
    """(X, Y, Z) float32 the noiseless, unmoved brain (volume 0 without noise)."""
    head: np.ndarray
    """(X, Y, Z) bool voxels inside the unmoved head."""

    def to_nifti(self):
        """The run as a 4-D ``nibabel.Nifti1Image`` with the TR in the header."""
        import nibabel as nib

        img = nib.Nifti1Image(np.moveaxis(self.volumes, 0, -1), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = self.tr
        return img


class _Brain:
    """The analytic brain in head coordinates (mm from the grid centre)."""

    def __init__(self, semi_axes: np.ndarray, rng: np.random.Generator, n_blobs: int = 16):
        self.semi = semi_axes
        u = rng.normal(size=(n_blobs, 3))
        u *= (rng.uniform(0, 0.75, n_blobs) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
        self.mu = u * semi_axes
        self.sigma = rng.uniform(5, 12, n_blobs) * semi_axes.min() / 55
        self.amp = rng.uniform(-250, 350, n_blobs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Intensity (N,) at ``x`` (N, 3) mm from the centre; baseline 600 inside, 0 outside."""
        rho = np.sqrt(((x / self.semi) ** 2).sum(1))
        out = np.zeros(len(x))
        near = rho < 1.3  # the edge is below 0.4 (noise σ 6) beyond: only the head's neighbourhood counts
        xn = x[near].astype(np.float32)
        mu = self.mu.astype(np.float32)
        d2 = (xn * xn).sum(1)[:, None] - 2 * xn @ mu.T + (mu * mu).sum(1)
        inner = np.exp(d2 * np.float32(-0.5) / (self.sigma**2).astype(np.float32)) @ self.amp.astype(np.float32)
        out[near] = 0.5 * (1 - np.tanh((rho[near] - 1) / 0.08)) * (600 + inner)  # soft edge ≈ 4 mm wide
        return out


def planted_motion(cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """(T, 6) motion: smooth ramps (half a cosine over the run) plus persistent jumps at ``cfg.jerks``."""
    n = cfg.n_volumes
    ramp = (1 - np.cos(np.pi * np.arange(n) / max(n - 1, 1))) / 2
    amp = np.concatenate([rng.uniform(-1, 1, 3) * cfg.ramp_mm, np.deg2rad(rng.uniform(-1, 1, 3) * cfg.ramp_deg)])
    motion = ramp[:, None] * amp
    for j in cfg.jerks:
        if 0 < j < n:
            motion[j:, rng.integers(0, 3)] += cfg.jerk_mm * rng.choice([-1, 1])
            motion[j:, 3 + rng.integers(0, 3)] += np.deg2rad(cfg.jerk_deg) * rng.choice([-1, 1])
    return motion


def phantom_run(cfg: PhantomConfig = PhantomConfig()) -> Phantom:
    """The synthetic run of ``cfg`` with its planted truth."""
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(cfg.seed)
    shape = tuple(cfg.shape)
    affine = np.diag([*cfg.voxel_mm, 1.0])
    affine[:3, 3] = np.asarray(cfg.center_mm) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    fov = np.asarray(shape) * np.asarray(cfg.voxel_mm)
    brain = _Brain(semi_axes=fov * np.array([0.34, 0.41, 0.40]), rng=rng)
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    offsets = ijk @ affine[:3, :3].T + affine[:3, 3] - np.asarray(cfg.center_mm)  # from the pivot
    static = brain(offsets).reshape(shape).astype(np.float32)
    motion = planted_motion(cfg, rng)
    u = np.arange(cfg.n_volumes) / max(cfg.n_volumes - 1, 1)
    drift = cfg.drift * (0.6 * u + 0.4 * u**2)
    vols = np.empty((cfg.n_volumes, *shape), np.float32)
    vox = np.linalg.inv(affine)
    for t, p in enumerate(motion):
        rot = Rotation.from_euler("XYZ", p[3:]).as_matrix()
        if cfg.exact:  # volume(y) = brain(T⁻¹ y), T⁻¹(y) = Rᵀ(y − c − t) + c
            moved = brain((offsets - p[:3]) @ rot).reshape(shape)
        else:  # the same map through scipy: output voxel → world → T⁻¹ → input voxel
            inv = np.eye(4)
            inv[:3, :3] = rot.T
            c = np.asarray(cfg.center_mm)
            inv[:3, 3] = c - rot.T @ (c + p[:3])
            m = vox @ inv @ affine
            moved = affine_transform(static, m[:3, :3], offset=m[:3, 3], order=1, mode="nearest")
        noisy = moved * (1 + drift[t]) + rng.normal(0, cfg.noise * 600, shape)
        vols[t] = np.abs(noisy)  # magnitude images: the background is Rician-like, never negative
    z = shape[2] // 3
    for s in cfg.spikes:
        if 0 <= s < cfg.n_volumes:
            vols[s, :, :, z:z + 3] *= 1 + cfg.spike
    head = static > 300
    return Phantom(volumes=vols, affine=affine, tr=cfg.tr, motion=motion, drift=drift, brain=static, head=head)
