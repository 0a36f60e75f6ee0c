"""Client-scaling figure and table pieces shared by the tiers (``figures.llm``, ``figures.mnist``).

A scaling sweep runs each rule at several client counts K (same seeds at every K), on one or more
partitions and ranks, plus centralised training as the reference. Records carry ``method``,
``partition``, ``rank``, ``clients``, ``seed``, ``final_test_accuracy`` and ``rounds_done``.

- cells: (rule, partition, rank, K) → final test accuracies over seeds;
- the figure: one panel per (rank, partition) (IID first), accuracy against K on a log axis, the mean
  over seeds as a line and a band (min..max, or ±1 sample std with ddof=1), centralised dashed;
- the table: mean ± sample std (ddof=1) per rule × K, the change from the fewest to the most clients,
  and paired differences over seeds with 95% t-intervals (``figures.stats``).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.ticker import NullFormatter

from .common import plt
from .stats import format_paired, holm, paired_test, summary

__all__ = ["CENTRAL", "PAIRS", "ordered", "partitions", "scaling_cells", "rounds_per_clients", "plot_scaling",
           "scaling_blocks", "paired_lines", "holm_line"]

CENTRAL = "centralised"
PAIRS = (("rolora", "fedavg"), ("ffa", "fedavg"), ("rolora-chain", "rolora"), ("fedavg-chain", "fedavg"),
         ("ffa-chain", "ffa"))


def ordered(methods, order) -> list[str]:
    """``methods`` in the tier's ``order`` (unknown ones last, alphabetically)."""
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def partitions(cells) -> list[str]:
    """The partitions present in ``cells``, IID first, then alphabetically."""
    return sorted({k[1] for k in cells if k[1] is not None}, key=lambda x: (x != "iid", x))


def scaling_cells(runs: list[dict], rankless=()) -> dict:
    """(method, partition, rank, clients) -> final test accuracies over seeds. Rank-free rules
    (``rankless``) run once and count under every rank; centralised is keyed (CENTRAL, None, rank, None)."""
    ranks = sorted({r["rank"] for r in runs if r["method"] not in rankless})
    cells = defaultdict(list)
    for r in runs:
        acc = r["final_test_accuracy"]
        if acc is None:
            continue
        if r["method"] == CENTRAL:
            cells[(CENTRAL, None, r["rank"], None)].append(acc)
            continue
        for rank in (ranks if r["method"] in rankless else [r["rank"]]):
            cells[(r["method"], r["partition"], rank, r["clients"])].append(acc)
    return cells


def rounds_per_clients(runs: list[dict]) -> dict:
    """clients -> the rounds its runs did (``"a/b"`` when runs with that many clients differ)."""
    seen = defaultdict(set)
    for r in runs:
        if r["method"] != CENTRAL:
            seen[r["clients"]].add(r["rounds_done"])
    return {c: "/".join(str(x) for x in sorted(v)) for c, v in seen.items()}


def _band(ys: list[np.ndarray], band: str) -> tuple[list[float], list[float]]:
    """Lower and upper edge per x: ``"minmax"`` (range over seeds) or ``"std"`` (mean ± sample std)."""
    if band == "minmax":
        return [y.min() for y in ys], [y.max() for y in ys]
    if band == "std":
        stats = [summary(y)[:2] for y in ys]
        return [mu - sd for mu, sd in stats], [mu + sd for mu, sd in stats]
    raise ValueError(f"band={band!r}; choose 'minmax' or 'std'")


def _draw_rule(ax, cells, method, part, rank, style: dict, band: str) -> None:
    """One rule on one panel: the mean over seeds against clients, with its band."""
    ks = sorted(k for k in cells if k[0] == method and k[1] == part and k[2] == rank)
    if not ks:
        return
    X = np.array([k[3] for k in ks], dtype=float)
    Y = [np.asarray(cells[k], dtype=float) for k in ks]
    ax.plot(X, [y.mean() for y in Y], marker="o", ms=4, label=f"{method} (n={min(len(y) for y in Y)})", **style)
    lo, hi = _band(Y, band)
    ax.fill_between(X, lo, hi, color=style.get("color"), alpha=0.15)


def plot_scaling(runs: list[dict], *, order, rankless=(), band: str = "minmax", styles: dict | None = None,
                 xlabel: str = "clients"):
    """Final test accuracy against the number of clients (log axis, ticks at the client counts): one
    panel per (rank, partition), one line per rule (mean over seeds) with a band (``band``, see
    ``_band``), centralised as a dashed horizontal line at its mean. ``styles``: rule -> plot kwargs
    (default: colour C0, C1, ... in ``order``)."""
    cells = scaling_cells(runs, rankless)
    parts = partitions(cells)
    ranks = sorted({k[2] for k in cells if k[1] is not None})
    methods = ordered({k[0] for k in cells if k[0] != CENTRAL}, order)
    if styles is None:
        styles = {m: dict(color=f"C{i}") for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(ranks), len(parts), figsize=(5.2 * len(parts), 3.8 * len(ranks)), squeeze=False,
                             sharey=True)
    for i, rank in enumerate(ranks):
        for j, part in enumerate(parts):
            ax = axes[i][j]
            for m in methods:
                _draw_rule(ax, cells, m, part, rank, styles.get(m, {}), band)
            c = cells.get((CENTRAL, None, rank, None))
            if c:
                mu = float(np.mean(c))
                ax.axhline(mu, color="k", ls="--", lw=1, label=f"centralised {mu:.3f} (n={len(c)})")
            ax.set_xscale("log")
            xs = sorted({k[3] for k in cells if k[1] == part})
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{part}, rank {rank}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("final test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _rule_row(cells, method, part, rank, clients) -> str:
    """``| rule | mean ± std (n=…) per clients | change fewest → most clients |`` (— where missing)."""
    row, means = [], {}
    for c in clients:
        xs = cells.get((method, part, rank, c))
        if xs:
            mu, sd, _, n = summary(xs)
            means[c] = mu
            row.append(f"{mu:.3f} ± {sd:.3f} (n={n})")
        else:
            row.append("—")
    drop = f"{means[clients[-1]] - means[clients[0]]:+.3f}" if len(means) == len(clients) else "—"
    return f"| {method} | " + " | ".join(row) + f" | {drop} |"


def scaling_blocks(runs: list[dict], *, order, rankless=()) -> list[str]:
    """Markdown lines: one block per (rank, partition), a row per rule (mean ± sample std over seeds,
    n, and the change from the fewest to the most clients), the rounds of each column, centralised
    last; then the paired block (``paired_lines``)."""
    cells = scaling_cells(runs, rankless)
    parts = partitions(cells)
    ranks = sorted({k[2] for k in cells if k[1] is not None})
    clients = sorted({k[3] for k in cells if k[1] is not None})
    methods = ordered({k[0] for k in cells if k[0] != CENTRAL}, order)
    rounds = rounds_per_clients(runs)
    lines = []
    for rank in ranks:
        for part in parts:
            lines += [f"**{part}, rank {rank}** (test accuracy, mean ± std over seeds; n = seeds)", "",
                      "| rule | " + " | ".join(f"{c} clients ({rounds.get(c, '?')} rounds)" for c in clients)
                      + f" | {clients[0]} → {clients[-1]} |",
                      "|---|" + "---|" * (len(clients) + 1)]
            lines += [_rule_row(cells, m, part, rank, clients) for m in methods]
            c = cells.get((CENTRAL, None, rank, None))
            if c:
                mu, sd, _, n = summary(c)
                lines.append(f"| centralised | {mu:.3f} ± {sd:.3f} (n={n}), same total steps |" + " |" * len(clients))
            lines.append("")
    return lines + paired_lines(runs, parts, ranks, clients)


def _by_seed(runs: list[dict]) -> dict:
    """(method, partition, rank, clients) -> {seed: final test accuracy} (a later record replaces an earlier)."""
    out = defaultdict(dict)
    for r in runs:
        if r["final_test_accuracy"] is not None:
            out[(r["method"], r["partition"], r["rank"], r["clients"])][r["seed"]] = r["final_test_accuracy"]
    return out


def holm_line(tested: list[tuple[str, float]]) -> str:
    """One line for a table of paired comparisons: how many it makes and which survive Holm–Bonferroni
    over their paired t-test p-values (family = the table, family-wise 5%). ``tested``: (label, p)."""
    if not tested:
        return "No paired comparisons (fewer than 2 common seeds everywhere)."
    keep = holm([p for _, p in tested])
    names = [label for (label, _), ok in zip(tested, keep) if ok]
    return (f"{len(tested)} paired comparisons in this table; surviving a Holm–Bonferroni correction over them "
            f"(paired t-test p, family-wise 5%): {len(names)}" + (": " + "; ".join(names) if names else "") + ".")


def paired_lines(runs: list[dict], parts, ranks, clients, pairs=PAIRS) -> list[str]:
    """Paired differences over seeds (same seed = same partition, init and batch order): mean and
    95% t-interval (``figures.stats.paired``); a difference counts only when its interval excludes 0.
    The last line counts the comparisons and names those that survive a Holm correction over the table."""
    acc = _by_seed(runs)
    lines = ["**Paired differences** (same seeds; mean [95% t-interval]; **bold** when the interval excludes 0)", "",
             "| partition, rank | pair | " + " | ".join(f"{c} clients" for c in clients) + " |",
             "|---|---|" + "---|" * len(clients)]
    tested = []
    for rank in ranks:
        for part in parts:
            for a, b in pairs:
                row = []
                for c in clients:
                    mean, lo, hi, n, p = paired_test(acc.get((a, part, rank, c), {}), acc.get((b, part, rank, c), {}))
                    row.append(format_paired(mean, lo, hi) if n >= 2 else "—")
                    if n >= 2:
                        tested.append((f"{a} − {b} ({part}, r{rank}, {c} clients)", p))
                if any(x != "—" for x in row):
                    lines.append(f"| {part}, r{rank} | {a} − {b} | " + " | ".join(row) + " |")
    return lines + ["", holm_line(tested), ""]
