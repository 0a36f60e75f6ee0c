"""The client-scaling claim's own quantity: the drop in accuracy from few to many clients, paired by seed.

A scaling sweep runs each rule at client counts K_0 < … (same seeds at every K: seed s fixes the
init, the data order and the split's randomness). Per rule, partition and rank:

- **drop** K_0 → K, per seed: D_s = acc_s(K_0) − acc_s(K) (positive = accuracy lost with more clients),
  K_0 the fewest clients, K = 50 (and the most clients when that is more than 50);
- **difference of drops** between two rules, per seed: D_s(a) − D_s(b) (negative = a loses less than b):
  rolora − fedavg, and each chained rule − its unchained rule;
- **gain over head-only** (LLM tier, when the ``head-only`` baseline ran): acc_s(rule) − acc_s(head-only)
  at each K.

Each is reported as mean [95% t-interval] over the seeds (``figures.stats.paired``) with the paired
t-test's two-sided p-value. Every table is one family: it says how many comparisons it makes, and marks
with † those that survive a Holm–Bonferroni correction over its p-values at family-wise level 0.05.
"""
from __future__ import annotations

from collections import defaultdict

from .scaling import CENTRAL, ordered, partitions
from .stats import holm, paired_test

__all__ = ["DROP_PAIRS", "HEAD_ONLY", "seed_cells", "drop_by_seed", "drop_targets", "comparison_table",
           "drop_rows", "drop_difference_rows", "head_only_rows", "drops_markdown"]

DROP_PAIRS = (("rolora", "fedavg"), ("rolora-chain", "rolora"), ("fedavg-chain", "fedavg"), ("ffa-chain", "ffa"))
HEAD_ONLY = "head-only"
ALPHA = 0.05


def seed_cells(runs: list[dict], rankless=()) -> dict:
    """(method, partition, rank, clients) -> {seed: final test accuracy} over the federated runs (a later
    record of the same seed replaces an earlier); rank-free rules count under every rank."""
    ranks = sorted({r["rank"] for r in runs if r["method"] not in rankless and r["method"] != CENTRAL})
    cells = defaultdict(dict)
    for r in runs:
        if r["method"] == CENTRAL or r.get("final_test_accuracy") is None:
            continue
        for rank in (ranks if r["method"] in rankless else [r["rank"]]):
            cells[(r["method"], r["partition"], rank, r["clients"])][r["seed"]] = r["final_test_accuracy"]
    return cells


def drop_by_seed(cells: dict, method: str, part, rank, k0: int, k1: int) -> dict:
    """seed -> acc(k0) − acc(k1) over the seeds the rule ran at both client counts."""
    a, b = cells.get((method, part, rank, k0), {}), cells.get((method, part, rank, k1), {})
    return {s: round(a[s] - b[s], 12) for s in sorted(set(a) & set(b))}


def drop_targets(clients, end: int = 50) -> tuple[int, list[int]]:
    """(K_0, targets): the fewest clients, and ``end`` (when run) plus the most clients when more than ``end``."""
    ks = sorted(set(clients))
    if len(ks) < 2:
        return (ks[0] if ks else 0), []
    targets = sorted({k for k in ks[1:] if k == end or (k == ks[-1] and k > end)}) or [ks[-1]]
    return ks[0], targets


def _fmt_p(p: float) -> str:
    return "–" if p != p else ("<1e-4" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}")


def comparison_table(title: str, head: list[str], rows: list[tuple[list[str], dict, dict]]) -> list[str]:
    """Markdown lines of one family of paired comparisons. ``rows``: (label cells, a, b) with a, b
    seed -> value; each comparison is a − b over the common seeds (mean [95% t-interval], n, paired
    t-test p). Comparisons with fewer than 2 common seeds are left out; the rest are the family of the
    Holm correction, and the line under the title says how many there are and how many survive."""
    tested = []
    for labels, a, b in rows:
        mean, lo, hi, n, p = paired_test(a, b)
        if n >= 2:
            tested.append((labels, mean, lo, hi, n, p))
    if not tested:
        return []
    keep = holm([t[5] for t in tested], ALPHA)
    m = len(tested)
    lines = [f"**{title}**", "",
             f"{m} comparison{'s' if m != 1 else ''} in this table (one family); † = survives the Holm–Bonferroni "
             f"correction at family-wise 5% ({sum(keep)} of {m}); **bold** = the 95% t-interval excludes 0 "
             "(uncorrected).", "",
             "| " + " | ".join(head) + " | n | mean [95% t-interval] | p (paired t) | Holm |",
             "|" + "---|" * (len(head) + 4)]
    for (labels, mean, lo, hi, n, p), ok in zip(tested, keep):
        cell = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        cell = f"**{cell}**" if (lo > 0 or hi < 0) else cell
        lines.append("| " + " | ".join(labels) + f" | {n} | {cell} | {_fmt_p(p)} | {'†' if ok else ''} |")
    return lines + [""]


def _blocks(cells):
    """(partition, rank) blocks present in ``cells``, IID first."""
    ranks = sorted({k[2] for k in cells})
    return [(part, rank) for rank in ranks for part in partitions(cells)]


def drop_rows(cells: dict, methods, k0: int, targets, rankless=()) -> list:
    """One row per (partition, rank, rule, target K): the drop K_0 → K against 0. A rank-free rule
    (``rankless``) counts once, under the lowest rank."""
    rows = []
    low = min((k[2] for k in cells), default=None)
    for part, rank in _blocks(cells):
        for m in methods:
            if m in rankless and rank != low:
                continue
            for k1 in targets:
                d = drop_by_seed(cells, m, part, rank, k0, k1)
                rows.append(([f"{part}, r{rank}", m, f"{k0} → {k1}"], d, {s: 0.0 for s in d}))
    return rows


def drop_difference_rows(cells: dict, k0: int, targets, pairs=DROP_PAIRS) -> list:
    """One row per (partition, rank, pair a − b, target K): drop(a) − drop(b), paired by seed."""
    rows = []
    for part, rank in _blocks(cells):
        for a, b in pairs:
            for k1 in targets:
                rows.append(([f"{part}, r{rank}", f"{a} − {b}", f"{k0} → {k1}"],
                              drop_by_seed(cells, a, part, rank, k0, k1), drop_by_seed(cells, b, part, rank, k0, k1)))
    return rows


def head_only_rows(cells: dict, methods) -> list:
    """One row per (partition, rank, rule, K): acc(rule) − acc(head-only), paired by seed."""
    rows = []
    clients = sorted({k[3] for k in cells})
    for part, rank in _blocks(cells):
        for m in methods:
            if m == HEAD_ONLY:
                continue
            for k in clients:
                rows.append(([f"{part}, r{rank}", f"{m} − {HEAD_ONLY}", f"{k}"], cells.get((m, part, rank, k), {}),
                             cells.get((HEAD_ONLY, part, rank, k), {})))
    return rows


def drops_markdown(runs: list[dict], *, order, rankless=(), end: int = 50, note: str = "") -> str:
    """Markdown: the drop table, the difference-of-drops table and (when ``head-only`` ran) the gain
    over head-only table, each its own Holm family. Empty when fewer than two client counts ran."""
    cells = seed_cells(runs, rankless)
    k0, targets = drop_targets([k[3] for k in cells], end)
    if not targets:
        return ""
    methods = ordered({k[0] for k in cells}, order)
    lines = [f"Drop in final test accuracy from {k0} clients, paired by seed: D_s = acc_s({k0}) − acc_s(K) "
             "(positive = accuracy lost with more clients); same seed = same init, data order and split "
             "randomness at every K. Mean over seeds [95% t-interval, t(0.975, n−1)·s/√n, ddof = 1] and the "
             "two-sided paired t-test p (scipy.stats)." + (f" {note}" if note else ""), ""]
    lines += comparison_table(f"Drop {k0} → K per rule (H0: no drop)", ["partition, rank", "rule", "clients"],
                              drop_rows(cells, methods, k0, targets, rankless))
    lines += comparison_table("Difference of drops, paired by seed: drop(a) − drop(b) (negative = a loses less)",
                              ["partition, rank", "a − b", "clients"], drop_difference_rows(cells, k0, targets))
    if any(k[0] == HEAD_ONLY for k in cells):
        lines += comparison_table("Gain over the head-only baseline (adapters frozen at init, only the head "
                                  "trained), paired by seed: acc(rule) − acc(head-only)",
                                  ["partition, rank", "rule − head-only", "clients"], head_only_rows(cells, methods))
    return "\n".join(lines) + "\n"
