"""The averaging error the papers argue about, per round, from the run records of either tier.

Records written since issue 20 carry, in each entry of ``rounds``, ``averaging_error`` =
{"relative": e_t or null, "error": ‖Σ_k p_k Δ_k − Δ_server‖_F, "update": ‖Σ_k p_k Δ_k − Δ_prev‖_F}
(summed over the adapted matrices; e_t = error / update, 0 up to float rounding for exact rules;
``fedlora.averaging_error``). Older records lack it and are skipped, as are rounds whose value is
null and centralised runs.

- ``plot_error_per_round``: e_t against the round, one line per rule (mean over seeds, band min..max),
  one panel per cell (partition, clients, local work, rank), log y (a rule whose e_t is never positive
  is named in the legend as exact and not drawn);
- ``plot_accuracy_vs_error``: final test accuracy against the run's mean e_t over its rounds, one point
  per run coloured by rule, marker by client count, one panel per (partition, local work, rank).

``make_all`` draws both for every sweep (tier and preset folder) whose eval records carry the key:
``<tier>_<sweep>_averaging_error_vs_round`` and ``<tier>_<sweep>_accuracy_vs_averaging_error``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from . import llm, mnist
from .common import plt, save_figure
from .scaling import CENTRAL, ordered

__all__ = ["error_series", "has_error", "cell_of", "mean_error", "plot_error_per_round", "plot_accuracy_vs_error",
           "error_runs", "make_all"]

ORDER = tuple(dict.fromkeys(mnist.ORDER + llm.METHOD_ORDER))


def error_series(r: dict) -> list[tuple[int, float]]:
    """(round index from 0, relative error e_t) for the rounds of ``r`` that record one."""
    out = []
    for i, e in enumerate(r.get("rounds") or []):
        ae = e.get("averaging_error") if isinstance(e, dict) else None
        if isinstance(ae, dict) and ae.get("relative") is not None:
            out.append((int(e.get("round", i)), float(ae["relative"])))
    return out


def has_error(r: dict) -> bool:
    return r.get("method") != CENTRAL and bool(error_series(r))


def mean_error(r: dict) -> float:
    """The run's mean relative averaging error over the rounds that record one."""
    return float(np.mean([v for _, v in error_series(r)]))


def _work(r: dict) -> str:
    if r.get("local_work"):
        return r["local_work"]
    steps = (r.get("config") or {}).get("local_steps")
    return f"{steps} steps" if steps else "?"


def cell_of(r: dict) -> tuple:
    """(partition, clients, local work, rank): the panel a run belongs to."""
    return (r.get("partition"), r.get("clients"), _work(r), r.get("rank"))


def _work_key(work: str) -> tuple:
    head = str(work).split()[0]
    return (0, float(head)) if head.replace(".", "", 1).isdigit() else (1, str(work))


def _cell_key(c: tuple):
    return (c[0] != "iid", str(c[0]), c[1] or 0, _work_key(c[2]), c[3] or 0)


def _colours(methods) -> dict:
    """rule -> colour; a chained rule takes its unchained rule's colour (drawn dotted / hollow)."""
    bases = list(dict.fromkeys(m.removesuffix("-chain") for m in methods))
    return {m: f"C{bases.index(m.removesuffix('-chain')) % 10}" for m in methods}


def _grid(n: int, w: float = 4.4, h: float = 3.4):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_error_per_round(runs: list[dict]):
    """e_t against the round (1-based), per rule the mean over seeds at each recorded round with a min..max
    band, one panel per cell, log y."""
    runs = [r for r in runs if has_error(r)]
    cells = sorted({cell_of(r) for r in runs}, key=_cell_key)
    methods = ordered({r["method"] for r in runs}, ORDER)
    colour = _colours(methods)
    fig, axes = _grid(max(len(cells), 1))
    for ax, cell in zip(axes, cells):
        here = [r for r in runs if cell_of(r) == cell]
        for m in ordered({r["method"] for r in here}, ORDER):
            group = [r for r in here if r["method"] == m]
            per_round = defaultdict(list)
            for r in group:
                for t, v in error_series(r):
                    per_round[t].append(v)
            ts = sorted(t for t, vs in per_round.items() if np.mean(vs) > 0)
            ls = ":" if m.endswith("-chain") else "-"
            if not ts:  # exact up to rounding: nothing to draw on a log axis
                ax.plot([], [], color=colour[m], ls=ls, label=f"{m}: 0 (exact, n={len(group)})")
                continue
            X = np.array(ts, dtype=float) + 1
            mu = np.array([np.mean(per_round[t]) for t in ts])
            ax.plot(X, mu, color=colour[m], ls=ls, lw=1.2, label=f"{m} (n={len(group)})")
            lo = np.array([min(per_round[t]) for t in ts])
            hi = np.array([max(per_round[t]) for t in ts])
            ok = lo > 0
            if len(group) > 1 and ok.any():
                ax.fill_between(X[ok], lo[ok], hi[ok], color=colour[m], alpha=0.15, lw=0)
        part, k, work, rank = cell
        ax.set_yscale("log")
        ax.set_title(f"{part}, {k} clients, {work}, r={rank}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("relative averaging error e_t")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_error(runs: list[dict]):
    """Final test accuracy against the run's mean e_t over rounds: one point per run, colour = rule,
    marker = client count (hollow for chained rules, in their unchained rule's colour), one panel per (partition,
    local work, rank); symlog x so exact rules (0) show."""
    runs = [r for r in runs if has_error(r) and r.get("final_test_accuracy") is not None]
    panels = sorted({(c[0], c[2], c[3]) for c in map(cell_of, runs)}, key=lambda c: _cell_key((c[0], 0, c[1], c[2])))
    methods = ordered({r["method"] for r in runs}, ORDER)
    colour = _colours(methods)
    shapes = {k: s for k, s in zip(sorted({r["clients"] for r in runs}), "os^Dvp<>h*")}
    fig, axes = _grid(max(len(panels), 1), w=4.8)
    for ax, (part, work, rank) in zip(axes, panels):
        here = [r for r in runs if (cell_of(r)[0], cell_of(r)[2], cell_of(r)[3]) == (part, work, rank)]
        xs, labelled = [], set()
        for m in methods:
            for k, shape in shapes.items():
                g = [r for r in here if r["method"] == m and r["clients"] == k]
                if g:
                    x = [mean_error(r) for r in g]
                    xs += x
                    hollow = dict(facecolors="none", edgecolors=colour[m]) if m.endswith("-chain") else dict(
                        color=colour[m])
                    ax.scatter(x, [r["final_test_accuracy"] for r in g], s=18, marker=shape, alpha=0.8,
                               label=None if m in labelled else m, **hollow)
                    labelled.add(m)
        pos = [x for x in xs if x > 0]
        if pos:
            ax.set_xscale("symlog", linthresh=10 ** np.floor(np.log10(min(pos))))
        ax.set_title(f"{part}, {work}, r={rank} (marker: " + ", ".join(f"{s} {k}" for k, s in shapes.items())
                     + " clients)", fontsize=8)
        ax.set_xlabel("mean relative averaging error over rounds")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def error_runs(results_dir: Path) -> dict:
    """(tier, sweep) -> the eval records carrying the averaging error (sweep "runs" for single runs)."""
    out = defaultdict(list)
    for tier, runs in (("mnist", mnist.load_runs(results_dir)), ("llm", llm.load_runs(results_dir))):
        for r in runs:
            if r.get("role", "eval") == "eval" and has_error(r) and "probe" not in r:  # a tool's probe: not a study
                out[(tier, r.get("sweep") or "runs")].append(r)
    return out


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for (tier, sweep), runs in sorted(error_runs(Path(results_dir)).items()):
        written += save_figure(plot_error_per_round(runs), out_dir, f"{tier}_{sweep}_averaging_error_vs_round")
        written += save_figure(plot_accuracy_vs_error(runs), out_dir, f"{tier}_{sweep}_accuracy_vs_averaging_error")
    return written
