"""LLM-tier figures from run JSONs (``llm_scale``): test accuracy against rounds and against uplink
bytes, one line per rule (mean over seeds, band = min..max), one panel per (model, task, clients, rank).

    python -m figures.llm --results results --out results/figures
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from .common import plt, save_figure

__all__ = ["load_runs", "plot_accuracy", "make_all"]


def load_runs(results_dir: Path) -> list[dict]:
    """Every ``llm_scale`` run record under ``results_dir`` (recognised by its ``model_family`` key)."""
    runs = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if "figures" in path.parts:
            continue
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and "model_family" in rec and rec.get("rounds"):
            runs.append(rec)
    return runs


def _panel_key(r: dict) -> tuple:
    return (r["model"], r["task"], r["partition"], r["clients"], r["rank"])


def plot_accuracy(runs: list[dict], *, x: str = "round"):
    """One panel per setting; ``x`` is ``"round"`` or ``"uplink"`` (cumulative uplink bytes, all clients)."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in runs:
        panels[_panel_key(r)][r["method"]].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for method, group in sorted(panels[key].items()):
            xs, ys = [], []
            for r in group:
                pts = [(i, h) for i, h in enumerate(r["rounds"]) if "test_accuracy" in h]
                up = np.cumsum([h["uplink_bytes"] and sum(h["uplink_bytes"].values()) for h in r["rounds"]])
                xs.append([(h["round"] + 1) if x == "round" else up[i] for i, h in pts])
                ys.append([h["test_accuracy"] for _, h in pts])
            n = min(len(v) for v in ys)
            X = np.asarray(xs[0][:n], dtype=float)
            Y = np.asarray([v[:n] for v in ys])
            line, = ax.plot(X, Y.mean(0), marker="o", ms=3, label=f"{method} (n={len(group)})")
            if len(group) > 1:
                ax.fill_between(X, Y.min(0), Y.max(0), color=line.get_color(), alpha=0.2)
        model, task, part, clients, rank = key
        ax.set_title(f"{model} / {task}: {clients} clients ({part}), r={rank}", fontsize=9)
        ax.set_xlabel("round" if x == "round" else "uplink bytes (all clients, cumulative)")
        if x == "uplink":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    runs = load_runs(results_dir)
    if not runs:
        return []
    written = save_figure(plot_accuracy(runs, x="round"), out_dir, "llm_accuracy_vs_round")
    written += save_figure(plot_accuracy(runs, x="uplink"), out_dir, "llm_accuracy_vs_uplink")
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=Path("results/figures"))
    a = ap.parse_args()
    for p in make_all(a.results, a.out):
        print(p)
