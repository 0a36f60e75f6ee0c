"""MNIST-toy figures from the run JSONs under ``RESULTS/mnist_toy/**``.

Pure plot functions take the loaded runs and return a Figure; ``make_all`` saves PNG + PDF.
Curves are the mean over seeds with a ±1 std band; only evaluation runs (not lr-tuning runs) count.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["load_runs", "plot_accuracy_vs_round", "plot_accuracy_vs_rank", "plot_accuracy_vs_bytes",
           "summary_table", "pivot_table", "make_all"]

ORDER = ("centralised", "fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "flora", "full")
STYLE = {"centralised": dict(color="black", ls="--"), "fedavg": dict(color="C0"), "ffa": dict(color="C1"),
         "rolora": dict(color="C2", lw=2), "rolora-chain": dict(color="C2", ls=":"), "fedex": dict(color="C3"),
         "flexlora": dict(color="C4"), "flora": dict(color="C5"), "full": dict(color="C7")}
WORK_ORDER = lambda w: (0 if "step" in w else 1, float(w.split()[0]))  # noqa: E731


def load_runs(results_dir: Path) -> list[dict]:
    runs = []
    for p in sorted((Path(results_dir) / "mnist_toy").rglob("*.json")):
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("final_test_accuracy") is not None and rec.get("role") not in ("tune", "superseded") and rec.get("complete"):
            runs.append(rec)
    return runs


def _groups(runs, *keys) -> dict:
    out = defaultdict(list)
    for r in runs:
        out[tuple(r.get(k) for k in keys)].append(r)
    return out


def _curve(group: list[dict], x_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds of test accuracy at the evaluated rounds common to every run."""
    series = []
    for r in group:
        pts = [(x_of(r, i), e["test_accuracy"]) for i, e in enumerate(r["rounds"]) if "test_accuracy" in e]
        series.append(pts)
    n = min(len(s) for s in series)
    x = np.array([p[0] for p in series[0][:n]], dtype=float)
    y = np.array([[p[1] for p in s[:n]] for s in series])
    return x, y.mean(0), y.std(0)


def _round_x(r, i):
    return r["rounds"][i]["round"] + 1


def _bytes_x(r, i):
    return sum(e["uplink_bytes"] + e["downlink_bytes"] for e in r["rounds"][: i + 1])


def _methods(runs) -> list[str]:
    present = {r["method"] for r in runs}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _panels(runs, setting: str, x_of, xlabel: str, logx: bool = False):
    mine = [r for r in runs if r["setting"] in (setting, "centralised")]
    works = sorted({r["local_work"] for r in mine if r["setting"] == setting}, key=WORK_ORDER)
    fig, axes = plt.subplots(1, max(len(works), 1), figsize=(4.2 * max(len(works), 1), 3.4), squeeze=False,
                             sharey=True)
    for ax, work in zip(axes[0], works):
        here = [r for r in mine if r["local_work"] == work]
        if logx:  # centralised sends nothing: no place on a communication axis
            here = [r for r in here if r["method"] != "centralised"]
        for method in _methods(here):
            group = [r for r in here if r["method"] == method]
            x, mu, sd = _curve(group, x_of)
            st = STYLE.get(method, {})
            ax.plot(x, mu, label=method, **st)
            ax.fill_between(x, mu - sd, mu + sd, color=st.get("color"), alpha=0.15, lw=0)
        seeds = sorted({len(g) for g in _groups(here, "method").values()})
        ax.set_title(f"{setting}, {work} per round, r={here[0]['rank']}, "
                     f"{'/'.join(map(str, seeds))} seeds" if here else work, fontsize=9)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    handles = {}
    for ax in axes[0]:  # one legend for all panels: a method missing from one panel still appears
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab.split(" (")[0], h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig


def plot_accuracy_vs_round(runs: list[dict], setting: str):
    """Test accuracy vs round t (mean ± std over seeds), one panel per amount of local work."""
    return _panels(runs, setting, _round_x, "round t")


def plot_accuracy_vs_bytes(runs: list[dict], setting: str):
    """Test accuracy vs cumulative communicated bytes (uplink + downlink, all clients)."""
    return _panels(runs, setting, _bytes_x, "bytes communicated (up + down)", logx=True)


def plot_accuracy_vs_rank(runs: list[dict]):
    """Final test accuracy vs LoRA rank r (mean ± std over seeds), one line per method."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for method in _methods(runs):
        g = _groups([r for r in runs if r["method"] == method], "rank")
        ranks = sorted(k[0] for k in g)
        acc = [[r["final_test_accuracy"] for r in g[(k,)]] for k in ranks]
        mu, sd = np.array([np.mean(a) for a in acc]), np.array([np.std(a) for a in acc])
        ax.errorbar(ranks, mu, yerr=sd, marker="o", capsize=3, label=method, **STYLE.get(method, {}))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("final test accuracy")
    if runs:
        ax.set_title(f"{runs[0]['setting']}, {runs[0]['local_work']} per round", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def summary_table(runs: list[dict]) -> str:
    """Markdown: final test accuracy mean ± std per (setting, local work, method)."""
    g = _groups(runs, "setting", "local_work", "rank", "method")
    lines = ["| setting | local work | rank | method | lr | final test acc. (mean ± std) | seeds |",
             "|---|---|---|---|---|---|---|"]
    key = lambda k: (k[0] != "centralised", k[0], WORK_ORDER(k[1]), k[2],  # noqa: E731
                     ORDER.index(k[3]) if k[3] in ORDER else 99)
    for k in sorted(g, key=key):
        acc = np.array([r["final_test_accuracy"] for r in g[k]])
        lrs = sorted({r["lr"] for r in g[k]})
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {', '.join(f'{x:g}' for x in lrs)} | "
                     f"{acc.mean():.3f} ± {acc.std():.3f} | {len(acc)} |")
    return "\n".join(lines) + "\n"


def pivot_table(runs: list[dict]) -> str:
    """Markdown: one row per (setting, local work, rank), one column per method, mean ± std (and lr)."""
    g = _groups(runs, "setting", "local_work", "rank", "method")
    methods = [m for m in _methods(runs) if m != "centralised"]
    cent = {(k[1], k[2]): v for k, v in g.items() if k[0] == "centralised"}
    rows = sorted({k[:3] for k in g if k[0] != "centralised"}, key=lambda k: (k[0], WORK_ORDER(k[1]), k[2]))
    cell = lambda rs: (f"{np.mean([r['final_test_accuracy'] for r in rs]):.3f} ± "  # noqa: E731
                       f"{np.std([r['final_test_accuracy'] for r in rs]):.3f}" if rs else "–")
    head = ["setting", "local work", "r"] + methods + (["centralised"] if cent else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, work, rank in rows:
        vals = [cell(g.get((setting, work, rank, m), [])) for m in methods]
        if cent:
            vals.append(cell(cent.get((work, rank), [])))
        lines.append(f"| {setting} | {work} | {rank} | " + " | ".join(vals) + " |")
    lrs = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, work, rank in rows:
        vals = [",".join(f"{x:g}" for x in sorted({r["lr"] for r in g.get((setting, work, rank, m), [])})) or "–"
                for m in methods]
        if cent:
            vals.append(",".join(f"{x:g}" for x in sorted({r["lr"] for r in cent.get((work, rank), [])})) or "–")
        lrs.append(f"| {setting} | {work} | {rank} | " + " | ".join(vals) + " |")
    return ("Final test accuracy, mean ± std over seeds:\n\n" + "\n".join(lines) +
            "\n\nLearning rate used (chosen on the validation split):\n\n" + "\n".join(lrs) + "\n")


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=130)
        paths.append(p)
    plt.close(fig)
    return paths


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    """Per sweep: accuracy vs round and vs bytes for each client setting (at the sweep's main rank) and a
    markdown table. Accuracy vs rank pools every sweep's runs of one (setting, local work, rounds)."""
    runs = load_runs(Path(results_dir))
    if not runs:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (sweep,), group in sorted(_groups(runs, "sweep").items(), key=lambda kv: str(kv[0])):
        name = sweep or "runs"
        ranks = {r["rank"] for r in group}
        main_rank = max(ranks, key=lambda k: sum(r["rank"] == k for r in group))
        at_rank = [r for r in group if r["rank"] == main_rank]
        if name != "rank":
            for setting in sorted({r["setting"] for r in at_rank} - {"centralised"}):
                slug = setting.replace(" ", "_")
                written += _save(plot_accuracy_vs_round(at_rank, setting), out_dir,
                                 f"mnist_{name}_accuracy_vs_round_{slug}")
                written += _save(plot_accuracy_vs_bytes(at_rank, setting), out_dir,
                                 f"mnist_{name}_accuracy_vs_bytes_{slug}")
        table = out_dir / f"mnist_{name}_table.md"
        table.write_text(summary_table(group))
        pivot = out_dir / f"mnist_{name}_pivot.md"
        pivot.write_text(pivot_table(group))
        written += [table, pivot]
    for (setting, work, rounds), group in _groups(
            [dict(r, n_rounds=r["config"]["rounds"]) for r in runs], "setting", "local_work", "n_rounds").items():
        if setting == "centralised":
            continue
        by_method = _groups(group, "method")
        multi = [r for (m,), g in by_method.items() if len({x["rank"] for x in g}) > 1 for r in g]
        if multi:
            slug = f"{setting}_{work}".replace(" ", "_")
            written += _save(plot_accuracy_vs_rank(multi), out_dir, f"mnist_accuracy_vs_rank_{slug}")
    return written
