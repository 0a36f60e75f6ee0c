"""Differential-privacy figures and tables for both tiers, from the ``dp`` sweeps' run JSONs.

Each eval record of a ``dp`` sweep carries ``method``, ``seed``, ``final_test_accuracy``, its DP
target ``dp_epsilon`` (None: no DP) and ``dp`` (None, or the ε each client actually spent). Per tier:

- ``<tier>_dp_accuracy_vs_epsilon.{png,pdf}``: final test accuracy against ε (1, 3, 8, then ∞ = no DP
  at the right) per rule, mean over seeds with a ±1 sample-std band (ddof = 1);
- ``<tier>_dp_table.md``: mean ± sample std (n) per rule × ε, the largest ε any client spent in each
  column, and paired differences over seeds (rolora − ffa, rolora − fedavg, ffa − fedavg) with 95%
  t-intervals, bold when the interval excludes 0 (``figures.stats``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .common import plt, save_figure
from .stats import format_paired, paired, summary

__all__ = ["load_dp_runs", "dp_cells", "plot_dp", "dp_table", "make_all"]

TIERS = {"mnist": "mnist_toy", "llm": "llm_scale"}
ORDER = ("fedavg", "ffa", "rolora", "fedex", "flexlora")
PAIRS = (("rolora", "ffa"), ("rolora", "fedavg"), ("ffa", "fedavg"))


def _eps(rec: dict) -> float:
    e = rec.get("dp_epsilon", (rec.get("config") or {}).get("dp_epsilon"))
    return math.inf if e is None else float(e)


def load_dp_runs(results_dir: Path, tier: str) -> list[dict]:
    """The eval records of ``tier``'s ``dp`` sweep (``RESULTS/<tier folder>/dp/**``)."""
    runs = []
    for path in sorted((Path(results_dir) / TIERS[tier] / "dp").rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if (isinstance(rec, dict) and rec.get("role") == "eval" and rec.get("final_test_accuracy") is not None
                and rec.get("complete", True)):
            runs.append(rec)
    return runs


def dp_cells(runs: list[dict]) -> dict:
    """(method, ε) → {seed: final test accuracy}; ε = inf for runs without DP."""
    cells = defaultdict(dict)
    for r in runs:
        cells[(r["method"], _eps(r))][r["seed"]] = r["final_test_accuracy"]
    return cells


def _columns(cells) -> list[float]:
    return sorted({k[1] for k in cells}, key=lambda e: (math.isinf(e), e))


def _label(e: float) -> str:
    return "∞ (no DP)" if math.isinf(e) else f"{e:g}"


def _methods(cells) -> list[str]:
    return sorted({k[0] for k in cells}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def plot_dp(runs: list[dict], title: str):
    cells = dp_cells(runs)
    cols = _columns(cells)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    x = np.arange(len(cols))
    for i, m in enumerate(_methods(cells)):
        pts = [(j, list(cells[(m, e)].values())) for j, e in enumerate(cols) if cells.get((m, e))]
        xs = np.array([j for j, _ in pts])
        mu = np.array([summary(v)[0] for _, v in pts])
        sd = np.nan_to_num(np.array([summary(v)[1] for _, v in pts]))
        ax.plot(xs, mu, marker="o", ms=4, color=f"C{i}", label=f"{m} (n={min(len(v) for _, v in pts)})",
                lw=2 if m == "rolora" else 1.2)
        ax.fill_between(xs, mu - sd, mu + sd, color=f"C{i}", alpha=0.15)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(e) for e in cols])
    ax.set_xlabel("privacy target ε per client (δ = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def dp_table(runs: list[dict], title: str) -> str:
    cells = dp_cells(runs)
    cols = _columns(cells)
    spent, lrs = defaultdict(float), defaultdict(set)
    for r in runs:
        lr = r.get("lr", (r.get("config") or {}).get("lr"))
        if lr is not None:
            lrs[(r["method"], _eps(r))].add(float(lr))
        if r.get("dp"):
            spent[_eps(r)] = max(spent[_eps(r)], r["dp"]["epsilon_spent_max"])
    lines = [f"**{title}** (final test accuracy, mean ± sample std over seeds; n = seeds)", "",
             "| rule | " + " | ".join(f"ε = {_label(e)}" for e in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in _methods(cells):
        row = []
        for e in cols:
            v = list(cells.get((m, e), {}).values())
            if v:
                mu, sd, _, n = summary(v)
                row.append(f"{mu:.3f} ± {sd:.3f} (n={n})")
            else:
                row.append("—")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("| largest ε spent by any client | " + " | ".join(
        f"{spent[e]:.3f}" if e in spent else "—" for e in cols) + " |")
    lines += ["", "**Learning rate used** (tuned per rule and ε on the validation split by the tier's procedure)", "",
              "| rule | " + " | ".join(f"ε = {_label(e)}" for e in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in _methods(cells):
        lines.append(f"| {m} | " + " | ".join(", ".join(f"{x:g}" for x in sorted(lrs.get((m, e), ()))) or "—"
                                             for e in cols) + " |")
    lines += ["", "**Paired differences** (same seeds; mean [95% t-interval]; **bold** when it excludes 0)", "",
              "| pair | " + " | ".join(f"ε = {_label(e)}" for e in cols) + " |", "|---|" + "---|" * len(cols)]
    for a, b in PAIRS:
        row = []
        for e in cols:
            mean, lo, hi, n = paired(cells.get((a, e), {}), cells.get((b, e), {}))
            row.append(format_paired(mean, lo, hi) + f" (n={n})" if n >= 2 else "—")
        if any(c != "—" for c in row):
            lines.append(f"| {a} − {b} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    titles = {"mnist": "MNIST toy, 10 clients × 1 label, rank 8, DP-SGD per client",
              "llm": "MiniLM on the tweets, 3 clients, DP-SGD per client"}
    for tier, title in titles.items():
        runs = load_dp_runs(results_dir, tier)
        if not runs:
            continue
        written += save_figure(plot_dp(runs, title), out_dir, f"{tier}_dp_accuracy_vs_epsilon")
        path = Path(out_dir) / f"{tier}_dp_table.md"
        path.write_text(dp_table(runs, title))
        written.append(path)
    return written
