"""The statistics behind every table and band in ``figures`` (one place, shared by the tiers).

Over n seeds with values x_1..x_n:

- mean  x̄ = (1/n) Σ x_i
- sample std  s = sqrt( Σ (x_i − x̄)² / (n − 1) )   (ddof = 1; undefined for n = 1 → nan)
- 95% t-interval for the mean  x̄ ± h,  h = t_{0.975, n−1} · s / √n

Paired comparison of two rules over the seeds both ran (same seed = same data split, init and batch
order): d_i = a_i − b_i, and the interval above applied to the d_i. A difference is *significant* when
its interval excludes 0.

t_{0.975, ν} is the published 3-decimal value for ν = 1..30; beyond that the Cornish–Fisher expansion
of the t quantile in 1/ν (Abramowitz & Stegun 26.7.5), whose error there is far below 1e-4.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["t975", "summary", "paired", "significant", "tail_mean", "format_paired"]

# t_{0.975, dof}, dof = 1..30 (standard tables, 3 decimals).
T975_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
              10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
              19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056,
              27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
Z975 = 1.959963984540054  # the standard normal's 0.975 quantile


def t975(dof: int) -> float:
    """t_{0.975, dof}: the two-sided 95% quantile of Student's t with ``dof`` degrees of freedom.

    Table for dof ≤ 30; for larger dof, with z = z_{0.975} and ν = dof,
    t ≈ z + g1/ν + g2/ν² + g3/ν³ + g4/ν⁴ with
    g1 = (z³ + z)/4, g2 = (5z⁵ + 16z³ + 3z)/96, g3 = (3z⁷ + 19z⁵ + 17z³ − 15z)/384,
    g4 = (79z⁹ + 776z⁷ + 1482z⁵ − 1920z³ − 945z)/92160.
    """
    if dof < 1:
        raise ValueError(f"dof={dof}; a t-interval needs at least 1 degree of freedom (2 values)")
    if dof in T975_TABLE:
        return T975_TABLE[dof]
    z, v = Z975, float(dof)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


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


def paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """Paired difference a − b over the seeds both dicts (seed → value) hold:
    (mean d̄, lower d̄ − h, upper d̄ + h, n) with d_i = a_i − b_i and h the 95% t half-width of the d_i.
    Bounds are nan for n = 1; n = 0 gives all nan."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    mean, _, h, n = summary(d)
    return mean, mean - h, mean + h, n


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
