"""figures.stats' paired t-test and Holm correction, and figures.drops (the drop from few to many clients
paired by seed, differences of drops, gains over head-only) with the tables it writes, on synthetic records."""
import json
import math

import pytest
from scipy import stats as st

from figures import drops, llm, mnist
from figures.stats import holm, paired_test, ttest_p


# ---- the paired t-test and Holm ----------------------------------------------------------------------------
def test_ttest_p_by_hand_and_equal_to_ttest_rel():
    # d = 0.01, 0.02, 0.03: t = 0.02 / (0.01/√3) = 2√3, dof 2; the t(2) cdf is 1/2 + t / (2√(2 + t²)),
    # so the two-sided p = 1 − t/√(2 + t²) = 1 − 2√3/√14
    assert ttest_p([0.01, 0.02, 0.03]) == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-9)
    a, b = [0.81, 0.74, 0.90, 0.66], [0.80, 0.70, 0.91, 0.60]
    assert ttest_p([x - y for x, y in zip(a, b)]) == pytest.approx(st.ttest_rel(a, b).pvalue, rel=1e-12)
    assert math.isnan(ttest_p([0.1]))
    assert ttest_p([0.05, 0.05, 0.05]) == 0.0 and ttest_p([0.0, 0.0]) == 1.0  # degenerate: no spread


def test_paired_test_pairs_by_seed():
    a = {0: 0.81, 1: 0.82, 2: 0.83, 5: 0.99}
    b = {2: 0.80, 0: 0.80, 1: 0.80, 7: 0.10}
    mean, lo, hi, n, p = paired_test(a, b)
    assert n == 3 and mean == pytest.approx(0.02) and p == pytest.approx(ttest_p([0.01, 0.02, 0.03]))


def test_holm_by_hand():
    # sorted: 0.005 ≤ 0.05/4 yes; 0.01 ≤ 0.05/3 yes; 0.03 ≤ 0.05/2 no: stop (0.04 is not rejected either)
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    # Holm rejects both where Bonferroni (0.05/2 each) would keep 0.03: 0.02 ≤ 0.025, then 0.03 ≤ 0.05
    assert holm([0.03, 0.02]) == [True, True]
    # a step-down: once one fails, larger p-values fail even under their own threshold (0.049 < 0.05/1)
    assert holm([0.001, 0.03, 0.049]) == [True, False, False]  # 0.03 > 0.05/2
    # nan (too few seeds) is neither rejected nor counted in m: m = 2 here
    assert holm([0.001, float("nan"), 0.04]) == [True, False, True]
    assert holm([]) == [] and holm([0.05]) == [True] and holm([0.0501]) == [False]
    assert holm([0.01, 0.02], alpha=0.01) == [False, False]


# ---- drops on synthetic records -------------------------------------------------------------------------
SEEDS = (0, 1, 2, 3)
NOISE = (0.0, 0.03, -0.02, 0.01)  # per seed, shared by every rule and client count: pairing removes it


def _rec(method, seed, clients, acc, *, partition="iid", rank=8, work="20 steps", sweep="paper_scaling"):
    return dict(method=method, seed=seed, clients=clients, partition=partition, rank=rank, local_work=work,
                final_test_accuracy=acc, sweep=sweep, role="eval", complete=True, rounds_done=30000 // (20 * clients),
                setting=f"{clients} clients {partition}", lr=0.1, config=dict(rounds=10, local_steps=20),
                rounds=[dict(round=0, test_accuracy=acc, uplink_bytes=1, downlink_bytes=1)])


# drop 3 → 50 per rule (the same on every seed except where a rule's own per-seed term is added)
DROP = {"fedavg": 0.10, "rolora": 0.06, "ffa": 0.08, "fedavg-chain": 0.02, "ffa-chain": 0.08, "rolora-chain": 0.0}
WOBBLE = (0.01, -0.01, 0.02, -0.02)  # ffa-chain's drop varies by seed: mean 0, so ffa-chain − ffa covers 0


def _runs(ks=(3, 20, 50)):
    runs = []
    for m, d in DROP.items():
        for s in SEEDS:
            for k in ks:
                frac = (k - ks[0]) / (ks[-1] - ks[0])
                extra = WOBBLE[s] * frac if m == "ffa-chain" else 0.0
                runs.append(_rec(m, s, k, 0.9 + NOISE[s] - d * frac - extra))
    runs.append(_rec("centralised", 0, 1, 0.97))
    return runs


def _rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "mean [" not in line]


def test_drop_targets():
    assert drops.drop_targets([3, 20, 50]) == (3, [50])
    assert drops.drop_targets([5, 10, 20, 50, 100]) == (5, [50, 100])
    assert drops.drop_targets([5, 10, 20]) == (5, [20])  # no 50: the most clients
    assert drops.drop_targets([3]) == (3, [])


def test_drop_by_seed_pairs_the_same_seed():
    cells = drops.seed_cells(_runs())
    d = drops.drop_by_seed(cells, "fedavg", "iid", 8, 3, 50)
    assert sorted(d) == list(SEEDS) and all(v == pytest.approx(0.10) for v in d.values())
    cells[("fedavg", "iid", 8, 50)] = dict(zip((1, 2, 3, 0), cells[("fedavg", "iid", 8, 50)].values()))  # mislabelled
    assert max(drops.drop_by_seed(cells, "fedavg", "iid", 8, 3, 50).values()) > 0.12  # the seed noise is back


def test_drops_markdown_rows_counts_and_holm():
    text = drops.drops_markdown(_runs(), order=mnist.ORDER)
    rows = {(r[1], r[2]): r for r in _rows(text)}
    assert rows[("fedavg", "3 → 50")][3:] == ["4", "**+0.100 [+0.100, +0.100]**", "<1e-4", "†"]
    assert rows[("rolora-chain", "3 → 50")][3:] == ["4", "+0.000 [+0.000, +0.000]", "1.000", ""]
    assert rows[("rolora − fedavg", "3 → 50")][4:] == ["**-0.040 [-0.040, -0.040]**", "<1e-4", "†"]
    assert rows[("fedavg-chain − fedavg", "3 → 50")][4] == "**-0.080 [-0.080, -0.080]**"
    d = [w for w in WOBBLE]  # ffa-chain − ffa: the per-seed wobble, mean 0
    h = st.t.ppf(0.975, 3) * st.tstd(d) / 2
    ffa = rows[("ffa-chain − ffa", "3 → 50")]
    assert ffa[4] == f"+0.000 [{-h:+.3f}, {h:+.3f}]" and ffa[5] == "1.000" and ffa[6] == ""
    assert "6 comparisons in this table (one family); † = survives the Holm–Bonferroni correction at family-wise " \
           "5% (5 of 6)" in text  # one drop per rule; rolora-chain's is 0
    assert "4 comparisons in this table (one family); † = survives the Holm–Bonferroni correction at family-wise " \
           "5% (3 of 4)" in text
    assert "head-only" not in text and "centralised" not in text


def test_drops_to_50_and_the_most_clients():
    text = drops.drops_markdown(_runs(ks=(5, 50, 100)), order=mnist.ORDER)
    rows = {(r[1], r[2]) for r in _rows(text)}
    assert {("fedavg", "5 → 50"), ("fedavg", "5 → 100"), ("rolora − fedavg", "5 → 100")} <= rows
    assert "12 comparisons" in text and "8 comparisons" in text
    assert drops.drops_markdown([r for r in _runs() if r["clients"] == 3], order=mnist.ORDER) == ""


def test_gain_over_head_only_at_each_client_count():
    runs = _runs() + [_rec("head-only", s, k, 0.85 + NOISE[s] - 0.001 * k) for s in SEEDS for k in (3, 20, 50)]
    text = drops.drops_markdown(runs, order=llm.METHOD_ORDER)
    table = text[text.index("Gain over the head-only"):]
    rows = {(r[1], r[2]): r for r in _rows(table)}
    assert len(rows) == 6 * 3 and "18 comparisons" in table
    # fedavg at 50: 0.9 − 0.10 − (0.85 − 0.05) = 0.0; at 3: 0.9 − (0.85 − 0.003) = 0.053
    assert rows[("fedavg − head-only", "3")][4] == "**+0.053 [+0.053, +0.053]**"
    assert rows[("fedavg − head-only", "50")][4:6] == ["+0.000 [+0.000, +0.000]", "1.000"]


def test_a_broken_holm_shows_in_the_table(monkeypatch):
    # the table's † column follows holm(): a Bonferroni-free "every p < 0.05" would mark all 5 nonzero drops
    monkeypatch.setattr(drops, "holm", lambda ps, alpha: [p < alpha for p in ps])
    assert "(5 of 6)" in drops.drops_markdown(_runs(), order=mnist.ORDER)


# ---- the tables the tiers write ---------------------------------------------------------------------------
def test_mnist_paper_scaling_outputs_keep_the_local_work_axis_apart(tmp_path):
    root = tmp_path / "mnist_toy" / "paper_scaling"
    root.mkdir(parents=True)
    runs = _runs()
    runs += [_rec(m, s, 50, 0.2, work="2 steps") for m in ("fedavg", "rolora") for s in SEEDS]  # local-work axis
    for i, r in enumerate(runs):
        (root / f"{i}.json").write_text(json.dumps(r))
    names = {p.name for p in mnist.make_all(tmp_path, tmp_path / "fig")}
    assert {"mnist_paper_scaling_table.md", "mnist_paper_scaling_drops.md", "mnist_paper_scaling_paired.md",
            "mnist_paper_scaling_accuracy_vs_clients.png"} <= names
    assert not any(n.startswith("mnist_paper_scaling_accuracy_vs_round") for n in names)
    text = (tmp_path / "fig" / "mnist_paper_scaling_drops.md").read_text()
    assert "| iid, r8 | fedavg | 3 → 50 | 4 | **+0.100 [+0.100, +0.100]** |" in text  # 2-step runs not pooled
    table = (tmp_path / "fig" / "mnist_paper_scaling_table.md").read_text()
    assert "**Local work at 50 clients, iid**" in table and "| fedavg | 0.200 ± 0.000 (n=4) |" in table
    paired = (tmp_path / "fig" / "mnist_paper_scaling_paired.md").read_text()
    assert "ffa-chain − ffa" in paired and "paired comparisons in this table; surviving a Holm" in paired


def _llm(method, seed, clients, acc, sweep, rank=2, partition="iid"):
    return dict(model_family="bert", model="minilm", task="tweets", method=method, seed=seed, clients=clients,
                partition=partition, rank=rank, final_test_accuracy=acc, sweep=sweep, role="eval", rounds_done=10,
                uplink_bytes=1000, rounds=[dict(round=0, test_accuracy=acc, uplink_bytes={"0": 1})])


def test_llm_controls_pool_with_scaling_and_frozen_head_is_its_own_table(tmp_path):
    recs = []
    for s in range(3):
        for k, base in ((3, 0.72), (50, 0.63)):
            noise = (0.0, 0.01, -0.01)[s]
            recs += [_llm("fedavg", s, k, base + noise, "scaling"), _llm("rolora", s, k, base + noise - 0.01, "scaling"),
                     _llm("fedavg-chain", s, k, base + noise + 0.02 * (k == 50), "scaling_controls"),
                     _llm("head-only", s, k, base + noise - 0.05, "scaling_controls"),
                     _llm("fedavg", s, k, base + noise - 0.2, "frozen_head"),
                     _llm("fedavg-chain", s, k, base + noise - 0.1, "frozen_head")]
    for i, r in enumerate(recs):
        d = tmp_path / "llm_scale" / r["sweep"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.json").write_text(json.dumps(r))
    names = {p.name for p in llm.make_all(tmp_path, tmp_path / "fig")}
    assert {"llm_scaling_table.md", "llm_scaling_drops.md", "llm_frozen_head_table.md",
            "llm_frozen_head_drops.md"} <= names
    assert not any("scaling_controls" in n for n in names)
    scal = (tmp_path / "fig" / "llm_scaling_drops.md").read_text()
    assert "| iid, r2 | fedavg-chain − fedavg | 3 → 50 | 3 | **-0.020 [-0.020, -0.020]** |" in scal
    assert "| iid, r2 | fedavg − head-only | 50 | 3 | **+0.050 [+0.050, +0.050]** |" in scal
    assert "head-only" in (tmp_path / "fig" / "llm_scaling_table.md").read_text()
    frozen = (tmp_path / "fig" / "llm_frozen_head_table.md").read_text()
    assert "| fedavg | 0.520 ± 0.010 (n=3) | 0.430 ± 0.010 (n=3) | -0.090 |" in frozen and "head-only" not in frozen


def test_equal_gaps_written_differently_are_equal():
    # 0.9 − 0.1 and 0.85 − 0.05 differ by 1e-16 in floating point: no "significant" constant difference
    a = {s: 0.9 + n - 0.1 for s, n in enumerate(NOISE)}
    b = {s: 0.85 + n - 0.05 for s, n in enumerate(NOISE)}
    mean, lo, hi, n, p = paired_test(a, b)
    assert (mean, lo, hi, p) == (0.0, 0.0, 0.0, 1.0)
