"""figures.averaging: the per-round averaging error and accuracy against its mean, on synthetic records of
both tiers; records without the key (written before it existed) are skipped."""
import json

import numpy as np
import pytest

from figures import averaging
from figures.common import plt


def _ae(rel, update=2.0):
    return None if rel is None else dict(relative=rel, error=rel * update, update=update)


def _toy(method, seed, clients, errors, acc=0.8, *, partition="iid", work="20 steps", sweep="paper_scaling"):
    rounds = [dict(round=t, test_accuracy=acc, uplink_bytes=1, downlink_bytes=1) for t in range(len(errors))]
    for e, v in zip(rounds, errors):
        if v != "missing":
            e["averaging_error"] = _ae(v)
    return dict(method=method, seed=seed, clients=clients, partition=partition, rank=8, local_work=work,
                final_test_accuracy=acc, sweep=sweep, role="eval", complete=True, rounds_done=len(errors),
                setting=f"{clients} clients {partition}", lr=0.1, config=dict(rounds=len(errors), local_steps=20),
                rounds=rounds)


def test_error_series_skips_missing_and_null():
    r = _toy("fedavg", 0, 3, [0.1, None, "missing", 0.3, 0.5])
    r["rounds"][4]["averaging_error"] = dict(relative=None, error=0.0, update=0.0)  # no update: e_t undefined
    assert averaging.error_series(r) == [(0, 0.1), (3, 0.3)]
    assert averaging.mean_error(r) == pytest.approx(0.2)
    assert not averaging.has_error(_toy("fedavg", 0, 3, ["missing", "missing"]))  # an old record
    assert not averaging.has_error(_toy("fedavg", 0, 3, [None, None]))
    assert not averaging.has_error(dict(_toy("centralised", 0, 1, [0.0]), method="centralised"))


def _runs():
    runs = []
    for s in range(3):
        for k in (3, 50):
            runs.append(_toy("fedavg", s, k, [0.1 * (s + 1) * k / 3, 0.2 * (s + 1), 0.3], acc=0.9 - 0.01 * s))
            runs.append(_toy("fedex", s, k, [0.0, 0.0, 0.0], acc=0.85))
    runs.append(_toy("rolora", 0, 3, ["missing"] * 3))  # written before the key: left out
    return runs


def test_error_per_round_panels_log_y_mean_over_seeds():
    fig = averaging.plot_error_per_round(_runs())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["iid, 3 clients, 20 steps, r=8", "iid, 50 clients, 20 steps, r=8"]
    ax = axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "round" and "averaging error" in ax.get_ylabel()
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"fedavg (n=3)", "fedex: 0 (exact, n=3)"}  # rolora has no error recorded
    fedavg = lines["fedavg (n=3)"]
    assert list(fedavg.get_xdata()) == [1, 2, 3]
    assert fedavg.get_ydata() == pytest.approx([0.2, 0.4, 0.3])  # seeds' 0.1·(s+1) at round 0: mean 0.2
    assert len(lines["fedex: 0 (exact, n=3)"].get_xdata()) == 0
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.1) and band[:, 1].max() == pytest.approx(0.6)
    plt.close(fig)


def test_accuracy_against_mean_error_one_point_per_run():
    fig = averaging.plot_accuracy_vs_error(_runs())
    ax = fig.axes[0]
    assert ax.get_xlabel() == "mean relative averaging error over rounds" and ax.get_ylabel() == "final test accuracy"
    pts = np.vstack([c.get_offsets() for c in ax.collections])
    assert len(pts) == 12  # 2 rules × 3 seeds × 2 client counts; the old rolora record is out
    fedavg_3 = np.array(sorted(map(tuple, ax.collections[0].get_offsets())))  # fedavg, 3 clients
    # seed s: mean of (0.1(s+1), 0.2(s+1), 0.3) = 0.2, 0.3, 0.4 against accuracy 0.9 − 0.01 s
    assert fedavg_3 == pytest.approx(np.array([(0.2, 0.9), (0.3, 0.89), (0.4, 0.88)]))
    assert ax.get_xscale() == "symlog"  # exact rules sit at 0
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"fedavg", "fedex"}
    plt.close(fig)


def test_make_all_only_for_sweeps_that_carry_the_key(tmp_path):
    toy = tmp_path / "mnist_toy"
    toy.mkdir()
    recs = _runs() + [_toy("fedavg", s, 5, ["missing"] * 3, sweep="scaling") for s in range(2)]
    recs.append(dict(_toy("fedavg", 9, 3, [0.5] * 3), role="tune"))  # a tuning run: never drawn
    for i, r in enumerate(recs):
        (toy / f"{i}.json").write_text(json.dumps(r))
    llm_dir = tmp_path / "llm_scale"
    llm_dir.mkdir()
    rec = dict(_toy("ffa", 0, 3, [0.0, 0.0], sweep="frozen_head"), model_family="bert", model="minilm", task="tweets")
    rec.pop("local_work")
    rec["config"] = dict(local_steps=2)
    (llm_dir / "a.json").write_text(json.dumps(rec))
    names = sorted(p.name for p in averaging.make_all(tmp_path, tmp_path / "fig"))
    assert names == sorted(f"{stem}.{ext}" for stem in (
        "mnist_paper_scaling_averaging_error_vs_round", "mnist_paper_scaling_accuracy_vs_averaging_error",
        "llm_frozen_head_averaging_error_vs_round", "llm_frozen_head_accuracy_vs_averaging_error")
        for ext in ("png", "pdf"))
    assert averaging.cell_of(rec) == ("iid", 3, "2 steps", 8)
    assert all(r["role"] == "eval" for r in averaging.error_runs(tmp_path)[("mnist", "paper_scaling")])
