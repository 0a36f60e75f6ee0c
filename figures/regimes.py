"""The scaling claim across regimes, in one table: the drop 3 → 50 clients per rule, side by side.

The claim under test (RoLoRA, Chen et al. 2024, arXiv:2409.02346, Table 2): going from 3 to 50 clients,
FedAvg-LoRA and FFA-LoRA lose accuracy and RoLoRA does not. This project measures the same drop in
several regimes; each has its own full table (``*_drops.md``), and ``regimes_drops.md`` puts them in
columns so the verdict can be read across them:

- **paper**: Table 2's drop (RoBERTa-Large, rank 2, 20 local steps), the mean over its five tasks
  (SST-2 / QNLI / MNLI / QQP / RTE), as a fraction; one run per cell in the paper, so no interval;
- **LLM, 2 steps**: the committed study (``scaling`` with its controls pooled; MiniLM, LoRA on the top
  block, rank 2, 2 local steps);
- **LLM, 20 steps**: the paper's local work (``paper_regime``; top 3 blocks, rank 2, 20 local steps);
- **toy, 20 steps**: the MNIST toy at the paper's schedule (``paper_scaling``; rank 8, 20 local steps).

Each measured cell: drop D_s = acc_s(3) − acc_s(50) paired by seed, mean [95% t-interval] (n seeds),
``figures.stats.paired_test``; the second table gives the differences of drops of ``figures.drops``'
pairs (rolora − fedavg, each chained rule − its plain rule). Each of the two tables is one Holm family
over every cell it tests (†: survives at family-wise 5%); **bold**: the interval excludes 0.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .drops import DROP_PAIRS, HEAD_ONLY, drop_by_seed, seed_cells
from .stats import holm, paired_test

__all__ = ["REGIMES", "regime_cells", "paper_drop", "regimes_markdown", "make_all"]

K0, K1 = 3, 50
RULES = ("fedavg", "fedavg-chain", "ffa", "ffa-chain", "rolora", "rolora-chain", "fedex", HEAD_ONLY)
# column label -> (tier, sweep, local steps, rank)
REGIMES = {"LLM, 2 steps": ("llm", "scaling", 2, 2), "LLM, 20 steps": ("llm", "paper_regime", 20, 2),
           "toy, 20 steps": ("toy", "paper_scaling", 20, 8)}
PAPER = "paper (Table 2)"


def _steps(r: dict) -> int | None:
    if "config" in r and "local_steps" in r["config"]:
        return int(r["config"]["local_steps"])
    work = r.get("local_work", "")
    return int(work.split()[0]) if work.endswith("steps") else None


def regime_cells(runs: list[dict], sweep: str, steps: int, rank: int, rankless=()) -> dict:
    """(method, partition, clients) -> {seed: final test accuracy} for the eval runs of ``sweep`` at
    ``steps`` local steps and ``rank`` (rank-free rules at any rank)."""
    rs = [r for r in runs if r.get("sweep") == sweep and r.get("role") == "eval" and _steps(r) == steps
          and (r["rank"] == rank or r["method"] in rankless)]
    cells = seed_cells(rs, rankless)
    return {(m, part, k): v for (m, part, rk, k), v in cells.items() if rk == rank}


def paper_drop(method: str) -> float | None:
    """Table 2's drop 3 → 50 clients, the mean over its five tasks, as a fraction (None: not reported)."""
    from .llm import PAPER_TABLE2

    if (method, K0) not in PAPER_TABLE2:
        return None
    a, b = PAPER_TABLE2[(method, K0)], PAPER_TABLE2[(method, K1)]
    return (sum(a) - sum(b)) / len(a) / 100.0


def _drops(cells: dict, method: str, part: str) -> dict:
    return drop_by_seed({(m, p, 0, k): v for (m, p, k), v in cells.items()}, method, part, 0, K0, K1)


def _family(rows: list[tuple[tuple, dict, dict]]) -> dict:
    """key -> (mean, lo, hi, n, p, survives Holm) for every row with ≥ 2 common seeds (one family)."""
    tested = {}
    for key, a, b in rows:
        mean, lo, hi, n, p = paired_test(a, b)
        if n >= 2:
            tested[key] = (mean, lo, hi, n, p)
    keep = holm([t[4] for t in tested.values()])
    return {key: (*t, ok) for (key, t), ok in zip(tested.items(), keep)}


def _cell(res) -> str:
    if res is None:
        return "–"
    mean, lo, hi, n, _, ok = res
    text = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return (f"**{text}**" if lo > 0 or hi < 0 else text) + f" ({n}){' †' if ok else ''}"


def _table(title: str, labels: list[str], rows: list[tuple[tuple, dict, dict]], paper=None) -> list[str]:
    fam = _family(rows)
    if not fam:
        return []
    keys = list(dict.fromkeys(k[:2] for k, _, _ in rows))  # (partition, row label) in order
    cols = list(REGIMES)
    head = ["partition", labels[0]] + ([PAPER] if paper else []) + cols
    lines = [f"**{title}**", "",
             f"{len(fam)} tested cells in this table (one family); † = survives the Holm–Bonferroni correction at "
             f"family-wise 5% ({sum(v[5] for v in fam.values())} of {len(fam)}); **bold** = the 95% t-interval "
             "excludes 0 (uncorrected); (n) = seeds; – = not run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for part, label in keys:
        if not any((part, label, c) in fam for c in cols):
            continue
        cells = [part, label]
        if paper:
            v = paper(label) if part == "iid" else None
            cells.append("–" if v is None else f"{v:+.3f}")
        lines.append("| " + " | ".join(cells + [_cell(fam.get((part, label, c))) for c in cols]) + " |")
    return lines + [""]


def regimes_markdown(by_regime: dict[str, dict]) -> str:
    """Markdown: the drop table and the difference-of-drops table across ``by_regime`` (column label ->
    ``regime_cells`` output). "" when no regime has a drop with two seeds."""
    parts = [p for p in ("iid", "dirichlet") if any(k[1] == p for c in by_regime.values() for k in c)]
    drop_rows, diff_rows = [], []
    for part in parts:
        for m in RULES:
            for col, cells in by_regime.items():
                d = _drops(cells, m, part)
                drop_rows.append(((part, m, col), d, {s: 0.0 for s in d}))
        for a, b in DROP_PAIRS:
            for col, cells in by_regime.items():
                drop_rows_a, drop_rows_b = _drops(cells, a, part), _drops(cells, b, part)
                diff_rows.append(((part, f"{a} − {b}", col), drop_rows_a, drop_rows_b))
    lines = ["Drop in final test accuracy from 3 to 50 clients across regimes, D_s = acc_s(3) − acc_s(50) "
             "paired by seed (positive = accuracy lost with more clients); mean [95% t-interval] (n seeds). "
             "The paper column is Table 2 of RoLoRA (RoBERTa-Large, rank 2, 20 local steps, disjoint shards; shown in the IID rows), the mean "
             "drop over its five tasks, one run per cell. Columns: " + "; ".join(
                 f"{c} = `{t[1]}` ({t[0]}, rank {t[3]})" for c, t in REGIMES.items()) + ".", ""]
    body = _table("Drop 3 → 50 per rule (H0: no drop)", ["rule"], drop_rows, paper=paper_drop)
    body += _table("Difference of drops, paired by seed: drop(a) − drop(b) (negative = a loses less)", ["a − b"],
                   diff_rows)
    return "\n".join(lines + body) + "\n" if body else ""


def load_regimes(results_dir: Path) -> dict[str, dict]:
    """Column label -> ``regime_cells`` from the result files under ``results_dir``."""
    from . import llm, mnist

    llm_runs = llm.pool_sweeps(llm.load_runs(results_dir))
    toy_runs = mnist.load_runs(results_dir)
    out = {}
    for col, (tier, sweep, steps, rank) in REGIMES.items():
        runs, rankless = (llm_runs, llm.RANKLESS) if tier == "llm" else (toy_runs, mnist.RANKLESS)
        out[col] = regime_cells(runs, sweep, steps, rank, rankless)
    return out


def make_all(results_dir: Path, out_dir: Path) -> list[Path]:
    text = regimes_markdown(load_regimes(Path(results_dir)))
    if not text:
        return []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "regimes_drops.md"
    path.write_text(text)
    return [path]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=Path("results/figures"))
    a = ap.parse_args()
    for p in make_all(a.results, a.out):
        print(p)
