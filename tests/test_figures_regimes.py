"""figures.regimes: the drop 3 → 50 clients per rule across regimes (paper, LLM 2 / 20 steps, toy)."""
from __future__ import annotations

import json

import pytest

from figures import regimes

NOISE = (0.0, 0.02, -0.01)  # per seed, shared by a seed's runs at 3 and 50 clients: pairing removes it


def _llm(method, seed, clients, acc, sweep, steps, rank=2, partition="iid"):
    return dict(model_family="bert", model="minilm", task="tweets", method=method, seed=seed, clients=clients,
                partition=partition, rank=rank, final_test_accuracy=acc, sweep=sweep, role="eval", rounds_done=10,
                uplink_bytes=1000, config=dict(local_steps=steps),
                rounds=[dict(round=0, test_accuracy=acc, uplink_bytes={"0": 1})])


def _toy(method, seed, clients, acc, steps=20, partition="iid"):
    return dict(method=method, seed=seed, clients=clients, partition=partition, rank=8, local_work=f"{steps} steps",
                final_test_accuracy=acc, sweep="paper_scaling", role="eval", complete=True, rounds_done=10, lr=0.1,
                setting=f"{clients} clients {partition}", config=dict(rounds=10, local_steps=steps),
                rounds=[dict(round=0, test_accuracy=acc, uplink_bytes=1, downlink_bytes=1)])


def _write(root, recs, tier):
    for i, r in enumerate(recs):
        d = root / tier / r["sweep"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{r['method']}_{r['clients']}_{r['seed']}_{i}.json").write_text(json.dumps(r))


def _pair(make, method, drop, base=0.8, **kw):
    return [make(method, s, k, base + NOISE[s] - drop * (k == 50), **kw) for s in range(3) for k in (3, 50)]


@pytest.fixture()
def results(tmp_path):
    llm = (_pair(_llm, "fedavg", 0.05, sweep="scaling", steps=2) + _pair(_llm, "rolora", 0.07, sweep="scaling", steps=2)
           + _pair(_llm, "fedavg", 0.10, sweep="paper_regime", steps=20)
           + _pair(_llm, "rolora", 0.02, sweep="paper_regime", steps=20)
           # not in the 20-step column: another rank, and a tuning run
           + _pair(_llm, "fedavg", 0.40, sweep="paper_regime", steps=20, rank=8)
           + [dict(r, role="tune") for r in _pair(_llm, "rolora", 0.5, sweep="paper_regime", steps=20)])
    toy = (_pair(_toy, "fedavg", 0.01) + _pair(_toy, "fedavg-chain", 0.0)
           # the local-work axis at 50 clients (2 steps) is not the 20-step column
           + [_toy("fedavg", s, 50, 0.1, steps=2) for s in range(3)])
    _write(tmp_path, llm, "llm_scale")
    _write(tmp_path, toy, "mnist_toy")
    return tmp_path


def _row(text, part, label, table=0):
    block = text.split("**")[1 + 2 * table:]  # the table's title onwards
    body = "**".join(block)
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[:2] == [part, label]:
            return cells
    return None


def test_each_regime_gets_its_own_drop_paired_by_seed(results, tmp_path):
    [path] = regimes.make_all(results, tmp_path / "fig")
    text = path.read_text()
    head = next(line for line in text.splitlines() if line.startswith("| partition | rule"))
    assert head == "| partition | rule | paper (Table 2) | LLM, 2 steps | LLM, 20 steps | toy, 20 steps |"
    fedavg = _row(text, "iid", "fedavg")
    assert fedavg[3].startswith("**+0.050 [+0.050, +0.050]** (3)")
    assert fedavg[4].startswith("**+0.100 [+0.100, +0.100]** (3)")  # not the rank-8 runs' 0.40
    assert fedavg[5].startswith("**+0.010 [+0.010, +0.010]** (3)")  # not the 2-step axis at 50 clients
    rolora = _row(text, "iid", "rolora")
    assert rolora[4].startswith("**+0.020 [+0.020, +0.020]** (3)") and rolora[5] == "–"  # tuning runs ignored
    assert _row(text, "iid", "ffa") is None  # ran nowhere: no row


def test_difference_of_drops_across_regimes(results, tmp_path):
    text = regimes.make_all(results, tmp_path / "fig")[0].read_text()
    diff = _row(text, "iid", "rolora − fedavg", table=1)
    assert diff[2].startswith("**+0.020 [+0.020, +0.020]** (3)")  # 0.07 − 0.05 at 2 steps
    assert diff[3].startswith("**-0.080 [-0.080, -0.080]** (3)")  # 0.02 − 0.10 at 20 steps
    assert diff[4] == "–"
    chain = _row(text, "iid", "fedavg-chain − fedavg", table=1)
    assert chain[4].startswith("**-0.010 [-0.010, -0.010]** (3)") and chain[2] == chain[3] == "–"


def test_paper_column_is_table2_mean_over_its_five_tasks():
    fedavg3 = (95.64, 92.04, 85.85, 86.16, 82.19)
    fedavg50 = (93.23, 82.57, 58.96, 76.96, 49.10)
    want = sum(a - b for a, b in zip(fedavg3, fedavg50)) / 5 / 100
    assert regimes.paper_drop("fedavg") == pytest.approx(want, abs=1e-12)
    assert regimes.paper_drop("rolora") < regimes.paper_drop("ffa") < regimes.paper_drop("fedavg")
    assert regimes.paper_drop("fedex") is None


def test_paper_column_in_the_table(results, tmp_path):
    text = regimes.make_all(results, tmp_path / "fig")[0].read_text()
    assert _row(text, "iid", "fedavg")[2] == f"{regimes.paper_drop('fedavg'):+.3f}" == "+0.162"
    assert _row(text, "iid", "fedavg-chain")[2] == "–"


def test_holm_marks_follow_the_correction(results, tmp_path, monkeypatch):
    text = regimes.make_all(results, tmp_path / "fig")[0].read_text()
    assert "(5 of 6)" in text and _row(text, "iid", "fedavg")[4].endswith("†")
    monkeypatch.setattr(regimes, "holm", lambda ps, alpha=0.05: [False] * len(ps))
    text = regimes.make_all(results, tmp_path / "fig2")[0].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| iid")]
    assert "(0 of 6)" in text and rows and not any("†" in line for line in rows)


def test_no_regime_no_file(tmp_path):
    assert regimes.make_all(tmp_path, tmp_path / "fig") == []


def test_make_figures_writes_the_regimes_table(results, tmp_path, capsys):
    from figures.__main__ import main

    assert main(["--results", str(results), "--out", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / "regimes_drops.md").is_file()
    assert "figures.regimes: 1 files" in capsys.readouterr().out
