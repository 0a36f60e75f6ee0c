"""The toy's sweep machinery: fixed-budget schedules, lr tuning on several seeds with a grid that grows
past its edges, tuning on one partition and reuse on another."""
from __future__ import annotations

import json

import pytest

from mnist_toy import sweep as sweep_mod
from mnist_toy.sweep import PRESETS, Setting, Sweep, Work, run_sweep

from test_mnist_toy import mnist  # noqa: F401  (the session's real-MNIST fixture)


def test_scaling_preset_fixes_the_total_budget():
    sw = PRESETS["scaling"]
    work = sw.works[0]
    for st in sw.settings:
        assert sw.rounds(work, st.clients) * st.clients * work.local_steps == 10_000
    assert [sw.rounds(work, k) for k in (5, 10, 20, 50, 100)] == [200, 100, 50, 20, 10]
    cfg = sweep_mod._cfg(sw, work, None, "centralised", 8, lr=0.1, seed=0)  # same total steps as any federation
    assert cfg.rounds * cfg.clients * cfg.local_steps == 10_000
    assert {st.partition for st in sw.settings} == {"iid", "dirichlet"}
    assert sw.tune_setting(Setting(50, "iid")) == Setting(50, "dirichlet")
    assert sw.tune_setting(None) is None and len(sw.tune_seeds) >= 3 and not set(sw.tune_seeds) & set(sw.seeds)


def test_a_budget_that_is_not_whole_rounds_is_refused_at_construction():
    with pytest.raises(ValueError, match="not a whole number of rounds"):
        Sweep(name="x", settings=(Setting(3, "iid"),), works=(Work(10, 0, 0),), total_client_steps=1000)
    with pytest.raises(ValueError, match="epochs cannot be budgeted"):
        Sweep(name="x", settings=(Setting(5, "iid"),), works=(Work(0, 1, 0),), total_client_steps=1000)


def _fake_runs(monkeypatch, val):
    """Replace training by a table: val(lr, seed) -> final validation accuracy (None = diverged)."""
    calls = []

    def fake(cfg, path, data, extra):
        calls.append((cfg.lr, cfg.seed))
        return {"final_val_accuracy": val(cfg.lr, cfg.seed)}

    monkeypatch.setattr(sweep_mod, "_run_or_load", fake)
    return calls


def _probe(sw):
    return sweep_mod._cfg(sw, sw.works[0], sw.settings[0], "fedavg", 8, lr=sw.lr_grid[0], seed=sw.tune_seeds[0])


def test_tuning_picks_the_best_mean_over_tuning_seeds_not_one_seed(monkeypatch, tmp_path):
    # lr 0.1 is best on seed 100 alone (a lucky seed); lr 0.2 is best on average.
    table = {(0.05, 100): 0.5, (0.05, 101): 0.5, (0.05, 102): 0.5,
             (0.1, 100): 0.95, (0.1, 101): 0.55, (0.1, 102): 0.55,
             (0.2, 100): 0.80, (0.2, 101): 0.80, (0.2, 102): 0.80,
             (0.4, 100): 0.60, (0.4, 101): 0.60, (0.4, 102): 0.60}
    _fake_runs(monkeypatch, lambda lr, s: table[(round(lr, 6), s)])
    sw = Sweep(name="t", settings=(Setting(4, "iid"),), works=(Work(2, 0, 2),), lr_grid=(0.05, 0.1, 0.2),
               lr_extend=(), lr_factor=2.0, tune_seeds=(100, 101, 102), tune_setting_only=None)
    best, tuned = sweep_mod._tune(sw, _probe(sw), tmp_path, data=None)
    assert best == 0.2  # interior only after 0.4 was tried
    assert set(tuned) == {"0.05", "0.1", "0.2", "0.4"}
    assert tuned["0.1"]["val_accuracy"] == {"100": 0.95, "101": 0.55, "102": 0.55}
    assert tuned["0.2"]["mean_val_accuracy"] == pytest.approx(0.8)
    one_seed = Sweep(name="t", settings=(Setting(4, "iid"),), works=(Work(2, 0, 2),), lr_grid=(0.05, 0.1, 0.2),
                     lr_extend=(), lr_factor=2.0, tune_seeds=(100,), tune_setting_only=None)
    assert sweep_mod._tune(one_seed, _probe(one_seed), tmp_path, data=None)[0] == 0.1  # what one seed picks


def test_grid_grows_past_an_edge_until_the_best_is_interior(monkeypatch, tmp_path):
    calls = _fake_runs(monkeypatch, lambda lr, s: 1.0 - abs(lr - 1.6))  # peak at 1.6: three doublings past 0.2
    sw = Sweep(name="t", settings=(Setting(4, "iid"),), works=(Work(2, 0, 2),), lr_grid=(0.05, 0.1, 0.2),
               lr_extend=(), lr_factor=2.0, tune_seeds=(7, 8), tune_setting_only=None)
    best, tuned = sweep_mod._tune(sw, _probe(sw), tmp_path, data=None)
    assert best == pytest.approx(1.6) and max(float(k) for k in tuned) == pytest.approx(3.2)
    assert len(calls) == len(set(calls)) == 2 * 7  # 7 lrs × 2 seeds, none run twice
    # downward, and a diverged (None) run ranks last: 0.05 diverges, so 0.1 > 0.05 and the grid stops
    _fake_runs(monkeypatch, lambda lr, s: None if lr < 0.07 else 1.0 - lr)
    best, tuned = sweep_mod._tune(sw, _probe(sw), tmp_path, data=None)
    assert best == 0.1 and tuned["0.05"]["mean_val_accuracy"] == -1.0
    # bounds stop the growth
    _fake_runs(monkeypatch, lambda lr, s: lr)
    capped = Sweep(name="t", settings=(Setting(4, "iid"),), works=(Work(2, 0, 2),), lr_grid=(0.05, 0.1, 0.2),
                   lr_extend=(), lr_factor=2.0, lr_bounds=(1e-4, 0.5), tune_seeds=(7,), tune_setting_only=None)
    assert sweep_mod._tune(capped, _probe(capped), tmp_path, data=None)[0] == 0.4


def test_fixed_budget_sweep_tunes_on_one_partition_and_reuses_the_lr(mnist, tmp_path):  # noqa: F811
    sw = Sweep(name="t", methods=("fedavg", "rolora"), settings=(Setting(2, "dirichlet"), Setting(2, "iid"),
                                                                 Setting(4, "iid")),
               works=(Work(2, 0, 0),), total_client_steps=40, ranks=(4,), seeds=(0, 1), lr_grid=(0.05, 0.1),
               lr_extend=(), lr_factor=2.0, lr_bounds=(0.05, 0.2), tune_seeds=(100, 101), tune_setting_only=None,
               tune_partition="dirichlet", evals_per_run=2, centralised=True,
               base=dict(train_subset=2000, val_size=200, test_subset=300, hidden=16))
    rows = run_sweep(sw, out=tmp_path, data=mnist)
    assert len(rows) == 2 * 3 + 1 and all(len(r["final_test_accuracy"]) == 2 for r in rows)
    root = tmp_path / "mnist_toy" / "t"
    tune_dirs = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("tune/*.json"))
    assert set(tune_dirs) == {"dirichlet_c2/2steps/tune", "dirichlet_c4/2steps/tune", "centralised/2steps/tune"}
    evals = [json.loads(p.read_text()) for p in root.rglob("*.json") if p.parent.name != "tune"]
    assert len(evals) == 7 * 2
    for rec in evals:
        k = rec["clients"]
        assert rec["role"] == "eval" and rec["tune_seeds"] == [100, 101]
        if rec["method"] == "centralised":
            assert rec["rounds_done"] == 40 // (10 * 2)  # the budget of 10 clients
            continue
        assert rec["rounds_done"] * k * 2 == 40
        assert rec["config"]["eval_every"] == max(1, rec["rounds_done"] // 2)
        assert rec["lr_tuned_on"] == ("this setting" if rec["partition"] == "dirichlet" else f"dirichlet_c{k}")
        assert {"mean_val_accuracy", "val_accuracy"} <= set(next(iter(rec["tune_val_accuracy"].values())))
    for p in root.rglob("tune/*.json"):  # tuning needs only the final validation accuracy
        rec = json.loads(p.read_text())
        assert rec["config"]["eval_every"] == rec["rounds_done"]
        assert [e["round"] for e in rec["rounds"] if "val_accuracy" in e] == [rec["rounds_done"] - 1]
    n = len(list(root.rglob("*.json")))
    run_sweep(sw, out=tmp_path, data=mnist)  # resumable: nothing new
    assert len(list(root.rglob("*.json"))) == n


def test_dp_preset_tunes_per_rule_and_epsilon_in_its_own_folders():
    sw = PRESETS["dp"]
    eps = [st.dp_epsilon for st in sw.settings]
    assert eps == [None, 8.0, 3.0, 1.0] and {"fedavg", "ffa", "rolora"} <= set(sw.methods)
    assert len({st.dir_name() for st in sw.settings}) == 4 and len(sw.seeds) >= 3
    for st in sw.settings:
        assert sw.tune_setting(st) == st  # each ε tuned on its own
        cfg = sweep_mod._cfg(sw, sw.works[0], st, "rolora", 8, lr=0.1, seed=0)
        assert cfg.dp_epsilon == st.dp_epsilon and cfg.dp_max_grad_norm == 1.0 and cfg.dp == (st.dp_epsilon is not None)
