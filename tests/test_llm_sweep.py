"""The LLM client-scaling sweep on a tiny random RoBERTa: a re-pointed Federation gives exactly the
numbers of a fresh one (so a sweep may share one model across runs), the fixed budget, the tuning
procedure (validation only, grid grows past an edge), resumability, and the CLI."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm_scale.config import load_config  # noqa: E402
from llm_scale.engine import Federation  # noqa: E402
from llm_scale.run import run  # noqa: E402
from llm_scale.sweep import Sweep, run_sweep, tune_grid_runs  # noqa: E402

from test_llm_scale import table  # noqa: E402,F401  (the module fixture: a small learnable CSV)

TINY = {"num_hidden_layers": 3}


def _base(table, **kw):
    return dict(model="tiny-roberta", task="table", data_path=str(table), targets=["query", "value"],
                layers=[2], test_fraction=0.25, val_fraction=0.1, batch_size=4, split_seed=0, **kw)


def _numbers(rec):
    return rec["final_test_accuracy"], [h["train_loss"] for h in rec["rounds"]], rec["uplink_bytes"]


def test_a_reconfigured_federation_gives_the_numbers_of_a_fresh_one(table):
    """One model re-pointed through rules that overwrite the frozen weights (full), merge bases
    (fedex), add adapters of other ranks (flexlora r2, fedavg r4) and other client counts: every run
    equals the same run on a Federation built for it."""
    runs = [dict(method="fedex", rank=2, clients=3), dict(method="full", rank=2, clients=2),
            dict(method="flexlora", rank=4, clients=3, partition="dirichlet"),
            dict(method="fedavg", rank=2, clients=4), dict(method="rolora", rank=4, clients=2)]
    shared = None
    for kw in runs:
        cfg = load_config(None, **_base(table), rounds=2, local_steps=2, lr=5e-3, seed=3, **kw)
        if shared is None:
            shared = Federation(cfg, tiny=TINY)
        else:
            shared.reconfigure(cfg)
        assert shared.cache is not None  # the cached path is the one a sweep uses
        got = run(cfg, federation=shared, progress=False)
        want = run(cfg, federation=Federation(cfg, tiny=TINY), progress=False)
        assert _numbers(got) == _numbers(want), kw
    with pytest.raises(ValueError, match="cannot reconfigure seed"):
        shared.reconfigure(load_config(None, **_base(table), seed=4))


def test_a_cache_is_shared_only_with_the_same_frozen_weights(table):
    """Same frozen blocks (a pretrained model: here the same seed): the rows are shared and the run is
    the fresh one. A random model of another seed has other frozen blocks: its own cache is built."""
    cfg0 = load_config(None, **_base(table), rounds=2, local_steps=2, method="fedavg", rank=2, seed=0)
    cfg1 = load_config(None, **_base(table), rounds=2, local_steps=2, method="rolora", rank=4, seed=0, clients=2)
    cfg2 = load_config(None, **_base(table), rounds=2, local_steps=2, method="fedavg", rank=2, seed=1)
    first = Federation(cfg0, tiny=TINY)
    for cfg, shared in ((cfg1, True), (cfg2, False)):
        reused = Federation(cfg, splits=first.splits, cache=first.cache, tiny=TINY)
        assert (reused.cache.rows is first.cache.rows) is shared
        fresh = Federation(cfg, tiny=TINY)
        assert _numbers(run(cfg, federation=reused, progress=False)) == _numbers(run(cfg, federation=fresh, progress=False))


def test_tuning_grid_grows_past_an_edge_and_stops_inside():
    sw = Sweep(name="t", lr_grid=(1e-3, 2e-3, 4e-3), lr_extend=(5e-4, 8e-3, 1.6e-2))
    todo, best = tune_grid_runs(sw, None, None, {})
    assert todo == [1e-3, 2e-3, 4e-3] and best is None
    todo, best = tune_grid_runs(sw, None, None, {1e-3: .5, 2e-3: .6, 4e-3: .7})  # best at the top edge
    assert todo == [8e-3] and best is None
    todo, best = tune_grid_runs(sw, None, None, {1e-3: .5, 2e-3: .6, 4e-3: .7, 8e-3: .65})
    assert todo == [] and best == 4e-3
    todo, best = tune_grid_runs(sw, None, None, {1e-3: .5, 2e-3: .6, 4e-3: .7, 8e-3: .8, 1.6e-2: .9})
    assert todo == [] and best == 1.6e-2  # extensions used up: the edge is kept, and reported as such
    _, best = tune_grid_runs(sw, None, None, {5e-4: .7, 1e-3: .7, 2e-3: .6, 4e-3: .5})
    assert best == 5e-4  # ties go to the smaller lr


def _tiny_two_seed_sweep(table, name):
    return Sweep(name=name, methods=("fedavg",), clients=(2,), partitions=("iid",), ranks=(2,), seeds=(0,),
                 total_steps=4, local_steps=1, lr_grid=(2e-3, 8e-3), lr_extend=(), tune_seeds=(100, 101),
                 tune_cell=(2, "iid"), centralised=False, config=None, base=_base(table))


def test_two_tuning_seeds_choose_by_the_mean_and_records_carry_both(table, tmp_path, capsys):
    """tune_seeds=(100, 101) on the tiny model: every lr runs on both seeds, the chosen lr has the best
    mean of the tuning records (ties to the smaller), and the records carry the toy's table format."""
    sw = _tiny_two_seed_sweep(table, "tiny2")
    run_sweep(sw, out=tmp_path, dry_run=True)
    assert "1 tuning cells (≥ 2 lrs × 2 tuning seeds each)" in capsys.readouterr().out
    run_sweep(sw, out=tmp_path, tiny=TINY, progress=False)
    root = tmp_path / "llm_scale" / "tiny2"
    tunes = [json.loads(p.read_text()) for p in root.rglob("tune/*.json")]
    assert sorted((r["lr"], r["seed"]) for r in tunes) == [(2e-3, 100), (2e-3, 101), (8e-3, 100), (8e-3, 101)]
    val = {(r["lr"], r["seed"]): r["final_val_accuracy"] for r in tunes}
    mean = {lr: (val[(lr, 100)] + val[(lr, 101)]) / 2 for lr in (2e-3, 8e-3)}
    (rec,) = [json.loads(p.read_text()) for p in root.glob("*/*.json")]
    assert rec["lr"] == max(sorted(mean), key=lambda lr: mean[lr])
    assert rec["tune_seeds"] == [100, 101] and "tune_seed" not in rec
    for lr in (2e-3, 8e-3):
        row = rec["tune_val_accuracy"][f"{lr:g}"]
        assert row["val_accuracy"] == {"100": val[(lr, 100)], "101": val[(lr, 101)]}
        assert row["mean_val_accuracy"] == pytest.approx(mean[lr])
    tuning = json.loads((root / "tuning.json").read_text())
    assert tuning["tune_seeds"] == [100, 101] and "tune_seed" not in tuning
    assert tuning["chosen"] == {"fedavg r2": {"lr": rec["lr"], "val_accuracy": rec["tune_val_accuracy"]}}


def test_two_tuning_seeds_outvote_one_lucky_seed(table, tmp_path, monkeypatch):
    """The sweep's own bookkeeping (jobs per (lr, seed), scores back to their lr): seed 100 alone
    would pick 2e-3; the mean over 100 and 101 picks 8e-3. Training is replaced by the table."""
    import llm_scale.sweep as sweep_mod

    vals = {(2e-3, 100): 0.9, (2e-3, 101): 0.2, (8e-3, 100): 0.6, (8e-3, 101): 0.6}

    def fake(job):
        cfg = job["config"]
        return {"path": job["path"], "val": vals.get((cfg["lr"], cfg["seed"])), "test": 0.5, "diverged": False,
                "wall": 0.0}

    monkeypatch.setattr(sweep_mod, "_work", fake)
    sw = _tiny_two_seed_sweep(table, "tiny2fake")
    assert sweep_mod._tune(sw, tmp_path, sweep_mod._Pool(1), [("fedavg", 2, "iid", 2, None)], _NoBar(), None) == {
        ("fedavg", 2, "iid", 2, None): (8e-3, {
            "0.002": {"mean_val_accuracy": pytest.approx(0.55), "val_accuracy": {"100": 0.9, "101": 0.2}},
            "0.008": {"mean_val_accuracy": pytest.approx(0.6), "val_accuracy": {"100": 0.6, "101": 0.6}}})}
    one = dataclasses.replace(sw, tune_seeds=())  # the old behaviour: tune_seed=100 alone, {lr: acc}
    assert sweep_mod._tune(one, tmp_path, sweep_mod._Pool(1), [("fedavg", 2, "iid", 2, None)], _NoBar(), None) == {
        ("fedavg", 2, "iid", 2, None): (2e-3, {"0.002": 0.9, "0.008": 0.6})}


class _NoBar:
    total = 0

    def refresh(self):
        pass

    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass


def test_total_budget_is_fixed_and_uneven_rounds_are_refused():
    sw = Sweep(name="t", clients=(3, 20, 50), total_steps=600, local_steps=2)
    assert [sw.rounds(c) for c in sw.clients] == [100, 15, 6]
    assert all(c * sw.rounds(c) * sw.local_steps == 600 for c in sw.clients)
    with pytest.raises(ValueError, match="not a whole number of rounds"):
        Sweep(name="t", total_steps=500, local_steps=2).rounds(3)


def test_sweep_tunes_on_validation_runs_every_cell_and_resumes(table, tmp_path):
    sw = Sweep(name="tiny", methods=("fedavg", "rolora", "full"), clients=(2, 4), partitions=("iid",), ranks=(2, 4),
               seeds=(0, 1), total_steps=8, local_steps=1, lr_grid=(2e-3, 8e-3), lr_extend=(), tune_cell=(2, "iid"),
               config=None, base=_base(table))
    rows = run_sweep(sw, out=tmp_path, tiny=TINY, progress=False)
    root = tmp_path / "llm_scale" / "tiny"
    evals = [json.loads(p.read_text()) for p in root.rglob("*.json") if p.parent.name != "tune" and p.name != "tuning.json"]
    tunes = [json.loads(p.read_text()) for p in root.rglob("tune/*.json")]
    # centralised at 2 ranks + (fedavg, rolora) × 2 clients × 2 ranks + full × 2 clients (rank-free), 2 seeds each
    assert len(rows) == len(evals) == (2 + 8 + 2) * 2
    assert {r["role"] for r in evals} == {"eval"} and {r["role"] for r in tunes} == {"tune"}
    assert all(r["final_val_accuracy"] is not None and r["final_test_accuracy"] is None for r in tunes)
    assert all(r["final_test_accuracy"] is not None and r["final_val_accuracy"] is None for r in evals)
    for r in evals:
        assert r["client_steps"] == 8 and r["seed"] in (0, 1)
        assert {"method", "clients", "partition", "rank", "seed", "final_test_accuracy", "uplink_bytes",
                "downlink_bytes", "wall_seconds", "role"} <= set(r)
        tuned = r["tune_val_accuracy"]
        best = max(sorted(tuned, key=float), key=lambda k: tuned[k])  # the tuning table picks the lr used
        assert float(best) == r["lr"]
    from fedlora.provenance import git_commit

    assert {r["git_commit"] for r in evals + tunes} == {git_commit()}  # the code at the sweep's start
    chosen = json.loads((root / "tuning.json").read_text())["chosen"]
    assert set(chosen) == {"centralised r2", "centralised r4", "fedavg r2", "fedavg r4", "rolora r2", "rolora r4",
                           "full r2"}
    # resumable: a second call runs nothing new and returns the same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.json") if p.name != "tuning.json"}
    again = run_sweep(sw, out=tmp_path, tiny=TINY, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert sorted((r["path"], r["test"]) for r in again) == sorted((r["path"], r["test"]) for r in rows)


def test_sweep_cli_dry_run_and_bad_input(capsys):
    from llm_scale.__main__ import main

    assert main(["sweep", "--preset", "scaling", "--out", "/tmp/unused", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "240 eval runs" in out and "50 clients r8: 6 rounds × 2 steps" in out
    assert main(["sweep", "--preset", "scaling", "--out", "/tmp/unused", "--methods", "fedsgd"]) == 2
    assert "unknown method 'fedsgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", "nope", "--out", "/tmp/unused"])


def test_scaling_table_pairs_seeds_and_marks_only_intervals_that_exclude_zero(tmp_path):
    from figures.llm import make_all, paired_lines, scaling_table

    runs = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        for method, acc in (("fedavg", 0.60), ("rolora", 0.70), ("ffa", 0.60), ("rolora-chain", 0.70)):
            jitter = noise if method in ("fedavg", "rolora") else (-1) ** seed * 0.05
            runs.append(dict(method=method, partition="iid", rank=2, clients=3, seed=seed, rounds_done=5,
                             final_test_accuracy=acc + jitter, sweep="s", role="eval", uplink_bytes=1))
    lines = "\n".join(paired_lines(runs, ["iid"], [2], [3]))
    assert "**+0.100 [+0.100, +0.100]**" in lines  # rolora − fedavg: same noise on both, paired out
    ffa = next(line for line in lines.splitlines() if "ffa − fedavg" in line)
    assert "**" not in ffa  # ±0.05 alternating: the interval covers 0
    table = scaling_table(runs)
    assert "0.700 ± 0.010 (n=3)" in table and "RoLoRA paper, Table 2" in table
    (tmp_path / "r").mkdir()
    assert make_all(tmp_path / "r", tmp_path / "fig") == []  # no results: nothing drawn, no error


def test_a_privacy_axis_gets_its_own_folders_tuning_and_records(table, tmp_path, capsys):
    """epsilons=(None, 3): every cell runs without DP and at ε = 3, in folders suffixed _nodp / _eps3, each
    tuned on its own; records carry dp_epsilon and the privacy spent. Presets without the axis keep their
    folder names (the scaling test above, and the committed results)."""
    sw = Sweep(name="tinydp", methods=("fedavg",), clients=(2,), partitions=("iid",), ranks=(2,), seeds=(0,),
               epsilons=(None, 3.0), total_steps=4, local_steps=1, lr_grid=(2e-3, 8e-3), lr_extend=(),
               tune_cell=(2, "iid"), centralised=False, config=None, base=_base(table))
    rows = run_sweep(sw, out=tmp_path, tiny=TINY, progress=False)
    root = tmp_path / "llm_scale" / "tinydp"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iid_c2_r2_eps3", "iid_c2_r2_nodp"]
    assert len(rows) == 2
    plain, = [json.loads(p.read_text()) for p in (root / "iid_c2_r2_nodp").glob("*.json")]
    private, = [json.loads(p.read_text()) for p in (root / "iid_c2_r2_eps3").glob("*.json")]
    assert plain["dp_epsilon"] is None and plain["dp"] is None
    assert private["dp_epsilon"] == 3.0 and private["dp"]["epsilon_spent_max"] <= 3.0
    assert private["lr_tuned_at"]["dp_epsilon"] == 3.0
    assert "_eps3_lr" in next((root / "iid_c2_r2_eps3").glob("*.json")).name
    assert len(list((root / "iid_c2_r2_eps3" / "tune").glob("*.json"))) == 2  # tuned at its own ε
    chosen = json.loads((root / "tuning.json").read_text())["chosen"]
    assert set(chosen) == {"fedavg r2 nodp", "fedavg r2 eps3"}
    from llm_scale.__main__ import main

    assert main(["sweep", "--preset", "dp", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "60 eval runs" in out and "rolora       iid   3 clients r8   ε=1: 50 rounds × 2 steps" in out
    assert "flexlora       iid   3 clients r8   ε=8" in out  # fedex and flexlora joined the preset
    assert "fedavg       iid   3 clients r8 no DP" in out


def test_a_methods_restricted_sweep_adds_to_tuning_json_and_loses_no_rule(table, tmp_path, monkeypatch):
    """``--methods rolora`` after ``--methods fedavg``: tuning.json keeps fedavg's entry and adds
    rolora's (it used to be overwritten by the last run's rules). A file from another tuning (other
    tuning seeds) is replaced whole, not mixed. Training is replaced by a table of scores."""
    import llm_scale.sweep as sweep_mod

    vals = {("fedavg", 2e-3): 0.7, ("fedavg", 8e-3): 0.6, ("rolora", 2e-3): 0.5, ("rolora", 8e-3): 0.8}

    def fake(job):
        cfg = job["config"]
        return {"path": job["path"], "val": vals[(cfg["method"], cfg["lr"])], "test": 0.5, "diverged": False,
                "wall": 0.0}

    monkeypatch.setattr(sweep_mod, "_work", fake)
    sw = dataclasses.replace(_tiny_two_seed_sweep(table, "tinymerge"), methods=("fedavg", "rolora"))
    path = tmp_path / "llm_scale" / "tinymerge" / "tuning.json"
    run_sweep(sw, out=tmp_path, methods=["fedavg"], progress=False)
    assert {k: v["lr"] for k, v in json.loads(path.read_text())["chosen"].items()} == {"fedavg r2": 2e-3}
    run_sweep(sw, out=tmp_path, methods=["rolora"], progress=False)
    tuning = json.loads(path.read_text())
    assert {k: v["lr"] for k, v in tuning["chosen"].items()} == {"fedavg r2": 2e-3, "rolora r2": 8e-3}
    assert tuning["tune_seeds"] == [100, 101] and tuning["tuned_at"] == {"clients": 2, "partition": "iid"}
    other = dataclasses.replace(sw, tune_seeds=(7, 8))
    sweep_mod.write_tuning(other, tmp_path, {"rolora r2": {"lr": 8e-3, "val_accuracy": {}}})
    assert set(json.loads(path.read_text())["chosen"]) == {"rolora r2"}
    path.write_text("{not json")  # a torn file from an old crash: replaced, not an error
    sweep_mod.write_tuning(sw, tmp_path, {"fedavg r2": {"lr": 2e-3, "val_accuracy": {}}})
    assert set(json.loads(path.read_text())["chosen"]) == {"fedavg r2"}
