"""MNIST-toy figures and tables from the run JSONs under ``RESULTS/mnist_toy/**``.

Pure plot functions take the loaded runs and return a Figure; ``make_all`` saves PNG + PDF and the
markdown tables. Only evaluation runs (not lr-tuning or superseded runs) count.

Statistics (``figures.stats``), over the n seeds of a cell:

- curves and the rank plot: the mean over seeds, band / error bar = ±1 **sample** std s (ddof = 1,
  s² = Σ(x_i − x̄)²/(n − 1)); no band for one seed;
- tables: mean ± sample std (ddof = 1); the summary table adds the 95% t half-width
  t_{0.975,n−1}·s/√n and the mean over the last 10% of rounds (each seed's mean test accuracy over its
  last ⌈0.1·R⌉ rounds, evaluated ones only, then mean ± std over seeds);
- ``mnist_<sweep>_paired.md``: per cell, each rule minus fedavg (and rolora-chain minus rolora) paired
  over seeds (same seed = same data split, init and batch order), mean [95% t-interval], bold when the
  interval excludes 0;
  the last lines count the table's comparisons and name those surviving a Holm correction over it;
- the client-scaling sweeps (``scaling``, ``paper_scaling``): final accuracy against the number of
  clients and ``mnist_<sweep>_table.md`` on the client axis (the local work run at every client count;
  a local-work axis at one client count gets its own block), drawn by the pieces shared with the LLM
  tier (``figures.scaling``), and ``mnist_<sweep>_drops.md`` (``figures.drops``: the drop from the
  fewest clients paired by seed, differences of drops between rules, Holm per table).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import drops, scaling  # noqa: E402
from .stats import format_paired, paired_test, significant, summary, tail_mean  # noqa: E402

__all__ = ["load_runs", "plot_accuracy_vs_round", "plot_accuracy_vs_rank", "plot_accuracy_vs_bytes",
           "summary_table", "pivot_table", "paired_table", "final_tail", "scaling_runs", "plot_scaling",
           "scaling_table", "tuning_table", "make_all"]

ORDER = ("centralised", "fedavg", "fedavg-chain", "ffa", "ffa-chain", "rolora", "rolora-chain", "fedex", "flexlora",
         "flora", "full")
STYLE = {"centralised": dict(color="black", ls="--"), "fedavg": dict(color="C0"), "fedavg-chain": dict(color="C0", ls=":"),
         "ffa": dict(color="C1"), "ffa-chain": dict(color="C1", ls=":"),
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


def _sample_std(y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sample std (ddof = 1) along ``axis``; nan where there is a single value."""
    if y.shape[axis] < 2:
        return np.full(np.delete(y.shape, axis), np.nan)
    return y.std(axis, ddof=1)


def _curve(group: list[dict], x_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std (ddof = 1) over seeds of test accuracy at the evaluated rounds common to every run."""
    series = []
    for r in group:
        pts = [(x_of(r, i), e["test_accuracy"]) for i, e in enumerate(r["rounds"]) if "test_accuracy" in e]
        series.append(pts)
    n = min(len(s) for s in series)
    x = np.array([p[0] for p in series[0][:n]], dtype=float)
    y = np.array([[p[1] for p in s[:n]] for s in series])
    return x, y.mean(0), _sample_std(y)


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
    """Test accuracy vs round t (mean ± sample std over seeds), one panel per amount of local work."""
    return _panels(runs, setting, _round_x, "round t")


def plot_accuracy_vs_bytes(runs: list[dict], setting: str):
    """Test accuracy vs cumulative communicated bytes (uplink + downlink, all clients)."""
    return _panels(runs, setting, _bytes_x, "bytes communicated (up + down)", logx=True)


def plot_accuracy_vs_rank(runs: list[dict]):
    """Final test accuracy vs LoRA rank r (mean ± sample std over seeds, ddof = 1), one line per method."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for method in _methods(runs):
        g = _groups([r for r in runs if r["method"] == method], "rank")
        ranks = sorted(k[0] for k in g)
        acc = [[r["final_test_accuracy"] for r in g[(k,)]] for k in ranks]
        mu, sd = np.array([summary(a)[0] for a in acc]), np.array([summary(a)[1] for a in acc])
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


PARTITION_ORDER = {"labels": 0, "iid": 1, "dirichlet": 2}


def _setting_keys(runs) -> dict:
    """setting -> sort key: centralised first, then by partition (labels, iid, dirichlet); label-skew
    settings with the most clients first (10x1 before 5x2, as the sweep runs them), others by clients."""
    keys = {}
    for r in runs:
        part, k = r.get("partition"), r.get("clients") or 0
        keys[r["setting"]] = (r["setting"] != "centralised", PARTITION_ORDER.get(part, 9),
                              -k if part == "labels" else k, r["setting"])
    return keys


def _cell_sort(runs):
    """Sort key for (setting, local work, rank[, method]) tuples of ``runs``."""
    keys = _setting_keys(runs)

    def key(k):
        method = (ORDER.index(k[3]) if k[3] in ORDER else 99,) if len(k) > 3 else ()
        return (keys[k[0]], WORK_ORDER(k[1]), k[2]) + method
    return key


def _num(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.3f}"


def _mean_std(xs) -> str:
    """``mean ± sample std`` (ddof = 1; ``–`` for one value)."""
    mean, sd, _, _ = summary(xs)
    return f"{mean:.3f} ± {_num(sd)}"


def final_tail(r: dict, fraction: float = 0.1) -> float:
    """Mean test accuracy of run ``r`` over its last ⌈fraction·R⌉ rounds (R = rounds run; only the
    rounds that were evaluated count; with an evaluation every round, the last ⌈0.1·R⌉ evaluations)."""
    total = r.get("rounds_done") or r["rounds"][-1]["round"] + 1
    pts = [(e["round"], e["test_accuracy"]) for e in r["rounds"] if "test_accuracy" in e]
    return tail_mean(pts, total, fraction)


SUMMARY_NOTE = ("Test accuracy over seeds: mean ± sample std (ddof = 1). 95% ± = half-width of the 95% t-interval "
                "for the mean, t(0.975, n−1)·s/√n. Last 10% = each seed's mean test accuracy over its last "
                "⌈0.1·R⌉ rounds (R rounds in the run; evaluated rounds only), then mean ± sample std over seeds. "
                "Worst seed = the lowest final test accuracy of the cell (a seed that collapsed shows here).")


def summary_table(runs: list[dict]) -> str:
    """Markdown, one row per (setting, local work, rank, method): final-round test accuracy mean ±
    sample std (ddof = 1), the 95% t half-width, the last-10%-of-rounds mean ± std, seeds, the worst seed."""
    g = _groups(runs, "setting", "local_work", "rank", "method")
    lines = [SUMMARY_NOTE, "",
             "| setting | local work | rank | method | lr | final test acc. (mean ± std) | 95% ± | "
             "last 10% of rounds (mean ± std) | seeds | worst seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(g, key=_cell_sort(runs)):
        mean, sd, half, n = summary(r["final_test_accuracy"] for r in g[k])
        lrs = sorted({r["lr"] for r in g[k]})
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {', '.join(f'{x:g}' for x in lrs)} | "
                     f"{mean:.3f} ± {_num(sd)} | {_num(half)} | {_mean_std(final_tail(r) for r in g[k])} | {n} | "
                     f"{min(r['final_test_accuracy'] for r in g[k]):.3f} |")
    return "\n".join(lines) + "\n"


def pivot_table(runs: list[dict]) -> str:
    """Markdown: one row per (setting, local work, rank), one column per method: final-round test
    accuracy mean ± sample std (ddof = 1) over seeds; then the lr each cell used."""
    g = _groups(runs, "setting", "local_work", "rank", "method")
    methods = [m for m in _methods(runs) if m != "centralised"]
    cent = {(k[1], k[2]): v for k, v in g.items() if k[0] == "centralised"}
    rows = sorted({k[:3] for k in g if k[0] != "centralised"}, key=_cell_sort(runs))
    cell = lambda rs: _mean_std(r["final_test_accuracy"] for r in rs) if rs else "–"  # noqa: E731
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
    return ("Final test accuracy (last round), mean ± sample std (ddof = 1) over seeds:\n\n" + "\n".join(lines) +
            "\n\nLearning rate used (chosen on the validation split):\n\n" + "\n".join(lrs) + "\n")


# ---- paired differences over seeds -------------------------------------------------------------------------
BASELINE = "fedavg"


def _pairs(methods) -> list[tuple[str, str]]:
    """Every rule minus fedavg, then each chained rule minus its unchained rule other than fedavg's
    (rolora-chain − rolora, ffa-chain − ffa; each only when both are present)."""
    pairs = [(m, BASELINE) for m in methods if m not in (BASELINE, "centralised")] if BASELINE in methods else []
    for base in ("rolora", "ffa"):
        if f"{base}-chain" in methods and base in methods:
            pairs.append((f"{base}-chain", base))
    return pairs


def _by_seed(group: list[dict]) -> dict:
    """seed -> final test accuracy."""
    return {r["seed"]: r["final_test_accuracy"] for r in group}


def _tally_line(tally: dict) -> str:
    """'Significant …: k of N comparisons, a above, b below' per kind of pair."""
    parts = []
    for kind, (up, down, total) in tally.items():
        ref = kind.split(" − ")[1]
        parts.append(f"{kind}: {up + down} of {total} ({up} above {ref}, {down} below)")
    return ("Significant at 95% (interval excludes 0): " + "; ".join(parts) + "." if parts
            else "No paired comparisons (fewer than 2 common seeds everywhere).")


def paired_table(runs: list[dict]) -> str:
    """Markdown: per (setting, local work, rank), each rule minus fedavg and rolora-chain minus rolora,
    paired over the seeds both ran: d_i = a_i − b_i (final test accuracy), mean d̄ and the 95%
    t-interval d̄ ± t(0.975, n−1)·s_d/√n; **bold** only when the interval excludes 0. The last lines
    count the significant comparisons in each direction, then the comparisons of the table and those
    that survive a Holm correction over it (paired t-test p-values)."""
    g = _groups(runs, "setting", "local_work", "rank", "method")
    cells = sorted({k[:3] for k in g if k[0] != "centralised"}, key=_cell_sort(runs))
    pairs = _pairs([m for m in _methods(runs) if m != "centralised"])
    tally, tested = {}, []
    lines = ["Paired differences of final test accuracy over seeds (same seed = same data split, init and batch "
             "order): mean [95% t-interval]; **bold** when the interval excludes 0; n = seeds both rules ran.", "",
             "| setting | local work | r | n | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
             "|---|---|---|---|" + "---|" * len(pairs)]
    for setting, work, rank in cells:
        row, ns = [], set()
        for a, b in pairs:
            mean, lo, hi, n, p = paired_test(_by_seed(g.get((setting, work, rank, a), [])),
                                             _by_seed(g.get((setting, work, rank, b), [])))
            if n < 2:
                row.append("—")
                continue
            ns.add(n)
            tested.append((f"{a} − {b} ({setting}, {work}, r{rank})", p))
            row.append(format_paired(mean, lo, hi))
            kind = f"rule − {b}" if b == BASELINE else f"{a} − {b}"
            up, down, total = tally.get(kind, (0, 0, 0))
            sig = significant(lo, hi)
            tally[kind] = (up + (sig and mean > 0), down + (sig and mean < 0), total + 1)
        n_text = "–" if not ns else "/".join(str(n) for n in sorted(ns))
        lines.append(f"| {setting} | {work} | {rank} | {n_text} | " + " | ".join(row) + " |")
    return "\n".join(lines + ["", _tally_line(tally), "", scaling.holm_line(tested)]) + "\n"


# ---- the learning-rate search behind each cell ---------------------------------------------------------
def _lr_key(lr: str) -> float:
    return float(lr)


def tuning_table(runs: list[dict]) -> str:
    """Markdown: the whole lr search behind each tuned cell, from the eval records' ``tune_val_accuracy``
    (lr -> mean final validation accuracy over the tuning seeds; a diverged tuning run counts as −1):
    one row per (setting tuned on, local work, rank, rule), every lr tried with its mean, the chosen one
    in bold, and whether it is interior (a better value at neither neighbour of the grid)."""
    rows = {}
    for r in runs:
        table = r.get("tune_val_accuracy")
        if not table:
            continue
        where = r.get("lr_tuned_on", "this setting")
        source = r["setting"] if where == "this setting" else where.replace("_", " ")
        rows[(source, r["local_work"], r["rank"], r["method"])] = (table, r["lr"], r.get("tune_seeds") or [])
    if not rows:
        return ""
    keys = _setting_keys([dict(setting=k[0], partition=None, clients=0) for k in rows] + runs)
    lines = ["Learning-rate search per tuned cell: mean final validation accuracy over the tuning seeds at each lr "
             "tried (a diverged run counts as −1); **bold** = chosen (best mean, ties to the smaller lr); "
             "interior = the chosen lr has a tried neighbour on both sides. The chosen lr is reused for the "
             "settings that name this one as `lr_tuned_on`.", "",
             "| tuned on | local work | r | method | tuning seeds | lr: mean val. acc. | interior |",
             "|---|---|---|---|---|---|---|"]
    order = lambda k: (keys.get(k[0], (True, 9, 0, k[0])), WORK_ORDER(k[1]), k[2],  # noqa: E731
                       ORDER.index(k[3]) if k[3] in ORDER else 99)
    for k in sorted(rows, key=order):
        table, chosen, seeds = rows[k]
        lrs = sorted(table, key=_lr_key)
        cells = []
        for lr in lrs:
            text = f"{_lr_key(lr):g}: {table[lr]['mean_val_accuracy']:.3f}"
            cells.append(f"**{text}**" if abs(_lr_key(lr) - chosen) <= 1e-12 * chosen else text)
        i = [abs(_lr_key(lr) - chosen) <= 1e-12 * chosen for lr in lrs].index(True) if any(
            abs(_lr_key(lr) - chosen) <= 1e-12 * chosen for lr in lrs) else -1
        interior = "yes" if 0 < i < len(lrs) - 1 else ("single lr" if len(lrs) == 1 else "no (edge)")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {', '.join(str(x) for x in seeds)} | "
                     f"{' · '.join(cells)} | {interior} |")
    return "\n".join(lines) + "\n"


# ---- the client-scaling sweep ------------------------------------------------------------------------------
SCALING = "scaling"
SCALING_SWEEPS = (SCALING, "paper_scaling")  # client-count sweeps: scaling figure, table and drops
DP = "dp"
RANKLESS = ("full",)


def scaling_runs(runs: list[dict], sweep: str = SCALING) -> list[dict]:
    """The evaluation runs of a client-scaling sweep (with its centralised reference)."""
    return [r for r in runs if r.get("sweep") == sweep and r.get("role") == "eval"]


def main_work(runs: list[dict]) -> str | None:
    """The local work of the client axis: the one run at the most client counts (a local-work axis at
    one client count, as ``paper_scaling`` has at 50, stays off the client axis)."""
    fed = [r for r in runs if r["method"] != scaling.CENTRAL]
    works = {w: len({r["clients"] for r in fed if r["local_work"] == w}) for w in {r["local_work"] for r in fed}}
    return max(works, key=lambda w: (works[w], -WORK_ORDER(w)[1])) if works else None


def local_work_block(runs: list[dict], order: tuple = ORDER) -> str:
    """Markdown: at each client count run with more than one local work, rule × local work, final test
    accuracy mean ± sample std (ddof = 1) over seeds (n = seeds), one block per partition. Records need
    ``method``, ``clients``, ``partition``, ``local_work`` ("20 steps"), ``rounds_done`` and
    ``final_test_accuracy`` (the LLM tier maps its records to these; ``order``: the rule order)."""
    fed = [r for r in runs if r["method"] != scaling.CENTRAL]
    lines = []
    for k in sorted({r["clients"] for r in fed}):
        here = [r for r in fed if r["clients"] == k]
        works = sorted({r["local_work"] for r in here}, key=WORK_ORDER)
        if len(works) < 2:
            continue
        g = _groups(here, "partition", "local_work", "method")
        rounds = {w: "/".join(str(x) for x in sorted({r["rounds_done"] for r in here if r["local_work"] == w}))
                  for w in works}
        for part in sorted({r["partition"] for r in here}, key=lambda x: (x != "iid", x)):
            lines += [f"**Local work at {k} clients, {part}** (client-steps fixed; test accuracy, mean ± std over "
                      "seeds; n = seeds)", "", "| rule | " + " | ".join(f"{w} ({rounds[w]} rounds)" for w in works)
                      + " |", "|---|" + "---|" * len(works)]
            present = {r["method"] for r in here}
            for m in [m for m in order if m in present] + sorted(present - set(order)):
                cells = [g.get((part, w, m)) for w in works]
                lines.append(f"| {m} | " + " | ".join(f"{_mean_std(r['final_test_accuracy'] for r in c)} (n={len(c)})"
                                                       if c else "—" for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _budget_label(runs: list[dict]) -> str:
    """x-axis label: the client-steps every federated run took (rounds × clients × local steps), when equal."""
    budgets = {r["rounds_done"] * r["clients"] * r["config"]["local_steps"] for r in runs
               if r["method"] != scaling.CENTRAL and r.get("config", {}).get("local_steps")}
    return f"clients ({budgets.pop():,} client-steps per run)" if len(budgets) == 1 else "clients"


def plot_scaling(runs: list[dict]):
    """Final test accuracy against the number of clients (log axis), one panel per partition (IID
    first): per rule the mean over seeds and a ±1 sample std band (ddof = 1); centralised dashed."""
    styles = {m: st for m, st in STYLE.items() if m != "centralised"}
    fig = scaling.plot_scaling(runs, order=ORDER, rankless=RANKLESS, band="std", styles=styles,
                               xlabel=_budget_label(runs))
    fig.suptitle("MNIST toy: mean over seeds, band ±1 sample std", fontsize=10)
    fig.tight_layout()
    return fig


def scaling_table(runs: list[dict]) -> str:
    """Markdown: rule × clients, final test accuracy mean ± sample std (ddof = 1) (n = seeds), the rounds
    of each column, the change from the fewest to the most clients, and paired differences over seeds
    (rolora − fedavg, ffa − fedavg, rolora-chain − rolora) with 95% t-intervals."""
    note = ("Final test accuracy over seeds: mean ± sample std (ddof = 1); n = seeds; rounds per column as run "
            "(`rounds_done`); the last column is the change of the mean from the fewest to the most clients.")
    return "\n".join([note, ""] + scaling.scaling_blocks(runs, order=ORDER, rankless=RANKLESS)) + "\n"


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=130)
        paths.append(p)
    plt.close(fig)
    return paths


def _write(out_dir: Path, name: str, text: str) -> Path:
    path = out_dir / name
    path.write_text(text)
    return path


def _sweep_outputs(name: str, group: list[dict], out_dir: Path) -> list[Path]:
    """One sweep (not scaling): accuracy vs round and vs bytes per client setting at the sweep's main
    rank (not for the rank sweep), the summary table, the pivot and the paired table."""
    written = []
    ranks = {r["rank"] for r in group}
    main_rank = max(ranks, key=lambda k: sum(r["rank"] == k for r in group))
    at_rank = [r for r in group if r["rank"] == main_rank]
    if name != "rank":
        for setting in sorted({r["setting"] for r in at_rank} - {"centralised"}):
            slug = setting.replace(" ", "_")
            written += _save(plot_accuracy_vs_round(at_rank, setting), out_dir, f"mnist_{name}_accuracy_vs_round_{slug}")
            written += _save(plot_accuracy_vs_bytes(at_rank, setting), out_dir, f"mnist_{name}_accuracy_vs_bytes_{slug}")
    written.append(_write(out_dir, f"mnist_{name}_table.md", summary_table(group)))
    written.append(_write(out_dir, f"mnist_{name}_pivot.md", pivot_table(group)))
    written.append(_write(out_dir, f"mnist_{name}_paired.md", paired_table(group)))
    tuning = tuning_table(group)
    if tuning:
        written.append(_write(out_dir, f"mnist_{name}_tuning.md", tuning))
    return written


def _scaling_outputs(name: str, runs: list[dict], out_dir: Path) -> list[Path]:
    """A client-scaling sweep: accuracy against clients and the scaling table on its client axis (the
    main local work; a local-work axis gets its own block in the table), the paired table, the lr
    search, and ``mnist_<name>_drops.md`` (``figures.drops``: drops from the fewest clients, their
    differences between rules, Holm-corrected per table)."""
    work = main_work(runs)
    axis = [r for r in runs if r["method"] == scaling.CENTRAL or r["local_work"] == work]
    written = _save(plot_scaling(axis), out_dir, f"mnist_{name}_accuracy_vs_clients")
    table = scaling_table(axis)
    extra = local_work_block(runs)
    written.append(_write(out_dir, f"mnist_{name}_table.md", table + ("\n" + extra if extra else "")))
    written.append(_write(out_dir, f"mnist_{name}_paired.md", paired_table(runs)))
    tuning = tuning_table(runs)
    if tuning:
        written.append(_write(out_dir, f"mnist_{name}_tuning.md", tuning))
    text = drops.drops_markdown(axis, order=ORDER, rankless=RANKLESS, note=f"Local work: {work} per round.")
    if text:
        written.append(_write(out_dir, f"mnist_{name}_drops.md", text))
    return written


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    """Per sweep: accuracy vs round and vs bytes for each client setting (at the sweep's main rank), the
    summary, pivot and paired tables. Accuracy vs rank pools every sweep's runs of one (setting, local
    work, rounds). The scaling sweep (when present) gets its own figure, table and paired table and
    stays out of the others."""
    runs = load_runs(Path(results_dir))
    if not runs:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    others = [r for r in runs if r.get("sweep") not in SCALING_SWEEPS + (DP,)]  # figures.dp draws the dp sweep
    for (sweep,), group in sorted(_groups(others, "sweep").items(), key=lambda kv: str(kv[0])):
        written += _sweep_outputs(sweep or "runs", group, out_dir)
    for sweep in SCALING_SWEEPS:
        scal = scaling_runs(runs, sweep)
        if scal:
            written += _scaling_outputs(sweep, scal, out_dir)
    for (setting, work, rounds), group in _groups(
            [dict(r, n_rounds=r["config"]["rounds"]) for r in others], "setting", "local_work", "n_rounds").items():
        if setting == "centralised":
            continue
        by_method = _groups(group, "method")
        multi = [r for (m,), g in by_method.items() if len({x["rank"] for x in g}) > 1 for r in g]
        if multi:
            slug = f"{setting}_{work}".replace(" ", "_")
            written += _save(plot_accuracy_vs_rank(multi), out_dir, f"mnist_accuracy_vs_rank_{slug}")
    return written
