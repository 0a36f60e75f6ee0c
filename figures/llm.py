"""LLM-tier figures from run JSONs (``llm_scale``).

- Single runs (``python -m llm_scale``, the quick reproduction): test accuracy against rounds and
  against uplink bytes, one line per rule (mean over seeds, band = min..max), one panel per setting.
- The client-scaling sweep (``python -m llm_scale sweep``): final test accuracy against the number of
  clients per rule (mean over seeds, band = min..max; centralised as a dashed line), one panel per
  (partition, rank); final accuracy against the run's total uplink bytes; and the table
  ``llm_<sweep>_table.md`` (mean ± sample std over seeds, paired differences with 95% t-intervals,
  and the paper's Table 2 beside it). The figure and table pieces are shared with the MNIST toy
  (``figures.scaling``), the statistics live in ``figures.stats``. ``llm_<sweep>_drops.md``
  (``figures.drops``): the drop 3 → 50 clients per rule paired by seed, differences of drops, and each
  rule's gain over ``head-only``, Holm-corrected per table. The controls sweep (``scaling_controls``:
  fedavg-chain, ffa-chain, head-only) is pooled into the ``scaling`` cells; ``frozen_head`` (the
  classifier head frozen at its random init) has its own table.

    python -m figures.llm --results results --out results/figures
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from . import drops, scaling
from .common import plt, save_figure
from .scaling import CENTRAL, ordered, paired_lines, scaling_blocks

__all__ = ["load_runs", "plot_accuracy", "plot_scaling", "plot_scaling_uplink", "scaling_table", "paired_lines",
           "make_all"]


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


# ---- the client-scaling sweep ------------------------------------------------------------------------------
RANKLESS = ("full", "full-galore")
# RoLoRA paper (Chen et al. 2024, arXiv:2409.02346) Table 2: RoBERTa-Large, rank 2, accuracy % on
# SST-2 / QNLI / MNLI / QQP / RTE, 3 and 50 clients on disjoint shards with the total budget fixed (SPEC).
PAPER_TABLE2 = {
    ("fedavg", 3): (95.64, 92.04, 85.85, 86.16, 82.19), ("ffa", 3): (94.91, 90.11, 84.06, 85.48, 80.86),
    ("rolora", 3): (95.60, 91.62, 85.66, 86.16, 82.19), ("fedavg", 50): (93.23, 82.57, 58.96, 76.96, 49.10),
    ("ffa", 50): (92.32, 85.15, 62.79, 77.78, 53.07), ("rolora", 50): (94.61, 89.83, 85.15, 85.55, 72.92),
}
METHOD_ORDER = ("fedavg", "fedavg-chain", "ffa", "ffa-chain", "rolora", "rolora-chain", "fedex", "flexlora", "flora",
                "full", "full-galore", "head-only")
# a sweep pooled into another's cells (same partition, clients, rank and seeds): the controls of the scaling study
POOLED = {"scaling_controls": "scaling"}


def pool_sweeps(runs: list[dict]) -> list[dict]:
    """The runs with every sweep named in ``POOLED`` relabelled as the sweep it completes."""
    return [dict(r, sweep=POOLED[r["sweep"]]) if r.get("sweep") in POOLED else r for r in runs]


def single_runs(runs: list[dict]) -> list[dict]:
    """The single runs of the quick figures: neither a sweep's nor a probe's (``tools/*``, e.g. the
    paper-regime plateau probe, which records ``probe``)."""
    return [r for r in runs if "sweep" not in r and "probe" not in r]


def sweep_runs(runs: list[dict], sweep: str) -> list[dict]:
    return [r for r in runs if r.get("sweep") == sweep and r.get("role") == "eval"]


def _order(methods) -> list[str]:
    return ordered(methods, METHOD_ORDER)


def scaling_cells(runs: list[dict]) -> dict:
    """(method, partition, rank, clients) -> final test accuracies over seeds (``figures.scaling``)."""
    return scaling.scaling_cells(runs, RANKLESS)


def plot_scaling(runs: list[dict]):
    """Final test accuracy against clients per rule (band = min..max over seeds), one panel per
    (rank, partition); the shared drawing is ``figures.scaling.plot_scaling``."""
    return scaling.plot_scaling(runs, order=METHOD_ORDER, rankless=RANKLESS, band="minmax",
                                xlabel="clients (total rows and client-steps fixed)")


def plot_scaling_uplink(runs: list[dict]):
    """Final accuracy against the run's total uplink bytes (all clients): one marker per run, one
    colour per rule, one marker shape per number of clients."""
    runs = [r for r in runs if r["method"] != CENTRAL and r["final_test_accuracy"] is not None]
    parts = sorted({r["partition"] for r in runs}, key=lambda x: (x != "iid", x))
    ranks = sorted({r["rank"] for r in runs if r["method"] not in RANKLESS})
    methods = _order({r["method"] for r in runs})
    shapes = {c: s for c, s in zip(sorted({r["clients"] for r in runs}), "os^Dv")}
    fig, axes = plt.subplots(len(ranks), len(parts), figsize=(5.2 * len(parts), 3.8 * len(ranks)), squeeze=False,
                             sharey=True)
    for i, rank in enumerate(ranks):
        for j, part in enumerate(parts):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                for c, shape in shapes.items():
                    g = [r for r in runs if r["method"] == m and r["partition"] == part and r["clients"] == c
                         and (r["rank"] == rank or m in RANKLESS)]
                    if g:
                        ax.scatter([r["uplink_bytes"] for r in g], [r["final_test_accuracy"] for r in g], s=16,
                                   marker=shape, color=f"C{k}", label=m if c == min(shapes) else None, alpha=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{part}, rank {rank} (marker: " + ", ".join(f"{s} {c}" for c, s in shapes.items())
                         + " clients)", fontsize=9)
            ax.set_xlabel("uplink bytes, whole run, all clients")
            ax.set_ylabel("final test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def scaling_table(runs: list[dict]) -> str:
    """Markdown: mean ± sample std (ddof 1) over seeds per rule × clients, one block per (partition,
    rank), the rounds of each column, paired differences, and the paper's Table 2 (rank 2) for the
    rules it reports."""
    lines = scaling_blocks(runs, order=METHOD_ORDER, rankless=RANKLESS)
    lines += ["**RoLoRA paper, Table 2** (RoBERTa-Large, rank 2, accuracy %: SST-2 / QNLI / MNLI / QQP / RTE)", "",
              "| rule | 3 clients | 50 clients | MNLI 3 → 50 |", "|---|---|---|---|"]
    for m in ("fedavg", "ffa", "rolora"):
        a, b = PAPER_TABLE2[(m, 3)], PAPER_TABLE2[(m, 50)]
        lines.append(f"| {m} | {' / '.join(f'{x:.2f}' for x in a)} | {' / '.join(f'{x:.2f}' for x in b)} | "
                     f"{b[2] - a[2]:+.2f} |")
    return "\n".join(lines) + "\n"


# sweeps that are a local-work axis of another (same clients, budget, tuning rule; other local steps)
LOCAL_WORK = {"paper_regime": ("paper_regime", "paper_regime_s5", "paper_regime_s2")}


def local_work_table(runs: list[dict], sweeps: tuple[str, ...]) -> str:
    """Markdown: rule × local steps at the client counts run with more than one (the axis), final test
    accuracy mean ± sample std over seeds, from the eval records of ``sweeps``; "" when there is no axis."""
    from .mnist import local_work_block

    rs = [dict(r, local_work=f"{r['config']['local_steps']} steps") for s in sweeps for r in sweep_runs(runs, s)
          if r["method"] != CENTRAL and r.get("final_test_accuracy") is not None]  # a diverged seed is not averaged
    return local_work_block(rs, order=METHOD_ORDER) if rs else ""


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    runs = load_runs(results_dir)
    if not runs:
        return []
    single = single_runs(runs)
    written = []
    if single:
        written += save_figure(plot_accuracy(single, x="round"), out_dir, "llm_accuracy_vs_round")
        written += save_figure(plot_accuracy(single, x="uplink"), out_dir, "llm_accuracy_vs_uplink")
    runs = pool_sweeps(runs)
    for sweep in sorted({r["sweep"] for r in runs if "sweep" in r} - {"dp"}):  # figures.dp draws the dp sweep
        rs = sweep_runs(runs, sweep)
        if not rs:
            continue
        written += save_figure(plot_scaling(rs), out_dir, f"llm_{sweep}_accuracy_vs_clients")
        written += save_figure(plot_scaling_uplink(rs), out_dir, f"llm_{sweep}_accuracy_vs_uplink")
        table = Path(out_dir) / f"llm_{sweep}_table.md"
        table.write_text(scaling_table(rs))
        written.append(table)
        text = drops.drops_markdown(rs, order=METHOD_ORDER, rankless=RANKLESS)
        if text:
            path = Path(out_dir) / f"llm_{sweep}_drops.md"
            path.write_text(text)
            written.append(path)
    for name, sweeps in LOCAL_WORK.items():
        text = local_work_table(runs, sweeps)
        if text:
            path = Path(out_dir) / f"llm_{name}_local_work.md"
            path.write_text(text + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=Path("results/figures"))
    a = ap.parse_args()
    for p in make_all(a.results, a.out):
        print(p)
