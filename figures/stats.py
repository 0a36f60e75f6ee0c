"""The statistics behind every table and band in ``figures`` (one place, shared by the tiers).

Over n seeds with values x_1..x_n:

- mean  x̄ = (1/n) Σ x_i
- sample std  s = sqrt( Σ (x_i − x̄)² / (n − 1) )   (ddof = 1; undefined for n = 1 → nan)
- 95% t-interval for the mean  x̄ ± h,  h = t_{0.975, n−1} · s / √n

Paired comparison of two rules over the seeds both ran (same seed = same data split, init and batch
order): d_i = a_i − b_i, and the interval above applied to the d_i. A difference is *significant* when
its interval excludes 0. Its two-sided p-value is the paired t-test's (``scipy.stats.ttest_1samp`` on
the d_i, the same as ``ttest_rel`` on the pairs). A table of m such comparisons is one family: ``holm``
marks the ones that survive the Holm–Bonferroni correction at family-wise level 0.05.

t_{0.975, ν} is ``scipy.stats.t.ppf(0.975, ν)``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats as _st

__all__ = ["t975", "summary", "paired", "paired_test", "ttest_p", "holm", "significant", "tail_mean",
           "format_paired"]


def t975(dof: int) -> float:
    """t_{0.975, dof}: the two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"dof={dof}; a t-interval needs at least 1 degree of freedom (2 values)")
    return float(_st.t.ppf(0.975, dof))


def summary(xs) -> tuple[float, float, float, int]:
    """(mean x̄, sample std s with ddof=1, 95% half-width h = t_{0.975,n−1}·s/√n, n).
    For n = 1, s and h are nan (one seed says nothing about the spread)."""
    a = np.asarray(list(xs), dtype=float)
    n = int(a.size)
    if n == 0:
        raise ValueError("summary of no values")
    if n == 1:
        return float(a.mean()), float("nan"), float("nan"), 1
    sd = float(a.std(ddof=1))
    return float(a.mean()), sd, t975(n - 1) * sd / np.sqrt(n), n


def _diffs(a: dict, b: dict, seeds) -> np.ndarray:
    """a_s − b_s over ``seeds``, rounded to 12 decimals: equal gaps written differently (0.9 − 0.1 and
    0.85 − 0.05) are then equal, not 1e-17 apart (which would read as a significant constant)."""
    return np.round(np.array([a[s] - b[s] for s in seeds], dtype=float), 12)


def paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """Paired difference a − b over the seeds both dicts (seed → value) hold:
    (mean d̄, lower d̄ − h, upper d̄ + h, n) with d_i = a_i − b_i and h the 95% t half-width of the d_i.
    Bounds are nan for n = 1; n = 0 gives all nan."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    d = _diffs(a, b, seeds)
    mean, _, h, n = summary(d)
    return mean, mean - h, mean + h, n


def ttest_p(d) -> float:
    """Two-sided p-value of the one-sample t-test of mean(d) = 0 (``scipy.stats.ttest_1samp``; for
    paired differences d_i = a_i − b_i this is the paired t-test). nan for fewer than 2 values; when
    every d_i is the same the test is degenerate: p = 0 for a nonzero constant, 1 for all zeros."""
    d = np.asarray(list(d), dtype=float)
    if d.size < 2:
        return float("nan")
    if np.all(d == d[0]):
        return 0.0 if d[0] != 0 else 1.0
    with warnings.catch_warnings():  # near-constant d: scipy warns of precision loss, the p is still tiny
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_st.ttest_1samp(d, 0.0).pvalue)


def paired_test(a: dict, b: dict) -> tuple[float, float, float, int, float]:
    """``paired(a, b)`` plus the paired t-test's two-sided p-value: (mean, lo, hi, n, p)."""
    mean, lo, hi, n = paired(a, b)
    seeds = sorted(set(a) & set(b))
    return mean, lo, hi, n, ttest_p(_diffs(a, b, seeds))


def holm(pvalues, alpha: float = 0.05) -> list[bool]:
    """Holm–Bonferroni over one family of m p-values: sort them p_(1) ≤ … ≤ p_(m); reject H_(1..j−1)
    where j is the first rank with p_(j) > alpha / (m − j + 1) (all m when there is none). Returns, in
    the input's order, whether each hypothesis is rejected (survives the correction). A nan p (too
    few seeds to test) is not rejected and does not count in m."""
    ps = [float(x) for x in pvalues]
    idx = sorted((i for i, x in enumerate(ps) if not math.isnan(x)), key=lambda i: ps[i])
    m = len(idx)
    out = [False] * len(ps)
    for j, i in enumerate(idx):
        if ps[i] > alpha / (m - j):
            break
        out[i] = True
    return out


def significant(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] excludes 0 (False when it is undefined: nan bounds)."""
    return bool(lo > 0 or hi < 0)


def tail_mean(points, total_rounds: int, fraction: float = 0.1) -> float:
    """Mean of the values evaluated in the last k = ⌈fraction · total_rounds⌉ rounds of a run.

    ``points`` are (round index from 0, value); round t is in the window when t ≥ total_rounds − k.
    With an evaluation every round this is the mean of the last k evaluated rounds."""
    k = max(1, math.ceil(round(fraction * total_rounds, 9)))  # round(): 0.14 · 50 is 7.000000000000001
    window = [v for t, v in points if t >= total_rounds - k]
    if not window:
        raise ValueError(f"no evaluated round among the last {k} of {total_rounds}")
    return float(np.mean(window))


def format_paired(mean: float, lo: float, hi: float, *, digits: int = 3) -> str:
    """Markdown for a paired difference: ``+0.020 [+0.005, +0.035]``, **bold** when significant."""
    cell = f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"**{cell}**" if significant(lo, hi) else cell
