"""Figures of the linear-model theory (``python -m linear_theory``): each plot is a pure function of
the traces in ``theory_traces.json``; ``make_all`` writes PNG and PDF.

``python -m figures.theory --results results --out results/figures`` reads
``results/theory/theory_traces.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from figures.common import save_figure  # noqa: E402

TINY = 1e-17  # where exact zeros are drawn on log axes


def plot_angle(angle: dict, bound: dict):
    """(a) θ_t: closed-form recursion (lines) with the population (dots) and one finite-sample run
    (crosses); (b) sin θ_t against the bound sin θ0 · q^t, c ≤ 1; (c) finite-sample error vs N."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for i, cur in enumerate(angle["curves"]):
        color = f"C{i}"
        t = range(len(cur["predicted"]))
        ax.plot(t, [max(x, TINY) for x in cur["predicted"]], color=color, lw=1.2,
                label=f"recursion, c = η‖b*‖² = {cur['c']:g}")
        ax.plot(t, [max(x, TINY) for x in cur["population"]], "o", color=color, ms=4, mfc="none")
    fs = angle["finite_sample"]
    for j, (N, th) in enumerate(sorted(fs["examples"].items(), key=lambda kv: int(kv[0]))[:: max(1, len(fs["examples"]) - 1)]):
        ax.plot(range(len(th)), th, "x", color="k", alpha=0.4 + 0.5 * j, ms=5,
                label=f"K clients × N = {N} samples, c = {fs['c']:g}")
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 2)
    ax.set_xlabel("round t (b-step + a-step)")
    ax.set_ylabel("θ_t = ∠(a_t, a*)  [rad]")
    ax.set_title("RoLoRA rank 1: tan θ⁺ = tan θ |1 − c cos²θ| / (1 + c sin²θ)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    for i, cur in enumerate(bound["curves"]):
        color = f"C{i}"
        t = range(len(cur["population"]))
        ax.plot(t, [max(math.sin(x), TINY) for x in cur["population"]], "o-", color=color, ms=3, lw=0.8,
                label=f"sin θ_t, c = {cur['c']:g}")
        ax.plot(t, [math.sin(x) for x in cur["bound"]], "--", color=color, lw=1,
                label=f"sin θ0 · q^t, q = {cur['q']:.3f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 2)
    ax.set_xlabel("round t")
    ax.set_ylabel("sin θ_t")
    ax.set_title("bound sin θ⁺ ≤ sin θ · sqrt(1 − c(1 − δ0²)), c ≤ 1", fontsize=9)
    ax.legend(fontsize=6, ncol=2)

    ax = axes[2]
    N, err = fs["samples"], fs["mean_max_error"]
    ax.loglog(N, err, "o", label="simulation: E max_t |θ_t − θ_t^pop|")
    ref = [err[0] * math.sqrt(N[0] / x) for x in N]
    ax.loglog(N, ref, "--", color="grey", label="∝ N^(−1/2)")
    ax.set_xlabel("samples per client N")
    ax.set_ylabel("angle error [rad]")
    ax.set_title(f"finite samples → population (c = {fs['c']:g})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


METHOD_STYLE = {"fedavg": ("o", "C0"), "flexlora": ("s", "C1"), "rolora": ("D", "C2"), "ffa": ("^", "C3"),
                "full": ("v", "C4")}


def plot_floors(rank_floor: dict):
    """(a) final population loss L by method vs heterogeneity h, against the Eckart–Young rank
    floor, the heterogeneity term and the FFA floor; (b) excess over the rank floor (log)."""
    rows = rank_floor["rows"]
    r = rank_floor["rank"]
    h = [row["h"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    ax.plot(h, [row["floor"] for row in rows], "-", color="k",
            label=f"rank floor: ½Σp‖W*_k − W̄*‖² + ½Σ_(j>{r}) σ_j(W̄*)²")
    ax.plot(h, [row["heterogeneity"] for row in rows], ":", color="k", label="heterogeneity term ½Σp‖W*_k − W̄*‖²")
    ax.plot(h, [row["ffa_floor"] for row in rows], "--", color="C3", label="FFA floor with A0: + ½‖W̄*(I − P)‖²")
    for name, (marker, color) in METHOD_STYLE.items():
        ax.plot(h, [row["final"][name] for row in rows], marker, color=color, mfc="none", ms=6, label=name)
    ax.set_xlabel("client heterogeneity h  (W*_k = W̄* + h D_k)")
    ax.set_ylabel("final loss L(W_T)")
    ax.legend(fontsize=6)
    ax = axes[1]
    for name in ("fedavg", "flexlora", "rolora"):
        marker, color = METHOD_STYLE[name]
        ex = [max(row["final"][name] - row["floor"], TINY) for row in rows]
        ax.plot(h, ex, marker + "-", color=color, lw=0.8, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("client heterogeneity h")
    ax.set_ylabel("L(W_T) − rank floor")
    ax.set_title(f"rank r = {r}; exact zero drawn at {TINY:g}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_inexactness(inexact: dict):
    """‖Σ_k p_k B_k A_k − B̄ Ā‖_F after one local step vs h: prediction η² Σ p (g_B,k − ḡ_B)(g_A,k − ḡ_A)
    (line) and the core's fedavg (dots)."""
    rows = [row for row in inexact["rows"] if row["h"] > 0]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    h = [row["h"] for row in rows]
    ax.loglog(h, [row["predicted"] for row in rows], "-", color="k",
              label="η² ‖Σ p_k (g_B,k − ḡ_B)(g_A,k − ḡ_A)‖_F")
    ax.loglog(h, [row["measured"] for row in rows], "o", color="C0", mfc="none", label="core fedavg: ‖Σ p_k B_k A_k − B̄Ā‖_F")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(h, [f"{x:g}" for x in h])
    ax.set_xlabel("client heterogeneity h")
    ax.set_ylabel("averaging error (∝ h²)")
    ax.set_title(f"FedAvg inexactness, one local step, η = {inexact['eta']:g}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_drift(drift: dict):
    """Full-weight FedAvg with τ local steps: distance to the closed-form fixed point W_fp and to the
    optimum W_opt vs round (population data)."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for i, cur in enumerate(c for c in drift["curves"] if c["data"] == "population"):
        t = range(len(cur["to_fixed_point"]))
        ax.semilogy(t, [max(x, TINY) for x in cur["to_fixed_point"]], "-", color=f"C{i}",
                    label=f"τ = {cur['tau']}: ‖W_t − W_fp‖/‖W_fp‖")
        ax.semilogy(t, [max(x, TINY) for x in cur["to_optimum"]], "--", color=f"C{i}",
                    label=f"τ = {cur['tau']}: ‖W_t − W_opt‖/‖W_opt‖")
    ax.set_xlabel("round t")
    ax.set_ylabel("relative distance")
    ax.set_title(f"client drift, η = {drift['eta']:g}: W_fp = (Σp W*_k M_k)(Σp M_k)⁻¹", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    src = Path(results_dir) / "theory" / "theory_traces.json"
    if not src.exists() or not (Path(results_dir) / "theory" / "theory.json").exists():
        return []
    traces = json.loads(src.read_text())
    figs = (("theory_angle", lambda: plot_angle(traces["rolora_angle"], traces["rolora_bound"])),
            ("theory_floors", lambda: plot_floors(traces["rank_floor"])),
            ("theory_inexactness", lambda: plot_inexactness(traces["fedavg_inexactness"])),
            ("theory_drift", lambda: plot_drift(traces["client_drift"])))
    written = []
    for name, make in figs:
        written += save_figure(make(), out_dir, name)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/figures")
    args = ap.parse_args(argv)
    written = make_all(args.results, args.out or args.results / "figures")
    for p in written:
        print(p)
    if not written:
        print(f"no theory results under {args.results}/theory; run python -m linear_theory --out {args.results}/theory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
