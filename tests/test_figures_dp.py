"""figures.dp: the accuracy-vs-ε table and figure from synthetic dp-sweep records of both tiers."""
from __future__ import annotations

import json
import math

import pytest

from figures.dp import dp_cells, dp_table, make_all
from figures.stats import t975


def _rec(method, eps, seed, acc, spent=None, role="eval"):
    return {"method": method, "seed": seed, "final_test_accuracy": acc, "dp_epsilon": eps, "role": role,
            "complete": True, "dp": None if eps is None else {"epsilon_spent_max": spent if spent else 0.99 * eps}}


RUNS = ([_rec("fedavg", None, s, 0.90 + 0.01 * s) for s in range(3)]
        + [_rec("fedavg", 1.0, s, 0.50 + 0.02 * s, spent=0.98) for s in range(3)]
        + [_rec("rolora", 1.0, s, 0.60 + 0.02 * s + 0.001 * s * s) for s in range(3)]
        + [_rec("ffa", 1.0, s, 0.60 + 0.01 * s) for s in range(3)])


def test_cells_put_no_dp_at_infinity():
    cells = dp_cells(RUNS)
    assert set(cells) == {("fedavg", math.inf), ("fedavg", 1.0), ("rolora", 1.0), ("ffa", 1.0)}
    assert cells[("fedavg", 1.0)] == {0: 0.50, 1: 0.52, 2: 0.54}


def test_table_means_sample_std_spent_and_paired_interval():
    md = dp_table(RUNS, "t")
    head = [line for line in md.splitlines() if line.startswith("| rule")][0]
    assert head.index("ε = 1") < head.index("∞ (no DP)")  # no DP in the last column
    assert "| fedavg | 0.520 ± 0.020 (n=3) | 0.910 ± 0.010 (n=3) |" in md  # ddof = 1: std of 0.50/0.52/0.54
    assert "| largest ε spent by any client | 0.990 | — |" in md
    # rolora − fedavg at ε = 1: d = 0.10, 0.101, 0.104 -> mean 0.1017, significant
    d = [0.10, 0.101, 0.104]
    m = sum(d) / 3
    h = t975(2) * (sum((x - m) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5
    assert f"**{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]** (n=3)" in md
    # rolora − ffa: d = 0, 0.011, 0.024 -> interval spans 0, not bold
    row = [line for line in md.splitlines() if line.startswith("| rolora − ffa")][0]
    assert "**" not in row


def test_make_all_reads_only_eval_records_of_each_tier(tmp_path):
    for i, r in enumerate(RUNS + [_rec("fedavg", 1.0, 9, 0.0, role="tune")]):
        d = tmp_path / "mnist_toy" / "dp" / f"c{i}"
        d.mkdir(parents=True)
        (d / "r.json").write_text(json.dumps(r))
    written = make_all(tmp_path, tmp_path / "fig")
    names = sorted(p.name for p in written)
    assert names == ["mnist_dp_accuracy_vs_epsilon.pdf", "mnist_dp_accuracy_vs_epsilon.png", "mnist_dp_table.md"]
    assert "(n=4)" not in (tmp_path / "fig" / "mnist_dp_table.md").read_text()  # the tune run is left out
    assert make_all(tmp_path / "nothing", tmp_path / "fig2") == []


def test_table_lists_the_lr_each_rule_and_eps_used():
    runs = [dict(r, lr=0.2 if r["dp_epsilon"] is None else 0.05) for r in RUNS]
    runs.append(dict(_rec("ffa", 1.0, 3, 0.6), config={"lr": 0.1}))  # lr found in the config too
    md = dp_table(runs, "t")
    lr_part = md.split("**Learning rate used**")[1].split("**Paired")[0]
    assert "| fedavg | 0.05 | 0.2 |" in lr_part and "| ffa | 0.05, 0.1 | — |" in lr_part
