"""Scanner-room faults for synthetic BOLD (issue #13): head motion (slow drift plus sudden jerks, as rigid
transforms of the volume, known per TR), scanner drift (linear + quadratic), physiological noise and spikes.

One home for the fault model: the simulated scanner (``services.scanner``), ``neuroarcade synth`` and
``synth-participant`` (``encoders.synth.write_bids``) and the known-answer tests all draw their faults here.

* :class:`FaultConfig` says what to add (all off by default); ``FaultConfig.parse`` reads the CLI's
  ``--faults`` text (a preset and/or ``key=value`` pairs).
* :func:`fault_schedule` draws everything per TR from the seed (pure): the rigid parameters, the drift
  gain, the physiological time courses and spatial maps, the spiked TRs and slabs.
* :func:`apply_faults` puts one TR's faults on one volume (pure); :func:`apply_run` on a whole run.
* :func:`write_motion_tsv` writes the true motion with fMRIPrep's column names and units.

Motion uses :mod:`encoders.motion`'s convention exactly (``params`` = trans_x/y/z mm, rot_x/y/z rad about
the grid centre, T_p(x) = R (x − c) + c + t): the moved volume is V_t(y) = V(T_p⁻¹(y)), so the parameters a
realignment recovers for volume t (volume(T_p(x)) = reference(x)) are the planted ones, directly comparable.
Order of the faults within a TR (as in a scanner): physiological fluctuation in the tissue, then the head
moves, then the scanner's gain drifts, then a spike corrupts a slab of the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.motion import PARAM_NAMES, framewise_displacement, grid_center, rigid_matrix

CARDIAC_HZ = 1.1
"""Heart rate of the simulated participant (aliased at a TR of seconds, as in real data)."""
RESPIRATION_HZ = 0.28
"""Breathing rate of the simulated participant."""
_WANDER = 0.2  # the slow drift's wander around its ramp, as a share of motion_mm / motion_deg

PRESETS: dict[str, dict[str, float | int]] = {
    "none": {},
    # what the known-answer test plants: up to 3 mm / 3° (max_mm / max_deg), two jerks, 3 % drift, two spikes
    "realistic": {"motion_mm": 1.5, "motion_deg": 1.5, "jerks": 2, "jerk_mm": 1.5, "jerk_deg": 1.5,
                  "drift_linear": 0.02, "drift_quadratic": 0.01, "physio": 0.003, "spikes": 2},
}
"""Named fault sets for ``--faults`` (combine with ``key=value`` overrides: ``realistic,spikes=0``)."""


class FaultError(ValueError):
    """A fault setting that cannot be used (the message names it)."""


@dataclass(frozen=True)
class FaultConfig:
    """Faults added to a synthetic run; all off by default. Invalid values raise :class:`FaultError`."""

    motion_mm: float = 0.0
    """Largest slow head drift per translation axis, mm (each axis a random share of it, either sign; a
    half-cosine ramp over the run plus a slow wander). 0 = the head stays still apart from jerks."""
    motion_deg: float = 0.0
    """Largest slow head drift per rotation axis, degrees."""
    jerks: int = 0
    """Sudden head movements at random TRs (the head jumps between two volumes and stays): an FD spike each."""
    jerk_mm: float = 1.0
    """Translation of one jerk along one random axis, mm."""
    jerk_deg: float = 1.0
    """Rotation of one jerk about one random axis, degrees."""
    max_mm: float = 3.0
    """Largest displacement from volume 0 along any translation axis, mm: the motion (drift + jerks) is
    clipped there, so a jerk that would go further stops at it."""
    max_deg: float = 3.0
    """Largest rotation from volume 0 about any axis, degrees (clipped likewise)."""
    drift_linear: float = 0.0
    """Scanner drift: relative change of the image gain by the end of the run, linear share (0.02 = +2 %)."""
    drift_quadratic: float = 0.0
    """Scanner drift: quadratic share of the gain change by the end of the run."""
    physio: float = 0.0
    """Physiological noise: SD of the cardiac and respiratory fluctuations (aliased at the TR), each with its
    own smooth spatial map, as a fraction of the local intensity."""
    spikes: int = 0
    """Volumes hit by a spike (a slab of slices brightened): a DVARS outlier each, at random TRs."""
    spike_size: float = 0.3
    """Relative intensity change of a spiked slab."""
    spike_slices: int = 2
    """Slices (along the third axis) of a spiked slab."""
    interp_order: int = 3
    """Spline order of the rigid transform of each volume (3 = cubic: closer to a continuous head than the
    trilinear realignment that undoes it, so the recovery is not flattered)."""
    seed: int = 0
    """Seed of everything random here (schedule and maps); runs of a session get ``seed + run``."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise FaultError(f"fault setting {f.name} must be an integer, got {v!r}")
                object.__setattr__(self, f.name, int(v))
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                    raise FaultError(f"fault setting {f.name} must be a finite number, got {v!r}")
                object.__setattr__(self, f.name, float(v))
        for name in ("motion_mm", "motion_deg", "jerks", "jerk_mm", "jerk_deg", "max_mm", "max_deg", "physio",
                     "spikes", "seed"):
            if getattr(self, name) < 0:
                raise FaultError(f"fault setting {name} must be ≥ 0, got {getattr(self, name)!r}")
        if self.spike_slices < 1:
            raise FaultError(f"fault setting spike_slices must be ≥ 1, got {self.spike_slices}")
        if not 0 <= self.interp_order <= 5:
            raise FaultError(f"fault setting interp_order must be a spline order 0…5, got {self.interp_order}")
        if self.max_deg > 20:
            raise FaultError(f"fault setting max_deg must be ≤ 20 (a head in a coil), got {self.max_deg:g}")
        if 1 + min(self.drift_linear, 0) + min(self.drift_quadratic, 0) <= 0 or self.spike_size <= -1:
            raise FaultError("fault settings drift_* / spike_size would make intensities negative")

    @property
    def active(self) -> bool:
        """Any fault on."""
        return any((self.motion_mm, self.motion_deg, self.jerks, self.drift_linear, self.drift_quadratic,
                    self.physio, self.spikes))

    def replace(self, **changes) -> FaultConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, text: str | None) -> FaultConfig:
        """``--faults`` text: presets (:data:`PRESETS`) and ``key=value`` pairs, comma-separated, applied left
        to right: ``realistic``, ``motion_mm=2,jerks=1``, ``realistic,spikes=0,seed=3``. None or "" = none."""
        values: dict[str, float | int] = {}
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in (s.strip() for s in (text or "").split(",")):
            if not item:
                continue
            if "=" not in item:
                if item not in PRESETS:
                    raise FaultError(f"--faults {item}: unknown preset; choose {', '.join(PRESETS)} or give "
                                     f"key=value with keys {', '.join(known)}")
                values.update(PRESETS[item])
                continue
            key, _, raw = (s.strip() for s in item.partition("="))
            if key not in known:
                raise FaultError(f"--faults {key}: unknown fault setting; known: {', '.join(known)}")
            try:
                values[key] = int(raw) if known[key] == "int" else float(raw)
            except ValueError:
                raise FaultError(f"--faults {key}={raw}: not {'an integer' if known[key] == 'int' else 'a number'}"
                                 ) from None
        return cls(**values)


@dataclass
class FaultSchedule:
    """Everything :func:`apply_faults` adds to each TR of one run (drawn by :func:`fault_schedule`)."""

    config: FaultConfig
    motion: np.ndarray
    """(T, 6) true trans_x/y/z mm, rot_x/y/z rad of each volume relative to volume 0 (row 0 = 0)."""
    gain: np.ndarray
    """(T,) scanner gain: volume t is multiplied by it (1 at volume 0)."""
    physio: np.ndarray
    """(T, 2) cardiac and respiratory fluctuation per TR, fraction of the local intensity per unit map."""
    physio_maps: np.ndarray | None
    """(2, X, Y, Z) float32 smooth spatial maps of the two fluctuations (RMS 1; None without physio)."""
    jerks: tuple[int, ...]
    """TRs at which the head jumped (sorted)."""
    spikes: tuple[tuple[int, int], ...]
    """(TR, first slice of the slab) of each spike (sorted)."""

    @property
    def fd(self) -> np.ndarray:
        """(T,) true framewise displacement, mm (Power 2012; 0 at volume 0)."""
        return framewise_displacement(self.motion)

    def without_motion(self) -> FaultSchedule:
        """The same schedule with the head held still (drift, physiology and spikes kept)."""
        return dataclasses.replace(self, motion=np.zeros_like(self.motion), jerks=())


def planted_head_motion(cfg: FaultConfig, n_volumes: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """(T, 6) motion relative to volume 0 — a slow drift (half-cosine ramp to a random share of
    ``motion_mm``/``motion_deg`` per axis, plus a slow wander of a fifth of it) and ``jerks`` persistent
    jumps, clipped at ``max_mm``/``max_deg`` per axis — and the jerk TRs."""
    n = n_volumes
    u = np.arange(n) / max(n - 1, 1)
    limit = np.array([cfg.motion_mm] * 3 + [np.deg2rad(cfg.motion_deg)] * 3)
    ramp = (1 - np.cos(np.pi * u))[:, None] / 2 * rng.uniform(-1, 1, 6)
    phase, freq = rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.7, 1.5, 6)
    wander = _WANDER * (np.sin(2 * np.pi * freq * u[:, None] + phase) - np.sin(phase))
    motion = np.clip(ramp + wander, -1, 1) * limit
    jerks: tuple[int, ...] = ()
    if cfg.jerks and n > 2:
        # away from the start (the GLM's warm-up)
        lo = min(max(1, n // 5), n - 1)
        candidates = np.arange(lo, n)
        jerks = tuple(sorted(int(j) for j in rng.choice(candidates, size=min(cfg.jerks, len(candidates)),
                                                        replace=False)))
        for j in jerks:
            motion[j:, rng.integers(0, 3)] += cfg.jerk_mm * rng.choice([-1.0, 1.0])
            motion[j:, 3 + rng.integers(0, 3)] += np.deg2rad(cfg.jerk_deg) * rng.choice([-1.0, 1.0])
    cap = np.array([cfg.max_mm] * 3 + [np.deg2rad(cfg.max_deg)] * 3)
    return np.clip(motion - motion[0], -cap, cap), jerks


def fault_schedule(cfg: FaultConfig, n_volumes: int, tr: float, shape: tuple[int, int, int]) -> FaultSchedule:
    """The faults of a run of ``n_volumes`` volumes of ``shape`` (X, Y, Z) at ``tr`` s, drawn from
    ``cfg.seed`` (pure: the same arguments give the same schedule)."""
    if n_volumes < 1 or not tr > 0 or len(shape) != 3:
        raise FaultError(f"a fault schedule needs ≥ 1 volume, TR > 0 and a 3-D shape "
                         f"(got {n_volumes}, {tr}, {shape})")
    rng = np.random.default_rng(cfg.seed)
    motion, jerks = planted_head_motion(cfg, n_volumes, rng)
    u = np.arange(n_volumes) / max(n_volumes - 1, 1)
    gain = 1 + cfg.drift_linear * u + cfg.drift_quadratic * u**2
    t = np.arange(n_volumes) * tr
    physio = np.zeros((n_volumes, 2))
    maps = None
    if cfg.physio > 0:
        from scipy.ndimage import gaussian_filter

        rates = np.array([CARDIAC_HZ, RESPIRATION_HZ]) * rng.uniform(0.9, 1.1, 2)
        waves = np.sin(2 * np.pi * rates * t[:, None] + rng.uniform(0, 2 * np.pi, 2))
        physio = cfg.physio * waves / np.sqrt(0.5)  # a sine's SD is 1/√2
        maps = np.stack([gaussian_filter(rng.standard_normal(shape), 2.0) for _ in range(2)])
        maps /= np.sqrt((maps**2).mean(axis=(1, 2, 3), keepdims=True))
        maps = maps.astype(np.float32)
    spikes: list[tuple[int, int]] = []
    if cfg.spikes and n_volumes > 1:
        trs = rng.choice(np.arange(1, n_volumes), size=min(cfg.spikes, n_volumes - 1), replace=False)
        slabs = rng.integers(0, max(1, shape[2] - cfg.spike_slices + 1), size=len(trs))
        spikes = sorted((int(a), int(b)) for a, b in zip(trs, slabs))
    return FaultSchedule(cfg, motion, gain, physio, maps, jerks, tuple(spikes))


def move_head(volume: np.ndarray, params: np.ndarray, affine: np.ndarray, order: int = 3) -> np.ndarray:
    """``volume`` (X, Y, Z) with the head moved by ``params`` (6,): V'(y) = V(T_p⁻¹(y)) on the same grid
    (``affine`` (4, 4)), so :func:`encoders.motion.realign` of the result recovers ``params``. Outside the
    field of view is 0; spline overshoot below 0 is clipped (magnitude images). (X, Y, Z) float32."""
    from scipy.ndimage import affine_transform

    vol = np.asarray(volume, np.float32)
    params = np.asarray(params, float)
    if not params.any():
        return vol.copy()
    affine = np.asarray(affine, float)
    m = np.linalg.inv(affine) @ np.linalg.inv(rigid_matrix(params, grid_center(vol.shape, affine))) @ affine
    out = affine_transform(vol, m[:3, :3], offset=m[:3, 3], order=order, mode="constant", cval=0.0,
                           output=np.float32)
    return np.maximum(out, 0, out=out)


def apply_faults(volume: np.ndarray, t: int, schedule: FaultSchedule, affine: np.ndarray) -> np.ndarray:
    """Volume ``t`` of a run with its faults: ``volume`` (X, Y, Z) is the motionless, fault-free image;
    physiology, head motion, gain drift and spikes are added in that order. (X, Y, Z) float32."""
    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3:
        raise FaultError(f"faults go on a 3-D volume, got shape {vol.shape}")
    if not 0 <= t < len(schedule.motion):
        raise FaultError(f"TR {t} outside the fault schedule's {len(schedule.motion)} volumes")
    if schedule.physio_maps is not None:
        if schedule.physio_maps.shape[1:] != vol.shape:
            raise FaultError(f"volume shape {vol.shape} differs from the schedule's {schedule.physio_maps.shape[1:]}")
        c, r = schedule.physio[t]
        vol = vol * (1 + np.float32(c) * schedule.physio_maps[0] + np.float32(r) * schedule.physio_maps[1])
    vol = move_head(vol, schedule.motion[t], affine, schedule.config.interp_order)
    vol *= np.float32(schedule.gain[t])
    for tr_index, z0 in schedule.spikes:
        if tr_index == t:
            vol[:, :, z0:z0 + schedule.config.spike_slices] *= np.float32(1 + schedule.config.spike_size)
    return vol


def apply_run(volumes: np.ndarray, schedule: FaultSchedule, affine: np.ndarray) -> np.ndarray:
    """:func:`apply_faults` on every volume of ``volumes`` (T, X, Y, Z); (T, X, Y, Z) float32."""
    volumes = np.asarray(volumes)
    if volumes.ndim != 4 or len(volumes) != len(schedule.motion):
        raise FaultError(f"a run of {len(schedule.motion)} volumes (T, X, Y, Z) expected, got shape {volumes.shape}")
    return np.stack([apply_faults(v, t, schedule, affine) for t, v in enumerate(volumes)])


def write_motion_tsv(path: str | Path, motion: np.ndarray) -> Path:
    """The true motion (T, 6) as fMRIPrep's confounds columns: trans_x/y/z mm, rot_x/y/z rad and
    framewise_displacement mm (n/a for the first volume, as fMRIPrep writes it); one row per volume."""
    motion = np.asarray(motion, float)
    fd = framewise_displacement(motion)
    lines = ["\t".join([*PARAM_NAMES, "framewise_displacement"])]
    for t, row in enumerate(motion):
        lines.append("\t".join([*(f"{v:.8g}" for v in row), "n/a" if t == 0 else f"{fd[t]:.8g}"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_motion_tsv(path: str | Path) -> np.ndarray:
    """(T, 6) motion of a TSV with fMRIPrep's column names (ours or fMRIPrep's confounds file)."""
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        try:
            cols = [header.index(p) for p in PARAM_NAMES]
        except ValueError:
            raise FaultError(f"{path}: needs the columns {', '.join(PARAM_NAMES)}") from None
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return np.array([[float(r[c]) for c in cols] for r in rows])
