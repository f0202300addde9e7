"""Run report: one self-contained HTML page (figures embedded as base64 PNG) from a run folder.

Input layout (everything optional except at least one scores table; files are found anywhere
under RUN_DIR, except ``report*`` files this module wrote itself):

Every scores table has its score in column ``r`` (Pearson r of predicted vs measured) and may say
what it is an r of in column ``kind`` (``encoders.score.KINDS``: ``roi_mean``, ``cv_voxel_mean``,
``voxel_mean``; none = one unnamed kind). Where a stream has rows of several kinds, the figures and
the ROI table show the first of ``KINDS`` it has; ``report_scores.tsv`` keeps every row.

``scores.tsv``
    Long table, one row per (agent, condition, ROI[, kind]): columns ``agent``, ``condition``, ``roi``,
    ``r``, optional ``kind``, ``r2``, ``n_trs``, ``n_voxels``, ``n_undefined``.
``<agent>__<condition>_scores.tsv`` (or ``<name>_scores.tsv``)
    Per-stream tables as the encoding service writes them (``EncodingCore.write_outputs``:
    ``roi, n_voxels, n_trs, kind, r, n_undefined``, a ``roi_mean`` and a ``voxel_mean`` row per ROI),
    as the batch replay writes them (``run, agent, condition, roi, kind, r, n_trs, n_undefined``) or as
    ``neuroarcade fit`` writes them (``roi, n_voxels, kind, r, n_undefined, r2[, frac_significant,
    noise_ceiling, unique_<a>, unique_<b>, shared]``, kind ``cv_voxel_mean``).
    Agent and condition come from ``agent``/``condition`` columns when present, else from the
    file stem split at ``__``.
``partition.tsv``
    Variance partitioning per ROI: ``roi``, ``unique_<a>``, ``unique_<b>``, ``shared`` (held-out R²
    fractions, may be negative), optional ``agent`` (one panel per agent/model). Fit tables with
    ``unique_*`` columns are used the same way.
``*.nii`` / ``*.nii.gz``
    3D maps (per-voxel r, R², unique variance …) → glass brain + axial slices; 4D images whose
    name holds ``pred`` (``*_pred.nii.gz``) → map of the predicted signal's temporal s.d.; other
    4D images (measured BOLD runs) are ignored. Files named ``*mask*`` are skipped.
``atlas.nii.gz`` + ``atlas_labels.tsv`` (``index<TAB>name``)
    ROI labels: each stream's per-ROI scores are painted on the atlas as a brain map.
``latency.json``
    ``{"<agent>": {"<condition>": [decision latency in ms, ...]}}``; an optional top-level
    ``"staleness_ms"`` key holds the same structure for frame staleness.
``recovery.tsv`` (a replay of a synthetic participant, ``encoders.plant.Recovery``)
    Per stream and ROI the planted r and planted variance fraction beside the recovered r and
    its block-permutation chance band → the "Known answer" section. ``partition.tsv`` may then
    carry ``planted_unique_<a>``, ``planted_unique_<b>``, ``planted_shared`` beside the recovered
    parts, and ``planted.json`` (``encoders.plant.PlantedPattern``) how much the two prompt
    conditions' features overlap.

``<stem>_motion.tsv``, ``<stem>_tsnr.tsv``, ``<stem>_alignment.json`` + ``<stem>_alignment.png`` (the live
preprocessing's QC, ``encoders.stream.LivePreprocess.write_qc``: per TR the six motion parameters, framewise
displacement, exclusion and its reason, preprocessing time; tSNR per ROI; the session's registration to the
weights' space and its overlay image)
    → the "Preprocessing and quality" section: motion plot (6 parameters + FD per TR, excluded TRs marked),
    excluded TRs (count, list, reasons), tSNR per ROI, the alignment overlay. Streams whose QC files are
    identical (one session, several encoders) are shown once.

Outputs beside the HTML: ``report_scores.tsv`` (all score rows merged, long format) and
``report.json`` (scores, partitions, latency summaries, list of the input files used).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.plant import PlantedPattern, Recovery, read_rows
from encoders.score import KINDS

MAX_BRAIN_FIGURES = 8
"""Brain figures drawn at most (each nilearn figure takes about a second)."""


@dataclass
class RunData:
    """Everything read from a run folder."""

    scores: list[dict[str, Any]] = field(default_factory=list)
    """Rows: agent, condition, roi, r, kind, source (+ any extra numeric columns)."""
    partitions: list[dict[str, Any]] = field(default_factory=list)
    """Rows: agent, roi, unique_<a>, unique_<b>, shared, source."""
    maps_3d: list[Path] = field(default_factory=list)
    maps_4d: list[Path] = field(default_factory=list)
    atlas: Path | None = None
    atlas_names: dict[int, str] = field(default_factory=dict)
    latency: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    staleness: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    recovery: list[Recovery] = field(default_factory=list)
    """Planted beside recovered per stream and ROI (synthetic participants)."""
    planted: PlantedPattern | None = None
    quality: list["QualityData"] = field(default_factory=list)
    """The live preprocessing's QC per session stream (``<stem>_motion.tsv`` …), identical ones merged."""
    inputs: list[str] = field(default_factory=list)


@dataclass
class QualityData:
    """One session's preprocessing QC as the encoding service (or the batch replay) wrote it."""

    streams: list[str]
    """File stems (``<agent>__<condition>``) that wrote these same numbers."""
    motion: list[dict[str, Any]] = field(default_factory=list)
    """Rows of ``<stem>_motion.tsv``: tr_index, trans_x … rot_z (mm, radians), framewise_displacement, std_dvars,
    excluded (0/1), reason, preprocess_ms."""
    tsnr: list[dict[str, Any]] = field(default_factory=list)
    """Rows of ``<stem>_tsnr.tsv``: roi, n_voxels, n_volumes, tsnr_median, tsnr_mean."""
    alignment: dict[str, Any] | None = None
    """``<stem>_alignment.json`` (``encoders.register.SessionAlignment.to_dict()`` + grids and counts)."""
    overlay: Path | None = None
    """The alignment overlay PNG."""

    @property
    def excluded(self) -> list[int]:
        """TR indices not scored."""
        return [int(r["tr_index"]) for r in self.motion if r.get("excluded") == 1.0]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: excluded TRs and why, motion extent, preprocessing time, tSNR, alignment."""
        fd = [r["framewise_displacement"] for r in self.motion if isinstance(r.get("framewise_displacement"), float)
              and math.isfinite(r["framewise_displacement"])]
        ms = [r["preprocess_ms"] for r in self.motion if isinstance(r.get("preprocess_ms"), float)]
        reasons: dict[str, int] = {}
        for r in self.motion:
            for why in str(r.get("reason", "")).split("; "):
                if why and why != "nan":
                    key = why.split(" ")[0] if why.startswith(("FD ", "DVARS ")) else why.split(":")[0].split(" (")[0]
                    reasons[key] = reasons.get(key, 0) + 1
        return {"streams": self.streams, "volumes": len(self.motion), "excluded": self.excluded,
                "excluded_reasons": reasons, "fd_max_mm": max(fd) if fd else None,
                "fd_mean_mm": float(np.mean(fd)) if fd else None,
                "preprocess_ms": _summary(ms), "tsnr": self.tsnr,
                "alignment": self.alignment, "overlay": str(self.overlay) if self.overlay else None}


# --- reading ---------------------------------------------------------------------------------------


def _num(v: str) -> Any:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    return x


def read_tsv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f, delimiter="\t")]


def _stream_from_stem(path: Path) -> tuple[str, str]:
    stem = path.name.split(".")[0]
    stem = stem[: -len("_scores")] if stem.endswith("_scores") else stem
    agent, _, condition = stem.partition("__")
    return agent, condition


def _is_ours(path: Path) -> bool:
    return path.name.startswith("report")


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    data = RunData()
    data.quality = load_quality(run_dir, data.inputs)
    for path in sorted(run_dir.rglob("*.tsv")):
        if _is_ours(path) or path.name == "atlas_labels.tsv" or path.name.endswith(("_motion.tsv", "_tsnr.tsv")):
            continue
        if path.name == "recovery.tsv":  # its r column restates the streams' scores: not a scores table
            data.recovery = read_rows(path, Recovery)
            data.inputs.append(str(path.relative_to(run_dir)))
            continue
        rows = read_tsv(path)
        if not rows or "roi" not in rows[0]:
            continue
        data.inputs.append(str(path.relative_to(run_dir)))
        cols = list(rows[0])
        unique_cols = [c for c in cols if c.startswith("unique_")]
        scored = "r" in cols and path.name != "partition.tsv"
        f_agent, f_cond = _stream_from_stem(path)
        for row in rows:
            agent = str(row.get("agent", f_agent))
            condition = str(row.get("condition", f_cond if "agent" not in row else ""))
            roi = str(row["roi"])
            if scored:
                extra = {k: v for k, v in row.items() if isinstance(v, float) and k != "r"}
                data.scores.append({"agent": agent, "condition": condition, "roi": roi, "r": row["r"],
                                    "kind": str(row.get("kind", "")), "source": path.name, **extra})
            if len(unique_cols) >= 2:
                planted_cols = [c for c in cols if c.startswith("planted_")]
                data.partitions.append({"agent": agent if ("agent" in row or path.name != "partition.tsv") else "",
                                        "roi": roi, **{c: row[c] for c in unique_cols + ["shared"] + planted_cols
                                                       if c in row},
                                        "source": path.name})
    for path in sorted([*run_dir.rglob("*.nii"), *run_dir.rglob("*.nii.gz")]):
        if path.name.startswith("atlas") and path.name.split(".")[0] == "atlas":
            data.atlas = path
            labels = path.parent / "atlas_labels.tsv"
            if labels.exists():
                data.atlas_names = {int(r["index"]): str(r["name"]) for r in read_tsv(labels) if "index" in r}
            continue
        if "mask" in path.name:
            continue
        import nibabel as nib

        shape = nib.load(path).shape
        if len(shape) == 4 and shape[3] > 1:
            if "pred" not in path.name:
                continue  # measured BOLD runs and other 4D series are inputs, not results
            data.maps_4d.append(path)
        else:
            data.maps_3d.append(path)
        data.inputs.append(str(path.relative_to(run_dir)))
    if (run_dir / "planted.json").exists():
        data.planted = PlantedPattern.load(run_dir / "planted.json")
        data.inputs.append("planted.json")
    lat = run_dir / "latency.json"
    if lat.exists():
        raw = json.loads(lat.read_text())
        data.staleness = _latency_map(raw.pop("staleness_ms", {}))
        data.latency = _latency_map(raw.get("agents", raw))
        data.inputs.append("latency.json")
    return data


def load_quality(run_dir: Path, inputs: list[str]) -> list[QualityData]:
    """The preprocessing QC files under ``run_dir`` per stem, streams with identical files merged."""
    stems: dict[Path, set[str]] = {}
    for suffix in ("_motion.tsv", "_tsnr.tsv", "_alignment.json"):
        for path in sorted(run_dir.rglob(f"*{suffix}")):
            if not _is_ours(path):
                stems.setdefault(path.parent, set()).add(path.name[: -len(suffix)])
    out: dict[str, QualityData] = {}
    for folder, names in stems.items():
        for stem in sorted(names):
            files = {k: folder / f"{stem}_{k}" for k in ("motion.tsv", "tsnr.tsv", "alignment.json", "alignment.png")}
            q = QualityData([stem])
            try:
                if files["motion.tsv"].exists():
                    q.motion = read_tsv(files["motion.tsv"])
                if files["tsnr.tsv"].exists():
                    q.tsnr = read_tsv(files["tsnr.tsv"])
                if files["alignment.json"].exists():
                    q.alignment = json.loads(files["alignment.json"].read_text())
            except (OSError, ValueError, KeyError) as e:  # a half-written or foreign file: reported, not fatal
                q.alignment = {"converged": False, "reason": f"unreadable QC file ({e})"}
            if files["alignment.png"].exists():
                q.overlay = files["alignment.png"]
            key = json.dumps([q.motion, q.tsnr, {k: v for k, v in (q.alignment or {}).items() if k != "overlay"}],
                             sort_keys=True, default=str)
            if key in out:
                out[key].streams.append(stem)
                continue
            out[key] = q
            inputs += [str(f.relative_to(run_dir)) for f in files.values() if f.exists()]
    return list(out.values())


def headline_scores(scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one kind per stream (agent, condition): the first of ``KINDS`` it has, else its first kind."""
    kinds: dict[tuple[str, str], list[str]] = {}
    for r in scores:
        seen = kinds.setdefault((r["agent"], r["condition"]), [])
        if r["kind"] not in seen:
            seen.append(r["kind"])
    order = list(KINDS)
    pick = {s: min(ks, key=lambda k: (order.index(k) if k in order else len(order), ks.index(k)))
            for s, ks in kinds.items()}
    return [r for r in scores if r["kind"] == pick[(r["agent"], r["condition"])]]


def _latency_map(raw: Any) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    if not isinstance(raw, dict):
        return out
    for agent, conds in raw.items():
        if isinstance(conds, list):
            conds = {"": conds}
        if isinstance(conds, dict):
            out[str(agent)] = {str(c): [float(x) for x in v if isinstance(x, (int, float))]
                               for c, v in conds.items() if isinstance(v, list)}
    return out


# --- figures -----------------------------------------------------------------------------------------


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _stream_name(agent: str, condition: str) -> str:
    return f"{agent} · {condition}" if condition else agent


def _roi_order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["roi"] not in seen:
            seen.append(r["roi"])
    return seen


def fig_roi_bars(scores: list[dict]) -> str:
    import matplotlib.pyplot as plt

    rois = _roi_order(scores)
    streams = list(dict.fromkeys(_stream_name(r["agent"], r["condition"]) for r in scores))
    table = {(_stream_name(r["agent"], r["condition"]), r["roi"]): r["r"] for r in scores}
    kinds = sorted({r["kind"] or "r" for r in scores})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rois) * max(1, len(streams)) ** 0.5 + 2), 3.8))
    width = 0.8 / max(len(streams), 1)
    x = np.arange(len(rois))
    for k, s in enumerate(streams):
        vals = [table.get((s, roi), np.nan) for roi in rois]
        ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=s, color=f"C{k % 10}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, rois, rotation=30, ha="right")
    ax.set_ylabel("Pearson r (predicted vs measured)")
    ax.set_title(f"Encoding performance per ROI ({', '.join(kinds)})")
    ax.legend(fontsize=8, ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_partition(parts: list[dict]) -> str:
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(p["agent"] for p in parts))
    fig, axes = plt.subplots(1, len(agents), figsize=(max(6.0, 5.5 * len(agents)), 3.8), squeeze=False)
    for ax, agent in zip(axes[0], agents):
        rows = [p for p in parts if p["agent"] == agent]
        rois = _roi_order(rows)
        cols = [c for c in rows[0] if c.startswith("unique_")][:2] + (["shared"] if "shared" in rows[0] else [])
        x = np.arange(len(rois))
        width = 0.8 / len(cols)
        for k, c in enumerate(cols):
            vals = [next((r.get(c, np.nan) for r in rows if r["roi"] == roi), np.nan) for roi in rois]
            label = c.replace("unique_", "unique ") if c != "shared" else "shared"
            ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=label,
                   color=("#d95f02", "#1b9e77", "#b3b3b3")[k % 3])
            if f"planted_{c}" in rows[0]:  # a synthetic participant: the truth as a tick over each bar
                planted = [next((r.get(f"planted_{c}", np.nan) for r in rows if r["roi"] == roi), np.nan)
                           for roi in rois]
                ax.scatter(x - 0.4 + width * (k + 0.5), planted, marker="_", s=220, color="k", zorder=4,
                           label="planted" if k == 0 else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, rois, rotation=30, ha="right")
        ax.set_ylabel("held-out R² (variance explained)")
        ax.set_title(f"Variance partitioning{' — ' + agent if agent else ''}")
        ax.legend(fontsize=8, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_partition_scatter(parts: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    ucols = [c for c in parts[0] if c.startswith("unique_")][:2]
    if len(ucols) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    agents = list(dict.fromkeys(p["agent"] for p in parts))
    vals = [(p.get(ucols[0], np.nan), p.get(ucols[1], np.nan)) for p in parts]
    lim = max([abs(v) for pair in vals for v in pair if np.isfinite(v)] + [0.01]) * 1.15
    for k, agent in enumerate(agents):
        rows = [p for p in parts if p["agent"] == agent]
        ax.scatter([r[ucols[0]] for r in rows], [r[ucols[1]] for r in rows], color=f"C{k}", label=agent or None, zorder=3)
        for r in rows:
            ax.annotate(r["roi"], (r[ucols[0]], r[ucols[1]]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8, ls="--", label="equal")
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"{ucols[0].replace('_', ' ')} (R²)")
    ax.set_ylabel(f"{ucols[1].replace('_', ' ')} (R²)")
    ax.set_title("Unique variance per ROI")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def fig_recovery(rows: list[Recovery]) -> str:
    """Per stream: recovered r per ROI (bars), its chance band (grey), the planted r (black diamond)."""
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(r.stream for r in rows))
    fig, axes = plt.subplots(1, len(streams), figsize=(max(6.0, 4.2 * len(streams)), 3.6), squeeze=False,
                             sharey=True)
    for k, (ax, stream) in enumerate(zip(axes[0], streams)):
        rs = [r for r in rows if r.stream == stream]
        x = np.arange(len(rs))
        ax.bar(x, [r.null_hi - r.null_lo for r in rs], 0.8, bottom=[r.null_lo for r in rs], color="0.88",
               label="chance (95 % of the null)")
        ax.bar(x, [r.r for r in rs], 0.45, color=f"C{k}", label="recovered r")
        ax.scatter(x, [r.planted_r for r in rs], marker="D", s=28, color="k", zorder=4, label="planted r")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [r.roi for r in rs], rotation=30, ha="right")
        ax.set_title(stream.replace("__", " · "))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r (ROI means)")
    axes[0][0].legend(fontsize=7, frameon=False, loc="lower left")
    return _png(fig)


def recovery_section(rows: list[Recovery], planted: PlantedPattern | None) -> str:
    """HTML: planted beside recovered per stream and ROI, with the chance band and how to read it."""
    n_trs, block, perms = rows[0].n_trs, rows[0].block, rows[0].permutations
    chance = (f"<b>chance</b> is the 2.5–97.5 % range of r when the measured series is cut into {block}-TR blocks "
              f"that are shuffled ({perms} permutations; blocks keep the BOLD's autocorrelation), and <b>p</b> the "
              "share of shuffles scoring at least r.")
    if not any(math.isfinite(r.planted_fraction) for r in rows):  # a real participant: no known answer
        intro = (f"<p class='caption'><b>r</b>: predicted vs measured ROI means over {n_trs} TRs; {chance}</p>")
    else:
        intro = ("<p class='caption'>This participant is synthetic: its BOLD was planted on the VLM's action- and "
                 "reasoning-prompt features with known parts per ROI. <b>planted r</b> is what a perfect model of the "
                 "stream would score on this run (the planted parts it can explain vs the measured BOLD; — where "
                 "nothing was planted on the stream), <b>recovered r</b> is what the replay scored (predicted vs "
                 f"measured ROI means over {n_trs} TRs). {chance} A recovered r above the band and near the planted "
                 "r means the method found what was planted. The planted r holds for the features the BOLD was "
                 "planted on; a live replay's agents decide on other frames of each TR, which lowers r somewhat. A "
                 "stream nothing was planted on can still score: it sees the same frames, and the planted sources "
                 "are functions of them.</p>")
    if planted is not None:
        intro += f"<p class='caption'>Prompt conditions: {html.escape(planted.overlap.describe())}.</p>"
    table = _table(["stream", "ROI", "planted R²", "planted r", "recovered r", "chance low", "chance high", "p",
                    "above chance"],
                   [[r.stream.replace("__", " · "), r.roi, r.planted_fraction, r.planted_r, r.r, r.null_lo,
                     r.null_hi, r.p, "yes" if r.above_chance else "no"] for r in rows])
    return intro + _img(fig_recovery(rows), "planted vs recovered r per ROI") + table


def _partition_table(parts: list[dict]) -> str:
    """Partition rows as a table; with planted columns each part shows planted beside recovered."""
    first = parts[0]
    named = [c for c in first if c.startswith("unique_")][:2] + (["shared"] if "shared" in first else [])
    lead = [c for c in ("agent", "roi") if c != "agent" or any(p["agent"] for p in parts)]
    if not any(f"planted_{c}" in first for c in named):
        cols = [c for c in first if c != "source" and (c != "agent" or any(p["agent"] for p in parts))]
        return _table(cols, [[p.get(c, float("nan")) for c in cols] for p in parts])
    header = lead + [f"{c.replace('_', ' ')} {which}" for c in named for which in ("planted", "recovered")]
    return _table(header, [[p[c] for c in lead] + [p.get(f"{w}{c}", float("nan")) for c in named
                                                    for w in ("planted_", "")] for p in parts])


def fig_latency(latency: dict[str, dict[str, list[float]]], title: str, xlabel: str) -> str:
    import matplotlib.pyplot as plt

    series = [(_stream_name(a, c), np.asarray(v)) for a, conds in latency.items() for c, v in conds.items() if v]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    hi = max(float(np.percentile(v, 99.5)) for _, v in series) * 1.1
    lo = max(min(float(np.percentile(v, 0.5)) for _, v in series) * 0.9, 1e-3)
    log_x = hi / lo > 20  # e.g. an RL baseline at 2 ms beside a VLM at 60 ms: one linear axis hides one of them
    bins = np.geomspace(lo, hi, 50) if log_x else np.linspace(0, hi, 40)
    for k, (name, v) in enumerate(series):
        p50, p99 = np.percentile(v, [50, 99])
        ax.hist(np.clip(v, bins[0], hi), bins=bins, alpha=0.55, color=f"C{k}",
                label=f"{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms (n={len(v)})")
        ax.axvline(p50, color=f"C{k}", lw=1.2)
        ax.axvline(p99, color=f"C{k}", lw=1.0, ls="--")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + (" — log scale" if log_x else ""))
    ax.set_ylabel("decisions")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.18))
    return _png(fig)


def fig_motion(rows: list[dict[str, Any]], title: str) -> str:
    """Translations (mm), rotations (degrees) and framewise displacement (mm) per TR; excluded TRs shaded."""
    import matplotlib.pyplot as plt

    t = np.array([r["tr_index"] for r in rows], float)

    def col(name: str) -> np.ndarray:
        return np.array([r[name] if isinstance(r.get(name), float) else np.nan for r in rows], float)

    fig, axes = plt.subplots(3, 1, figsize=(9.0, 5.6), sharex=True)
    for k, axis in enumerate("xyz"):
        axes[0].plot(t, col(f"trans_{axis}"), color=f"C{k}", lw=1.1, label=f"trans_{axis}")
        axes[1].plot(t, np.rad2deg(col(f"rot_{axis}")), color=f"C{k}", lw=1.1, label=f"rot_{axis}")
    axes[2].plot(t, col("framewise_displacement"), color="k", lw=1.1, label="framewise displacement")
    excluded = [r["tr_index"] for r in rows if r.get("excluded") == 1.0]
    for ax in axes:
        for e in excluded:
            ax.axvspan(e - 0.5, e + 0.5, color="#d62728", alpha=0.12, lw=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, ncol=3, loc="upper left")
    axes[0].set_ylabel("mm")
    axes[1].set_ylabel("degrees")
    axes[2].set_ylabel("FD (mm)")
    axes[2].set_xlabel("TR (shaded: excluded from the scores)")
    axes[0].set_title(title)
    return _png(fig)


def quality_section(items: list[QualityData]) -> str:
    """HTML: per session stream, the motion plot, excluded TRs, tSNR per ROI and the alignment overlay."""
    parts = []
    for q in items:
        s = q.summary()
        names = ", ".join(x.replace("__", " · ") for x in q.streams)
        parts.append(f"<h3>{html.escape(names)}</h3>")
        if q.motion:
            parts.append(_img(fig_motion(q.motion, f"head motion relative to the session's reference ({names})"),
                              "motion parameters and framewise displacement per TR"))
            ex = s["excluded"]
            why = ", ".join(f"{k}: {v}" for k, v in sorted(s["excluded_reasons"].items()))
            pre = s["preprocess_ms"]
            parts.append(f"<p class='caption'><b>{len(ex)} of {s['volumes']} TRs excluded</b> from the running scores"
                         + (f" ({html.escape(why)})" if why else "") + (f": TRs {_tr_list(ex)}" if ex else "")
                         + (f". Max FD {s['fd_max_mm']:.2f} mm, mean {s['fd_mean_mm']:.3f} mm"
                            if s["fd_max_mm"] is not None else "")
                         + (f". Preprocessing per volume: p50 {pre['p50']:.1f} ms, p99 {pre['p99']:.1f} ms (the "
                            "first volume includes the session's registration)" if pre.get("n") else "") + ".</p>")
        if q.tsnr:
            parts.append(_table(["ROI", "voxels", "volumes", "tSNR median", "tSNR mean"],
                                [[r["roi"], _int(r["n_voxels"]), _int(r["n_volumes"]), r["tsnr_median"], r["tsnr_mean"]]
                                 for r in q.tsnr]))
            parts.append("<p class='caption'>Temporal SNR (mean / s.d. over time of the realigned signal, per voxel; "
                         "censored volumes left out) summarised per ROI of the weights.</p>")
        al = q.alignment
        if al is not None:
            if al.get("converged"):
                state = (f"registered to the weights' reference: {al.get('translation_mm', float('nan')):.2f} mm, "
                         f"{al.get('rotation_deg', float('nan')):.2f}° (trans {al.get('trans_mm')} mm, rot "
                         f"{al.get('rot_deg')}°), match r {al.get('match_r') or float('nan'):.3f}")
            else:
                state = f"<b>NOT registered to the weights' space</b>: {html.escape(str(al.get('reason', '')))}"
            if q.overlay is not None:
                parts.append(f"<img alt='alignment overlay' src='data:image/png;base64,"
                             f"{base64.b64encode(q.overlay.read_bytes()).decode('ascii')}'>")
            parts.append(f"<p class='caption'>Alignment of the session to the space the weights were fit in: {state}. "
                         "Grey: the weights' reference volume (the fit's mean EPI); contours: the session's reference "
                         "volume brought into that space (one registration per session, rigid, 6 parameters). "
                         + (f"Overlay: <code>{html.escape(q.overlay.name)}</code>." if q.overlay else "") + "</p>")
    return "\n".join(parts)


def _int(v: Any) -> Any:
    """A whole number read back as float shown as one (894, not 894.000)."""
    return int(v) if isinstance(v, float) and math.isfinite(v) and v == int(v) else v


def _tr_list(trs: list[int], limit: int = 60) -> str:
    """"3, 4, 17–20, …": runs of consecutive TRs collapsed."""
    runs: list[list[int]] = []
    for t in trs:
        if runs and t == runs[-1][-1] + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs[:limit])
    return text + (", …" if len(runs) > limit else "")


def _brain_figure(img, title: str, symmetric: bool = True) -> str:
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = np.asarray(img.dataobj, dtype=np.float32)
    vmax = float(np.nanmax(np.abs(data))) or 1.0
    fig = plt.figure(figsize=(11, 3.0))
    ax1 = fig.add_axes([0.0, 0.0, 0.48, 1.0])
    ax2 = fig.add_axes([0.5, 0.0, 0.5, 1.0])
    plotting.plot_glass_brain(img, axes=ax1, colorbar=True, plot_abs=False, vmax=vmax,
                              vmin=-vmax if symmetric else 0, cmap="RdBu_r" if symmetric else "inferno",
                              symmetric_cbar=symmetric, title=title, threshold=1e-6)
    plotting.plot_stat_map(img, axes=ax2, display_mode="z", cut_coords=5, colorbar=False, vmax=vmax,
                           cmap="RdBu_r" if symmetric else "inferno", symmetric_cbar=symmetric, annotate=True,
                           draw_cross=False, black_bg=False, threshold=1e-6)
    return _png(fig)


def brain_figures(data: RunData, run_dir: Path) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for score maps painted on the atlas, 3D maps and 4D predictions."""
    import warnings

    import nibabel as nib

    out: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if data.atlas is not None and data.scores:
            atlas = nib.load(data.atlas)
            labels = np.asarray(atlas.dataobj).astype(int)
            by_name = {v: k for k, v in data.atlas_names.items()}
            headline = headline_scores(data.scores)
            streams = list(dict.fromkeys((r["agent"], r["condition"]) for r in headline))
            for agent, cond in streams:
                vol = np.zeros(labels.shape, np.float32)
                painted = 0
                for r in headline:
                    if (r["agent"], r["condition"]) == (agent, cond) and r["roi"] in by_name and \
                            isinstance(r["r"], float) and math.isfinite(r["r"]):
                        vol[labels == by_name[r["roi"]]] = r["r"]
                        painted += 1
                if painted and len(out) < MAX_BRAIN_FIGURES:
                    out.append((f"ROI scores of {_stream_name(agent, cond)} painted on the atlas "
                                f"({data.atlas.name}; {painted} ROIs; colour = Pearson r)",
                                _brain_figure(nib.Nifti1Image(vol, atlas.affine), _stream_name(agent, cond))))
        for path in data.maps_3d:
            if len(out) >= MAX_BRAIN_FIGURES:
                break
            img = nib.squeeze_image(nib.load(path))
            if 0 in img.shape:  # an empty output (a stream that predicted nothing): nothing to draw
                continue
            out.append((f"{path.relative_to(run_dir)} (per-voxel values)", _brain_figure(img, path.name.split(".")[0])))
        for path in data.maps_4d:
            if len(out) >= MAX_BRAIN_FIGURES:
                break
            img = nib.load(path)
            if 0 in img.shape:
                continue
            sd = np.asarray(img.dataobj, dtype=np.float32).std(axis=3)
            out.append((f"{path.relative_to(run_dir)}: temporal s.d. of the predicted BOLD over "
                        f"{img.shape[3]} TRs (z-units)",
                        _brain_figure(nib.Nifti1Image(sd, img.affine), "predicted BOLD s.d.", symmetric=False)))
    return out


# --- HTML --------------------------------------------------------------------------------------------


CSS = """
body { font: 14px/1.45 "DejaVu Sans", Arial, sans-serif; color: #1d2430; max-width: 1200px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; border-bottom: 1px solid #d9dde3; padding-bottom: 3px; margin-top: 28px; }
.meta { color: #6b7380; font-size: 12px; } img { max-width: 100%; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #e3e6ea; text-align: right; }
td:first-child, th:first-child { text-align: left; } .caption { color: #6b7380; font-size: 12px; margin: 0 0 14px; }
.none { color: #6b7380; font-style: italic; } code { background: #f1f3f5; padding: 0 3px; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.3f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def write_report(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Read RUN_DIR (layout in the module docstring) and write report.html + report_scores.tsv + report.json."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    data = load_run(run_dir)
    if not (data.scores or data.partitions or data.latency or data.maps_3d or data.maps_4d or data.quality):
        raise FileNotFoundError(f"{run_dir} holds no scores TSV, partition, NIfTI map or latency.json to report on")
    title = title or f"neuroarcade run report — {run_dir.resolve().name}"
    sections = [f"<h1>{html.escape(title)}</h1><p class='meta'>written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
                f"from <code>{html.escape(str(run_dir))}</code>; inputs: "
                f"{', '.join(f'<code>{html.escape(i)}</code>' for i in data.inputs)}</p>"]
    if data.recovery:
        known = any(math.isfinite(r.planted_fraction) for r in data.recovery)
        sections.append("<h2 id='known-answer'>" + ("Known answer: planted vs recovered" if known else
                                                    "Scores beside chance") + "</h2>")
        sections.append(recovery_section(data.recovery, data.planted))

    # scores
    sections.append("<h2 id='scores'>Encoding scores per ROI</h2>")
    if data.scores:
        headline = headline_scores(data.scores)
        sections.append(_img(fig_roi_bars(headline), "ROI bar chart"))
        sections.append("<p class='caption'>Pearson r between predicted and measured BOLD per ROI, per model "
                        "(agent) and prompt condition. Encoding-service scores are running r of ROI-mean time "
                        "courses (kind roi_mean); fit scores are leave-one-run-out cross-validated r averaged over "
                        "the ROI's voxels (cv_voxel_mean). report_scores.tsv holds every kind.</p>")
        streams = list(dict.fromkeys((r["agent"], r["condition"]) for r in headline))
        rois = _roi_order(headline)
        table = {(r["agent"], r["condition"], r["roi"]): r["r"] for r in headline}
        sections.append(_table(["ROI"] + [_stream_name(a, c) for a, c in streams],
                               [[roi] + [table.get((a, c, roi), float("nan")) for a, c in streams] for roi in rois]))
    else:
        sections.append("<p class='none'>No scores table in this run.</p>")

    # variance partitioning
    sections.append("<h2 id='partition'>Variance partitioning: unique action vs unique reasoning</h2>")
    if data.partitions:
        sections.append(_img(fig_partition(data.partitions), "variance partitioning bars"))
        scatter = fig_partition_scatter(data.partitions)
        if scatter:
            sections.append(_img(scatter, "unique variance scatter"))
        sections.append("<p class='caption'>unique A = R²(A∪B) − R²(B), unique B = R²(A∪B) − R²(A), shared = "
                        "R²(A) + R²(B) − R²(A∪B) (Dupré la Tour et al. 2022), held-out R² averaged over the ROI's "
                        "voxels; negative values mean no detectable unique/shared variance."
                        + (" <b>planted</b>: the fraction of each voxel's variance the synthetic participant's part "
                           "holds (ROI mean; black ticks in the figure); the recovered parts are leave-one-run-out "
                           "R², lower by the estimation noise of a fit on a few runs."
                           if any(k.startswith("planted_") for k in data.partitions[0]) else "") + "</p>")
        sections.append(_partition_table(data.partitions))
    else:
        sections.append("<p class='none'>No variance partitioning results in this run "
                        "(<code>partition.tsv</code> or <code>unique_*</code> columns).</p>")

    # brain maps
    sections.append("<h2 id='maps'>Brain maps</h2>")
    figures = brain_figures(data, run_dir)
    if figures:
        for caption, b64 in figures:
            sections.append(_img(b64, caption) + f"<p class='caption'>{html.escape(caption)}. Glass brain (left) and "
                            "axial slices on the MNI152 template bundled with nilearn (right).</p>")
    else:
        sections.append("<p class='none'>No NIfTI maps and no atlas in this run.</p>")

    # latency
    sections.append("<h2 id='latency'>Decision latency</h2>")
    if any(v for conds in data.latency.values() for v in conds.values()):
        sections.append(_img(fig_latency(data.latency, "Decision latency per agent and condition",
                                         "frame received → decision (ms)"), "latency histogram"))
        rows = [[_stream_name(a, c), len(v), *np.percentile(v, [50, 90, 99]).tolist(), float(np.max(v))]
                for a, conds in data.latency.items() for c, v in conds.items() if v]
        sections.append(_table(["stream", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
        if any(v for conds in data.staleness.values() for v in conds.values()):
            sections.append(_img(fig_latency(data.staleness, "Frame staleness at decision",
                                             "frame published → decision starts (ms)"), "staleness histogram"))
    else:
        sections.append("<p class='none'>No latency samples (<code>latency.json</code>) in this run.</p>")

    # preprocessing and quality
    sections.append("<h2 id='quality'>Preprocessing and quality</h2>")
    if data.quality:
        sections.append(quality_section(data.quality))
    else:
        sections.append("<p class='none'>No preprocessing QC in this run (the weights record no preprocessing, or "
                        "nothing was measured).</p>")

    # files
    scores_tsv = out.with_name("report_scores.tsv")
    extra_cols = sorted({k for r in data.scores for k in r} - {"agent", "condition", "roi", "r", "kind", "source"})
    cols = ["agent", "condition", "roi", "r", "kind", *extra_cols, "source"]
    scores_tsv.write_text("\t".join(cols) + "\n" + "".join(
        "\t".join(f"{r[c]:.6g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + "\n"
        for r in data.scores))
    summary = {"run_dir": str(run_dir), "inputs": data.inputs, "scores": data.scores, "partitions": data.partitions,
               "recovery": [asdict(r) for r in data.recovery],
               "latency_ms": {a: {c: _summary(v) for c, v in conds.items()} for a, conds in data.latency.items()},
               "brain_figures": [c for c, _ in figures],
               "quality": [q.summary() for q in data.quality]}
    json_path = out.with_name("report.json")
    json_path.write_text(json.dumps(json_ready(summary), indent=2, allow_nan=False))
    sections.append("<h2 id='files'>Data</h2><p>Underlying numbers: "
                    f"<code>{scores_tsv.name}</code> (all score rows, long format), <code>{json_path.name}</code> "
                    "(scores, partitions, latency summaries); inputs listed at the top.</p>")
    out.write_text("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                   f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                   + "\n".join(sections) + "</body></html>")
    return out


def _summary(v: list[float]) -> dict[str, float]:
    if not v:
        return {"n": 0}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"n": len(v), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(v))}


def json_ready(o: Any) -> Any:
    """JSON-ready copy: non-finite floats → null, numpy scalars → Python, paths → str."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Path):
        return str(o)
    return o
