"""figures.stats (t-intervals, paired differences, sample std, last-10% mean) and what the MNIST-toy
tables and the shared client-scaling figure/table make of them, on small synthetic records."""
import json
import math

import numpy as np
import pytest

from figures import mnist, scaling
from figures.stats import format_paired, paired, significant, summary, t975, tail_mean


# ---- the t quantile ---------------------------------------------------------------------------------------
def _t_cdf(t: float, dof: int, steps: int = 20_000) -> float:
    """P(T ≤ t) for Student's t by Simpson's rule on the density (independent of the table)."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    x = np.linspace(0.0, t, steps + 1)
    f = c * (1 + x**2 / dof) ** (-(dof + 1) / 2)
    h = t / steps
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


# t_{0.975, 2} and t_{0.975, 4} to 10 decimals: 4.302652730 and 2.776445105 (the published tables give 3)
T2, T4 = 4.302652730, 2.776445105


def test_t975_known_values():
    # the t quantile now comes from scipy: it equals the published 3-decimal values once rounded
    assert [round(t975(d), 3) for d in (1, 2, 4, 30)] == [12.706, 4.303, 2.776, 2.042]
    assert t975(2) == pytest.approx(T2, abs=1e-9) and t975(4) == pytest.approx(T4, abs=1e-9)
    with pytest.raises(ValueError):
        t975(0)


@pytest.mark.parametrize("dof", list(range(1, 31)))
def test_t975_table_is_the_quantile_to_3_decimals(dof):
    # the tabled value t is the 0.975 quantile rounded to 3 decimals: P(T ≤ t ∓ 0.0005) brackets 0.975
    t = t975(dof)
    assert _t_cdf(t - 0.0005, dof) < 0.975 < _t_cdf(t + 0.0005, dof)


@pytest.mark.parametrize("dof", [31, 35, 50, 100, 500])
def test_t975_beyond_the_table_is_the_quantile(dof):
    t = t975(dof)
    assert abs(_t_cdf(t, dof) - 0.975) < 1e-5
    assert t > 1.96 + 0.5 / dof  # not the normal value: the t tail is heavier


# ---- summary, paired, significant ------------------------------------------------------------------------
def test_summary_by_hand_uses_sample_std():
    mean, sd, half, n = summary([0.80, 0.82, 0.84, 0.86, 0.88])
    # deviations ±0.04, ±0.02, 0: Σ = 0.004; s² = 0.004 / (5 − 1) (ddof = 0 would give 0.004 / 5)
    assert n == 5 and mean == pytest.approx(0.84)
    assert sd == pytest.approx(math.sqrt(0.001), rel=1e-12)
    assert half == pytest.approx(T4 * math.sqrt(0.001) / math.sqrt(5), rel=1e-9)


def test_summary_of_one_value_has_no_spread():
    mean, sd, half, n = summary([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(sd) and math.isnan(half)


def test_paired_by_hand_over_common_seeds():
    a = {0: 0.81, 1: 0.82, 2: 0.83, 5: 0.99}  # seed 5 has no partner: left out
    b = {0: 0.80, 1: 0.80, 2: 0.80, 7: 0.10}
    mean, lo, hi, n = paired(a, b)  # d = 0.01, 0.02, 0.03: mean 0.02, s = 0.01, dof 2
    h = T2 * 0.01 / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(0.02)
    assert lo == pytest.approx(0.02 - h) and hi == pytest.approx(0.02 + h)
    assert not significant(lo, hi)  # 0.02 − 0.0248 < 0


def test_paired_pairs_by_seed_not_by_position():
    # a seed-to-seed spread of ±0.1 shared by both rules hides a constant +0.01 unless paired by seed
    base = {0: 0.7, 1: 0.9, 2: 0.8}
    a = {s: v + 0.01 for s, v in base.items()}
    mean, lo, hi, n = paired(a, base)
    assert (n, round(mean, 12), round(lo, 12), round(hi, 12)) == (3, 0.01, 0.01, 0.01)
    mean, lo, hi, n = paired(dict(zip((2, 0, 1), a.values())), base)  # shuffled seeds: no longer constant
    assert hi - lo > 0.1


def test_significant_exactly_when_the_interval_excludes_zero():
    assert significant(0.001, 0.002) and significant(-0.003, -0.001)
    assert not significant(-0.001, 0.002) and not significant(0.0, 0.002)
    assert not significant(float("nan"), float("nan"))
    assert format_paired(0.02, 0.01, 0.03) == "**+0.020 [+0.010, +0.030]**"
    assert format_paired(0.02, -0.01, 0.05) == "+0.020 [-0.010, +0.050]"


def test_tail_mean_is_the_last_tenth_of_rounds():
    curve = [(t, t / 100) for t in range(20)]
    assert tail_mean(curve, 20) == pytest.approx((0.18 + 0.19) / 2)  # ⌈0.1 · 20⌉ = 2 rounds
    curve = [(t, t / 100) for t in range(30)]
    assert tail_mean(curve, 30) == pytest.approx((0.27 + 0.28 + 0.29) / 3)
    curve = [(t, t / 100) for t in range(50)]
    assert tail_mean(curve, 50, 0.14) == pytest.approx(np.mean(np.arange(43, 50)) / 100)  # 0.14·50 = 7.000…01: k = 7
    sparse = [(t, t / 100) for t in (4, 9, 14, 19)]  # evaluated every 5th round: only round 19 is in the last 2
    assert tail_mean(sparse, 20) == pytest.approx(0.19)
    assert tail_mean([(0, 0.5), (1, 0.7)], 2) == pytest.approx(0.7)  # at least one round
    with pytest.raises(ValueError):
        tail_mean([(3, 0.5)], 20)


# ---- MNIST-toy tables on synthetic records -----------------------------------------------------------------
def _toy(method, seed, final, *, setting="10x1 labels", work="20 steps", rank=8, rounds=10, curve=None, lr=0.1,
         sweep="main", partition="labels", clients=10, role="eval"):
    curve = curve or [final] * rounds
    return dict(method=method, seed=seed, setting=setting, local_work=work, rank=rank, lr=lr, sweep=sweep,
                partition=partition, clients=clients, role=role, complete=True, rounds_done=len(curve),
                final_test_accuracy=final, config=dict(rounds=len(curve), local_steps=20),
                rounds=[dict(round=t, test_accuracy=a, uplink_bytes=1, downlink_bytes=1) for t, a in enumerate(curve)])


def test_summary_table_sample_std_interval_and_last_tenth():
    finals = [0.80, 0.82, 0.84, 0.86, 0.88]
    # 20 rounds: the last 10% is the last two
    runs = [_toy("fedavg", s, f, curve=[0.5] * 18 + [f - 0.1, f]) for s, f in enumerate(finals)]
    table = mnist.summary_table(runs)
    row = next(line for line in table.splitlines() if "| fedavg |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "0.840 ± 0.032"  # ddof = 0 would print 0.028
    assert cells[6] == f"{2.776 * math.sqrt(0.001) / math.sqrt(5):.3f}" == "0.039"
    assert cells[7] == "0.790 ± 0.032"  # per seed (f − 0.1 + f)/2 = f − 0.05, then over seeds
    assert cells[8] == "5"
    assert cells[9] == "0.800"  # the worst seed
    assert "ddof = 1" in table


def test_pivot_states_and_uses_sample_std():
    runs = [_toy("fedavg", s, f) for s, f in enumerate([0.80, 0.82, 0.84, 0.86, 0.88])]
    pivot = mnist.pivot_table(runs)
    assert "mean ± sample std (ddof = 1)" in pivot and "0.840 ± 0.032" in pivot and "0.028" not in pivot


def test_curve_band_is_sample_std():
    runs = [_toy("fedavg", s, f, curve=[f - 0.1, f]) for s, f in enumerate([0.8, 0.9])]
    _, mu, sd = mnist._curve(runs, mnist._round_x)
    assert mu == pytest.approx([0.75, 0.85]) and sd == pytest.approx([0.05 * math.sqrt(2)] * 2)


def _paired_fixture():
    runs = []
    for seed, noise in enumerate((0.0, 0.02, -0.02)):
        runs.append(_toy("fedavg", seed, 0.80 + noise))
        runs.append(_toy("rolora", seed, 0.85 + noise))  # +0.05 on every seed: significant
        runs.append(_toy("ffa", seed, 0.80 + noise + (-1) ** seed * 0.05))  # ±0.05 alternating: covers 0
        runs.append(_toy("rolora-chain", seed, 0.80 + noise))  # −0.05 against rolora: significant
        runs.append(_toy("fedex", seed, 0.70 + noise))  # −0.10: significant
    runs.append(_toy("centralised", 0, 0.95, setting="centralised", clients=1))
    return runs


def test_paired_table_bold_only_when_the_interval_excludes_zero():
    table = mnist.paired_table(_paired_fixture())
    header = next(line for line in table.splitlines() if line.startswith("| setting"))
    row = next(line for line in table.splitlines() if line.startswith("| 10x1 labels"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
    assert vals["n"] == "3"
    assert vals["rolora − fedavg"] == "**+0.050 [+0.050, +0.050]**"
    assert vals["fedex − fedavg"] == "**-0.100 [-0.100, -0.100]**"
    assert vals["rolora-chain − rolora"] == "**-0.050 [-0.050, -0.050]**"
    d = np.array([0.05, -0.05, 0.05])
    h = 4.303 * d.std(ddof=1) / math.sqrt(3)
    assert vals["ffa − fedavg"] == f"{d.mean():+.3f} [{d.mean() - h:+.3f}, {d.mean() + h:+.3f}]"  # not bold
    assert "centralised − fedavg" not in cols
    assert ("rule − fedavg: 2 of 4 (1 above fedavg, 1 below); rolora-chain − rolora: 1 of 1 (0 above rolora, "
            "1 below)") in table


# ---- the client-scaling figure and table (shared with the LLM tier) --------------------------------------
BASE = {("fedavg", "iid", 5): 0.90, ("fedavg", "iid", 20): 0.80, ("rolora", "iid", 5): 0.92,
        ("rolora", "iid", 20): 0.85, ("fedavg", "dirichlet", 5): 0.85, ("fedavg", "dirichlet", 20): 0.70,
        ("rolora", "dirichlet", 5): 0.86, ("rolora", "dirichlet", 20): 0.78}
NOISE = (-0.02, 0.005, 0.015)  # mean 0, sample std 0.018 (ddof = 0: 0.015; range −0.02..+0.015)


def _scaling_runs():
    runs = []
    for (method, part, clients), acc in BASE.items():
        for seed, noise in enumerate(NOISE):
            noise = noise if not (method == "rolora" and part == "dirichlet") else NOISE[(seed + 1) % 3]
            setting = f"{clients} clients " + ("iid" if part == "iid" else "Dir(0.5)")
            runs.append(_toy(method, seed, acc + noise, setting=setting, work="10 steps", partition=part,
                             clients=clients, rounds=100 // clients, sweep="scaling"))
    for seed, acc in enumerate((0.94, 0.95, 0.96)):
        runs.append(_toy("centralised", seed, acc, setting="centralised", work="10 steps", clients=1,
                         rounds=10, sweep="scaling"))
    return runs


def test_scaling_runs_are_the_sweeps_eval_runs():
    keep = dict(sweep="scaling", role="eval")
    assert mnist.scaling_runs([dict(sweep="scaling", role="tune"), dict(sweep="main", role="eval"), keep]) == [keep]


def test_scaling_table_rows_and_paired_block():
    table = mnist.scaling_table(_scaling_runs())
    lines = table.splitlines()
    assert lines.index("**iid, rank 8** (test accuracy, mean ± std over seeds; n = seeds)") < \
        lines.index("**dirichlet, rank 8** (test accuracy, mean ± std over seeds; n = seeds)")
    assert "| rule | 5 clients (20 rounds) | 20 clients (5 rounds) | 5 → 20 |" in lines
    assert "| fedavg | 0.900 ± 0.018 (n=3) | 0.800 ± 0.018 (n=3) | -0.100 |" in lines  # ddof = 0: 0.015
    assert "| rolora | 0.920 ± 0.018 (n=3) | 0.850 ± 0.018 (n=3) | -0.070 |" in lines
    assert "| centralised | 0.950 ± 0.010 (n=3), same total steps | | |" in lines
    assert "| iid, r8 | rolora − fedavg | **+0.020 [+0.020, +0.020]** | **+0.050 [+0.050, +0.050]** |" in lines
    dirichlet = next(line for line in lines if line.startswith("| dirichlet, r8 | rolora − fedavg"))
    at5, at20 = [c.strip() for c in dirichlet.strip("|").split("|")[2:]]
    # rolora's noise is shifted against fedavg's: d = base + (0.025, 0.01, −0.035); dof 2
    h = 4.303 * np.std([0.025, 0.01, -0.035], ddof=1) / math.sqrt(3)
    assert at5 == f"+0.010 [{0.01 - h:+.3f}, {0.01 + h:+.3f}]"  # covers 0: plain
    assert at20 == f"**+0.080 [{0.08 - h:+.3f}, {0.08 + h:+.3f}]**"  # excludes 0: bold
    assert not any("ffa − fedavg" in line or "rolora-chain − rolora" in line for line in lines)  # not run
    assert "ddof = 1" in lines[0]


def test_scaling_plot_mean_band_and_centralised():
    fig = mnist.plot_scaling(_scaling_runs())
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["iid, rank 8", "dirichlet, rank 8"]
    iid = axes[0]
    assert iid.get_xscale() == "log" and list(iid.get_xticks()) == [5, 20]
    lines = {ln.get_label().split(" (")[0]: ln for ln in iid.get_lines()}
    assert list(lines["fedavg"].get_xdata()) == [5, 20]
    assert lines["fedavg"].get_ydata() == pytest.approx([0.90, 0.80])
    assert lines["fedavg"].get_color() == mnist.STYLE["fedavg"]["color"]
    band = iid.collections[0].get_paths()[0].vertices  # fedavg's fill: mean ± sample std
    at5 = band[np.isclose(band[:, 0], 5), 1]
    sd = np.std(NOISE, ddof=1)  # not the range over seeds, not ddof = 0
    assert at5.min() == pytest.approx(0.90 - sd) and at5.max() == pytest.approx(0.90 + sd)
    cent = next(ln for ln in iid.get_lines() if ln.get_label().startswith("centralised"))
    assert cent.get_linestyle() == "--" and cent.get_ydata()[0] == pytest.approx(0.95)
    from figures.common import plt

    plt.close(fig)


def test_scaling_band_kinds():
    ys = [np.array([0.1, 0.2, 0.6])]
    assert scaling._band(ys, "minmax") == ([0.1], [0.6])
    lo, hi = scaling._band(ys, "std")
    assert hi[0] - lo[0] == pytest.approx(2 * np.std(ys[0], ddof=1))
    with pytest.raises(ValueError):
        scaling._band(ys, "iqr")


def test_make_all_keeps_scaling_out_of_the_main_figures(tmp_path):
    root = tmp_path / "mnist_toy"
    root.mkdir()
    runs = _scaling_runs() + [r for r in _paired_fixture() if r["method"] in ("fedavg", "rolora", "centralised")]
    runs.append(_toy("fedavg", 9, 0.5, sweep="scaling", role="tune", partition="iid", clients=5,
                     setting="5 clients iid"))  # an lr-tuning run: never in a table
    for i, r in enumerate(runs):
        (root / f"{i}.json").write_text(json.dumps(r))
    names = {p.name for p in mnist.make_all(tmp_path, tmp_path / "fig")}
    assert {"mnist_scaling_accuracy_vs_clients.png", "mnist_scaling_table.md", "mnist_scaling_paired.md",
            "mnist_main_table.md", "mnist_main_pivot.md", "mnist_main_paired.md",
            "mnist_main_accuracy_vs_round_10x1_labels.png"} <= names
    assert not any(n.startswith("mnist_scaling_accuracy_vs_round") or n.startswith("mnist_scaling_pivot")
                   for n in names)
    main = (tmp_path / "fig" / "mnist_main_table.md").read_text()
    assert "clients iid" not in main and "10 steps" not in main
    paired_scaling = (tmp_path / "fig" / "mnist_scaling_paired.md").read_text()
    rows = [line.split("|")[1].strip() for line in paired_scaling.splitlines() if line.startswith("| ") and
            "clients" in line]
    assert rows == ["5 clients iid", "20 clients iid", "5 clients Dir(0.5)", "20 clients Dir(0.5)"]
    assert "0.500" not in (tmp_path / "fig" / "mnist_scaling_table.md").read_text()  # the tuning run is out


def test_tuning_table_shows_every_lr_tried_bolds_the_chosen_and_flags_an_edge():
    table = {"0.05": dict(mean_val_accuracy=0.80), "0.1": dict(mean_val_accuracy=0.85),
             "0.2": dict(mean_val_accuracy=0.83)}
    edge = {"0.05": dict(mean_val_accuracy=0.60), "0.1": dict(mean_val_accuracy=0.70)}
    runs = [dict(_toy("fedavg", s, 0.8, lr=0.1), tune_val_accuracy=table, tune_seeds=[100, 101, 102],
                 lr_tuned_on="this setting") for s in range(3)]
    runs += [dict(_toy("ffa", 0, 0.4, lr=0.1, setting="5x2 labels"), tune_val_accuracy=edge, tune_seeds=[100],
                  lr_tuned_on="10x1_labels")]
    text = mnist.tuning_table(runs)
    rows = [line for line in text.splitlines() if line.startswith("| 10x1")]
    assert len(rows) == 2  # one row per tuned cell, not per seed; the ffa row names where it was tuned
    fedavg = next(r for r in rows if "| fedavg |" in r)
    assert "0.05: 0.800 · **0.1: 0.850** · 0.2: 0.830" in fedavg and fedavg.endswith("| yes |")
    assert next(r for r in rows if "| ffa |" in r).endswith("| no (edge) |")
    assert mnist.tuning_table([_toy("fedavg", 0, 0.8)]) == ""  # untuned (fixed-lr) runs: no table


def test_make_all_leaves_the_dp_sweep_to_figures_dp(tmp_path):
    root = tmp_path / "mnist_toy"
    root.mkdir()
    runs = [dict(_toy("fedavg", s, 0.8 - 0.1 * (e is not None), sweep="dp"), dp_epsilon=e)
            for s in range(2) for e in (None, 1.0)]  # two ε share a setting name: they must not be pooled
    for i, r in enumerate(runs):
        (root / f"{i}.json").write_text(json.dumps(r))
    assert not any("dp" in p.name for p in mnist.make_all(tmp_path, tmp_path / "fig"))
