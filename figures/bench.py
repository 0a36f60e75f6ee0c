"""Figures of the aggregation benchmark: factored vs dense reference, and the memory floor."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from figures.common import save_figure


def cost_ratio(r: dict) -> float:
    """Dense SVD flops over factored flops: ``m n min(m, n) / ((m + n)(K r)²)`` (SPEC, factored algebra)."""
    m, n, q = r["m"], r["n"], r["clients"] * r["rank"]
    return m * n * min(m, n) / ((m + n) * q * q)


def plot_speedup(records: list[dict]):
    """Measured speedup of the factored path over the dense reference against the flop-count ratio."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for rule, marker in (("flexlora", "o"), ("fedex", "s")):
        pts = sorted((cost_ratio(r), r["speedup"]) for r in records if r["rule"] == rule and r.get("speedup"))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=rule, alpha=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("m n min(m, n) / ((m + n)(K r)²)")
    ax.set_ylabel("dense reference time / factored time")
    ax.legend()
    ax.set_title("Aggregation on the factors vs dense")
    fig.tight_layout()
    return fig


def plot_floor(records: list[dict]):
    """Time of the pure reductions divided by the time to copy the same client bytes once."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for rule, marker in (("fedavg", "o"), ("ffa", "^"), ("rolora", "s")):
        pts = sorted((r["m"] * r["n"] * r["clients"] * r["rank"], r["floor_ratio"]) for r in records
                     if r["rule"] == rule and r.get("floor_ratio"))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=rule, alpha=0.8)
    ax.set_xscale("log")
    ax.axhline(1, color="grey", lw=0.8)
    ax.axhline(3, color="red", lw=0.8, ls="--", label="3× floor")
    ax.set_xlabel("m · n · K · r")
    ax.set_ylabel("aggregation time / memory floor")
    ax.legend()
    fig.tight_layout()
    return fig


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    src = Path(results_dir) / "bench" / "aggregation.json"
    if not src.exists():
        return []
    records = json.loads(src.read_text())
    return save_figure(plot_speedup(records), out_dir, "bench_speedup") + save_figure(plot_floor(records), out_dir, "bench_floor")
