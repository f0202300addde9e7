"""Group statistics of an encoding study: across-subject tests per ROI, FDR, effect sizes, known-answer recovery.

Pure functions on pandas tables (no Ray, no I/O): ``pipelines.study`` computes per-subject scores, calls
:func:`group_table`, and hands both tables to ``pipelines.study_report.write_study_report``.

**Input** (``scores``, tidy): one row per subject × model × condition × layer × dim × roi × measure, columns
``subject, model, condition, layer (int), dim (int), roi, measure, value``. ``measure`` is ``r`` or ``r2``
(held-out scores) or a variance-partition part ``unique_a``, ``unique_b``, ``shared`` (R² fractions; negative
values are kept as they are: REFERENCE §11, ``encoders.fit.variance_partition``). A NaN value counts as missing.

**Output** (``group.tsv``): one row per tested effect, columns :data:`GROUP_COLUMNS`:

- ``one_sample`` rows: every cell (model, condition, layer, dim, roi, measure) tested against zero;
- ``paired`` rows: every :class:`Comparison` × matching (unnamed keys, usually layer, dim, roi, measure) — the
  difference A − B per subject, tested against zero; only subjects present in both cells are paired (``n``).
  Key columns the comparison varies hold ``""`` (``contrast`` names them), the others their shared value;
- ``q``: Benjamini–Hochberg over every testable row of the table together (ROIs × comparisons × measures ×
  layers × dims), ``significant`` = q ≤ alpha.

**Why sign-flip permutation by default.** The unit of inference is the subject, N is small (8–30) and the
per-subject scores (r, R², unique variance) are bounded and skewed, so a t-test's normality is doubtful; under
H0 "no effect" a subject's score (or paired difference) is symmetric about 0, so flipping signs gives the
exact null distribution without assuming a shape (Nichols & Holmes 2002; REFERENCE §11: the usual
non-parametric choice for paired differences with small N). Unlike Wilcoxon it tests the mean — the number the
figures show — and with all 2^n flips enumerated (2^n ≤ n_perm) it is exact. ``test="wilcoxon"`` (scipy's
signed-rank test, which tests the median of the differences) is offered as the alternative.

The permutation statistic is the sum of a cell's values: sums of squares do not change under sign flips, so
|sum| orders the flips exactly as |t| does and the p-value is that of the one-sample t statistic (reported in
``stat``). All cells share one ±1 matrix, applied as one matrix product per block of cells.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CELL_KEYS = ("model", "condition", "layer", "dim", "roi", "measure")
"""Columns that fix one cell of the design (everything but the subject)."""
SCORE_COLUMNS = ("subject", *CELL_KEYS, "value")
"""Columns ``scores`` must have."""
MEASURES = ("r", "r2", "unique_a", "unique_b", "shared")
"""Known measures, in the order tables and figures list them (others are allowed and follow, sorted)."""
KEY_COLUMNS = ("test", "contrast", *CELL_KEYS)
"""Columns that identify one row of ``group.tsv`` (and of a truth table)."""
GROUP_COLUMNS = (*KEY_COLUMNS, "n", "estimate", "sem", "stat", "p", "q", "significant", "effect_size")
"""Columns of ``group.tsv``, in order."""
TESTS = ("signflip", "wilcoxon")
"""Tests :func:`group_table` offers."""
_INT_KEYS = ("layer", "dim")
_BLOCK_ELEMENTS = 1 << 22
"""Permutations × cells computed per matrix product (32 MB of float64): bounds memory for thousands of cells."""


@dataclass(frozen=True)
class Comparison:
    """A paired test across subjects between two cells of the design."""

    name: str
    """e.g. ``"reasoning-action@vlm"`` — goes to the ``contrast`` column."""
    a: dict[str, str]
    """Key columns fixing cell A, e.g. ``{"model": "vlm", "condition": "reasoning"}``."""
    b: dict[str, str]
    """Same keys for cell B; keys named in neither are matched between A and B (layer, dim, roi, measure)."""


@dataclass(frozen=True)
class Recovery:
    """Planted group effects against the group table (the known answer of a synthetic study)."""

    n_planted: int
    """Truth rows with ``planted_sign`` ±1."""
    n_planted_recovered: int
    """Of those, significant with the planted sign."""
    n_planted_wrong_sign: int
    """Of those, significant with the opposite sign (a sign error, worse than a miss)."""
    n_null: int
    """Truth rows with ``planted_sign`` 0."""
    n_null_significant: int
    """Of those, significant (false discoveries)."""
    n_significant: int
    """Significant rows among all truth rows (the discoveries the FDR is a fraction of)."""
    observed_fdr: float
    """False discovery proportion: (n_null_significant + n_planted_wrong_sign) / n_significant (0 when nothing is
    significant) — what BH bounds in expectation by alpha · n_null / (n_null + n_planted)."""
    null_rejection_rate: float
    """n_null_significant / n_null (NaN without nulls)."""
    n_missing: int
    """Truth rows with no row in the group table (counted as not recovered)."""

    @property
    def all_planted_recovered(self) -> bool:
        """Every planted effect significant with its sign."""
        return self.n_planted_recovered == self.n_planted


# --- input -----------------------------------------------------------------------------------------------


def key_str(v: object) -> str:
    """Canonical text of a key value, so tables read back from TSV match (4, 4.0, "4" → "4"; NaN/None → "")."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _key_text(col: pd.Series) -> np.ndarray:
    """``key_str`` of every entry, computed once per distinct value (a study has millions of rows)."""
    if pd.api.types.is_string_dtype(col.dtype) and not isinstance(col.dtype, np.dtypes.ObjectDType):
        return col.to_numpy(dtype=object, na_value="")  # already text: nothing to canonicalise
    codes, uniques = pd.factorize(col, use_na_sentinel=False)
    return np.array([key_str(u) for u in uniques], dtype=object)[codes]


def _measure_order(measures) -> list[str]:
    known = [m for m in MEASURES if m in set(measures)]
    return known + sorted(set(measures) - set(MEASURES))


def validate_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Checked, canonical copy of ``scores``: key columns as str (layer, dim as int), value float64, sorted by
    cell then subject; columns SCORE_COLUMNS, then any others ``scores`` has (kept as they are).

    Raises ValueError naming a missing column, a non-integer layer/dim or a duplicated subject × cell row.
    """
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lacks column(s) {', '.join(map(repr, missing))} (needs {', '.join(SCORE_COLUMNS)})")
    if scores.empty:
        raise ValueError("scores has no rows")
    out = pd.DataFrame({c: _key_text(scores[c]) for c in ("subject", "model", "condition", "roi", "measure")})
    for c in _INT_KEYS:
        col = pd.to_numeric(scores[c], errors="coerce")
        bad = col.isna() | (col != np.round(col))
        if bad.any():
            raise ValueError(f"scores column {c!r} must hold integers, got {scores[c][bad].iloc[0]!r}")
        out[c] = col.to_numpy(dtype=np.int64)  # by position: ``scores`` may have any index
    out["value"] = pd.to_numeric(scores["value"], errors="coerce").to_numpy(dtype=np.float64)
    dup = out.duplicated(["subject", *CELL_KEYS])
    if dup.any():
        row = out[dup].iloc[0]
        raise ValueError("scores has more than one row for subject " + ", ".join(
            f"{k}={row[k]}" for k in ("subject", *CELL_KEYS)))
    extra = [c for c in scores.columns if c not in SCORE_COLUMNS]
    for c in extra:
        out[c] = scores[c].to_numpy()
    out["_m"] = out["measure"].map({m: i for i, m in enumerate(_measure_order(out["measure"].unique()))})
    out = out.sort_values(["model", "condition", "layer", "dim", "roi", "_m", "subject"], kind="stable")
    return out[[*SCORE_COLUMNS, *extra]].reset_index(drop=True)


def _wide(scores: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Subject × cell matrix (n_subjects, n_cells) with NaN where missing, and the cells (n_cells rows of
    CELL_KEYS) in the canonical order of ``validate_scores``."""
    cells = scores[list(CELL_KEYS)].drop_duplicates().reset_index(drop=True)
    subjects = sorted(scores["subject"].unique())
    col = pd.MultiIndex.from_frame(cells)
    idx = pd.MultiIndex.from_frame(scores[list(CELL_KEYS)])
    x = np.full((len(subjects), len(cells)), np.nan)
    x[pd.Index(subjects).get_indexer(scores["subject"]), col.get_indexer(idx)] = scores["value"].to_numpy()
    return x, cells


# --- tests -----------------------------------------------------------------------------------------------


def _sign_matrix(n: int) -> np.ndarray:
    """All 2^n sign patterns, (2^n, n) of ±1.0 (row 0 is the identity)."""
    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    return 1.0 - 2.0 * bits


def _count_extreme(signs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per column of x (n, C), how many rows of ``signs @ x`` reach |observed sum| (two-sided), in blocks."""
    obs = np.abs(x.sum(0))
    # sums equal by symmetry may differ by rounding: count a flip as extreme within 1e-10 of the cell's scale
    tol = 1e-10 * np.abs(x).sum(0)
    counts = np.zeros(x.shape[1], dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(len(signs), 1))
    for s in range(0, x.shape[1], step):
        t = signs @ x[:, s:s + step]
        np.abs(t, out=t)
        counts[s:s + step] = np.count_nonzero(t >= obs[s:s + step] - tol[s:s + step], axis=0)
    return counts


def _present_first(x: np.ndarray) -> np.ndarray:
    """Each column's defined values moved to the top (in subject order), NaN below."""
    order = np.argsort(np.isnan(x), axis=0, kind="stable")
    return np.take_along_axis(x, order, axis=0)


def signflip_p(x: np.ndarray, *, n_perm: int = 10000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip permutation p-value of mean = 0, for every column at once.

    Parameters
    ----------
    x : array of shape (n_subjects, n_cells)
        One value (or paired difference) per subject and cell; NaN = missing (that cell's n is smaller).
    n_perm : int
        Cells whose n has 2^n ≤ n_perm are enumerated exactly (p = share of all 2^n flips at least as extreme,
        identity included); the others get n_perm random flips, shared by all cells, from
        ``np.random.default_rng(seed)``, p = (count + 1) / (n_perm + 1) (never 0).

    Returns
    -------
    p : array of shape (n_cells,)
        NaN where n < 2.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"signflip_p needs an (n_subjects, n_cells) array, got shape {x.shape}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be ≥ 1, got {n_perm}")
    n = (~np.isnan(x)).sum(0)
    p = np.full(x.shape[1], np.nan)
    compact = np.nan_to_num(_present_first(x))
    exact_max = int(math.floor(math.log2(n_perm)))
    mc = (n >= 2) & (n > exact_max)
    for k in np.unique(n[(n >= 2) & (n <= exact_max)]):
        cols = np.flatnonzero(n == k)
        p[cols] = _count_extreme(_sign_matrix(int(k)), compact[:k, cols]) / 2.0**k
    if mc.any():
        # a missing value is a 0, whose flip changes nothing: the same flips serve every n
        rng = np.random.default_rng(seed)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(n_perm, x.shape[0]))
        cols = np.flatnonzero(mc)
        p[cols] = (_count_extreme(signs, np.nan_to_num(x[:, cols])) + 1) / (n_perm + 1)
    return p


def wilcoxon_test(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's two-sided Wilcoxon signed-rank test of every column: (statistic, p), each (n_cells,).

    x : (n_subjects, n_cells), NaN = missing; columns with the same n are tested in one vectorised call.
    NaN where n < 2; scipy's defaults otherwise (zeros dropped, exact distribution for small n).
    """
    x = np.asarray(x, dtype=np.float64)
    n = (~np.isnan(x)).sum(0)
    stat, p = np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    compact = _present_first(x)
    for k in np.unique(n[n >= 2]):
        cols = np.flatnonzero(n == k)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zeros / ties: scipy switches to the normal approximation and says so
            res = stats.wilcoxon(compact[:k, cols], axis=0)
        stat[cols], p[cols] = res.statistic, res.pvalue
    return stat, p


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q) over the finite entries of p (shape kept; NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def describe(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per column of x (n_subjects, n_cells), NaN = missing: n, mean, sem, t (= mean / sem) and Cohen's d
    (= mean / sd, d_z for paired differences); NaN where undefined (n < 2 or sd = 0)."""
    n = (~np.isnan(x)).sum(0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the answer
        mean = np.nanmean(x, axis=0)
        sd = np.nanstd(x, axis=0, ddof=1)
    sd = np.where(n >= 2, sd, np.nan)
    with np.errstate(all="ignore"):
        sem = sd / np.sqrt(n)
        t = np.where(sd > 0, mean / sem, np.nan)
        d = np.where(sd > 0, mean / sd, np.nan)
    return {"n": n, "estimate": mean, "sem": sem, "t": t, "effect_size": d}


# --- the group table -------------------------------------------------------------------------------------


def _check_comparison(c: Comparison, cells: pd.DataFrame, values: dict[str, set[str]]) -> None:
    if set(c.a) != set(c.b):
        raise ValueError(f"comparison {c.name!r}: cells A and B must name the same keys, got {sorted(c.a)} and "
                         f"{sorted(c.b)}")
    if not c.a:
        raise ValueError(f"comparison {c.name!r} names no key")
    if all(key_str(c.a[k]) == key_str(c.b[k]) for k in c.a):
        raise ValueError(f"comparison {c.name!r}: cells A and B are the same ({c.a})")
    for side in (c.a, c.b):
        for k, v in side.items():
            if k not in CELL_KEYS:
                raise ValueError(f"comparison {c.name!r} names unknown key {k!r} (keys: {', '.join(CELL_KEYS)})")
            if key_str(v) not in values[k]:
                raise ValueError(f"comparison {c.name!r}: unknown {k} {key_str(v)!r} (scores have: "
                                 f"{', '.join(sorted(values[k]))})")


def _paired(x: np.ndarray, cells: pd.DataFrame, text: pd.DataFrame, c: Comparison
            ) -> tuple[np.ndarray, pd.DataFrame]:
    """Differences A − B (n_subjects, n_pairs) and their key rows for one comparison; ``text`` = cells as str."""
    _check_comparison(c, cells, {k: set(text[k].unique()) for k in CELL_KEYS})
    named = list(c.a)
    free = [k for k in CELL_KEYS if k not in named]
    sides = []
    for side in (c.a, c.b):
        mask = np.logical_and.reduce([text[k] == key_str(side[k]) for k in named])
        if not mask.any():
            raise ValueError(f"comparison {c.name!r}: no scores for " + ", ".join(f"{k}={key_str(side[k])}"
                                                                                 for k in named))
        sides.append(cells[mask].reset_index(names="_col"))
    pairs = sides[0].merge(sides[1][["_col", *free]], on=free, suffixes=("_a", "_b"), sort=False)
    if pairs.empty:
        raise ValueError(f"comparison {c.name!r}: cells A and B share no {'/'.join(free)} to pair")
    keys = pairs[free].copy()
    for k in named:
        keys[k] = key_str(c.a[k]) if key_str(c.a[k]) == key_str(c.b[k]) else ""
        if k in _INT_KEYS and keys[k].iloc[0] != "":
            keys[k] = int(keys[k].iloc[0])
    keys["test"], keys["contrast"] = "paired", c.name
    return x[:, pairs["_col_a"].to_numpy()] - x[:, pairs["_col_b"].to_numpy()], keys


def group_table(scores: pd.DataFrame, comparisons: list[Comparison], *, alpha: float = 0.05, n_perm: int = 10000,
                seed: int = 0, test: str = "signflip") -> pd.DataFrame:
    """The group statistics of a study: one row per tested effect (``group.tsv``; module docstring).

    Parameters
    ----------
    scores : DataFrame, n_subjects × n_cells rows (at most)
        Tidy per-subject scores with columns :data:`SCORE_COLUMNS`.
    comparisons : list of Comparison
        Paired tests; each is run for every matching combination of the keys it does not name.
    alpha : float
        FDR level: ``significant`` = q ≤ alpha.
    n_perm, seed : int
        Sign-flip permutations (exact enumeration where 2^n ≤ n_perm) and the RNG seed (:func:`signflip_p`).
    test : {"signflip", "wilcoxon"}
        Sign-flip permutation of the mean (default, see module docstring) or scipy's Wilcoxon signed-rank.

    Returns
    -------
    DataFrame with columns :data:`GROUP_COLUMNS`: one-sample rows first (cell order), then paired rows in the
    order of ``comparisons``. ``stat`` is the t statistic (signflip) or Wilcoxon's W; ``estimate`` the mean
    across subjects (of A − B for paired rows); ``q`` NaN and ``significant`` False where n < 2.
    ``.attrs["group_test"]`` records test, n_perm, seed and alpha.

    Raises ValueError on a missing column, a duplicated row, a bad option, or a comparison naming an unknown
    key or value (the message names it).
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = [c.name for c in comparisons]
    if len(set(names)) != len(names):
        raise ValueError(f"comparison names must be unique, got {names}")
    tidy = validate_scores(scores)
    x, cells = _wide(tidy)
    blocks, keys = [x], [cells.assign(test="one_sample", contrast="")]
    text = cells.astype(str)
    for c in comparisons:
        diff, k = _paired(x, cells, text, c)
        blocks.append(diff)
        keys.append(k)
    x_all = np.concatenate(blocks, axis=1)
    rows = pd.concat(keys, ignore_index=True)[list(KEY_COLUMNS)]
    d = describe(x_all)
    if test == "signflip":
        stat, p = d["t"], signflip_p(x_all, n_perm=n_perm, seed=seed)
    else:
        stat, p = wilcoxon_test(x_all)
    q = bh_q(p)
    rows["n"] = d["n"].astype(np.int64)
    rows["estimate"], rows["sem"], rows["stat"], rows["p"], rows["q"] = d["estimate"], d["sem"], stat, p, q
    rows["significant"] = np.nan_to_num(q, nan=np.inf) <= alpha
    rows["effect_size"] = d["effect_size"]
    rows = rows[list(GROUP_COLUMNS)]
    rows.attrs["group_test"] = {"test": test, "n_perm": n_perm, "seed": seed, "alpha": alpha}
    return rows


# --- known answer ----------------------------------------------------------------------------------------


def match_truth(group: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Truth rows (KEY_COLUMNS + ``planted_sign``) joined to their group rows on the key columns (compared as
    text, so tables read back from TSV match): truth's columns + estimate, q, significant, ``found`` (a group row
    exists) and ``recovered`` (the truth came back: a planted effect significant with its sign, a null not
    significant)."""
    missing = [c for c in (*KEY_COLUMNS, "planted_sign") if c not in truth.columns]
    if missing:
        raise ValueError(f"truth lacks column(s) {', '.join(map(repr, missing))}")
    missing = [c for c in (*KEY_COLUMNS, "estimate", "significant") if c not in group.columns]
    if missing:
        raise ValueError(f"group table lacks column(s) {', '.join(map(repr, missing))}")
    g = group.copy()
    t = truth.copy()
    for df in (g, t):
        for k in KEY_COLUMNS:
            df["_" + k] = df[k].map(key_str)
    on = ["_" + k for k in KEY_COLUMNS]
    g = g.drop_duplicates(on)
    extra = [c for c in ("estimate", "q", "significant") if c in g.columns]
    m = t.merge(g[on + extra], on=on, how="left", indicator=True)
    m["found"] = m.pop("_merge") == "both"
    m["planted_sign"] = pd.to_numeric(m["planted_sign"]).astype(np.int64)
    m["significant"] = m["significant"].isin([True, "True", "true"]) & m["found"]  # bool, or text from a TSV
    sign = np.sign(pd.to_numeric(m["planted_sign"]).to_numpy())
    est_sign = np.sign(m["estimate"].to_numpy(dtype=np.float64))
    m["recovered"] = np.where(sign == 0, ~m["significant"], m["significant"] & (est_sign == sign))
    return m.drop(columns=on)


def recovery(group: pd.DataFrame, truth: pd.DataFrame) -> Recovery:
    """How the group table recovers the planted effects of ``truth`` (KEY_COLUMNS + ``planted_sign`` −1/0/+1).

    Group rows that the truth does not list are not counted."""
    m = match_truth(group, truth)
    sign = np.sign(pd.to_numeric(m["planted_sign"]).to_numpy())
    planted, null = sign != 0, sign == 0
    sig = m["significant"].to_numpy()
    rec = m["recovered"].to_numpy()
    wrong = int((planted & sig & ~rec).sum())
    n_null_sig = int((null & sig).sum())
    n_sig = int(sig.sum())
    return Recovery(
        n_planted=int(planted.sum()), n_planted_recovered=int((planted & rec).sum()), n_planted_wrong_sign=wrong,
        n_null=int(null.sum()), n_null_significant=n_null_sig, n_significant=n_sig,
        observed_fdr=(n_null_sig + wrong) / n_sig if n_sig else 0.0,
        null_rejection_rate=n_null_sig / int(null.sum()) if null.any() else float("nan"),
        n_missing=int((~m["found"]).sum()))
