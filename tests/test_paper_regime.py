"""The LLM tier's paper-regime presets (issue 23): RoLoRA Table 2's schedule (20 local steps, rounds in the
ratio 500 : 75 : 30) with the budget fixed, persistent per-client streams, the top 3 blocks adapted, the lr
tuned by mean validation over two tuning seeds on a ×2 grid; and a scaled-down copy run end to end."""
from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm_scale.sweep import PRESETS, run_sweep  # noqa: E402

from test_llm_scale import table  # noqa: E402,F401
from test_llm_sweep import TINY, _base  # noqa: E402


def test_the_paper_regime_keeps_table_2s_schedule_and_budget():
    sw = PRESETS["paper-regime"]
    assert sw.local_steps == 20
    rounds = {k: sw.rounds(k) for k in sw.clients}
    assert rounds == {3: 100, 20: 15, 50: 6}  # 500 : 75 : 30 scaled by 1/5, the ratio exact
    assert {k * r * 20 for k, r in rounds.items()} == {sw.total_steps}
    cfg = sw.config_for("rolora", 50, "iid", 2, lr=4e-3, seed=0, role="eval")
    assert cfg.data_stream == "persistent" and cfg.layers == (3, 4, 5) and cfg.dtype == "float32"
    assert len(sw.tuning_seeds) >= 2 and not set(sw.tuning_seeds) & set(sw.seeds) and sw.lr_factor == 2.0
    need = {"fedavg", "ffa", "rolora", "rolora-chain", "fedavg-chain", "fedex", "head-only"}
    assert need <= set(PRESETS["paper-regime-core"].methods) <= set(sw.methods)
    assert PRESETS["paper-regime-core"].name == sw.name  # the core's runs are the full preset's, not a copy


def test_the_local_work_axis_fixes_the_budget_and_the_arms_change_one_thing():
    main = PRESETS["paper-regime"]
    for key, steps, rounds in (("paper-regime-s5", 5, 24), ("paper-regime-s2", 2, 60)):
        sw = PRESETS[key]
        assert sw.clients == (50,) and sw.local_steps == steps and sw.rounds(50) == rounds
        assert sw.total_steps == main.total_steps
    frozen = PRESETS["paper-regime-frozen-head"].config_for("rolora", 3, "iid", 2, lr=4e-3, seed=0, role="eval")
    sgd = PRESETS["paper-regime-sgd"].config_for("rolora", 50, "iid", 2, lr=5e-3, seed=0, role="eval")
    ref = main.config_for("rolora", 3, "iid", 2, lr=4e-3, seed=0, role="eval")
    assert frozen == dataclasses.replace(ref, head="frozen")
    assert sgd == dataclasses.replace(main.config_for("rolora", 50, "iid", 2, lr=5e-3, seed=0, role="eval"),
                                      optimizer="sgd")


def test_a_scaled_down_paper_regime_runs_end_to_end_with_its_streams_and_tuning(table, tmp_path):
    """The preset's shape at toy size on the tiny model: tuned on two seeds, every record reads each
    client's rows evenly, carries its averaging error per round and its tuning table over both seeds."""
    sw = dataclasses.replace(PRESETS["paper-regime"], name="pr_smoke", methods=("fedavg", "rolora"), clients=(2,),
                             partitions=("iid",), seeds=(0,), total_steps=8, local_steps=2, lr_grid=(4e-3, 8e-3),
                             lr_factor=2.0, tune_cell=(2, "iid"), centralised=False, config=None,
                             base=_base(table, data_stream="persistent"))
    rows = run_sweep(sw, out=tmp_path, tiny=TINY, progress=False)
    assert len(rows) == 2
    for path in (tmp_path / "llm_scale" / "pr_smoke").glob("iid_c2_r2/*.json"):
        rec = json.loads(path.read_text())
        assert rec["tune_seeds"] == [100, 101]
        assert all(set(v["val_accuracy"]) == {"100", "101"} for v in rec["tune_val_accuracy"].values())
        seen = rec["rows_seen"]
        assert seen["stream"] == "persistent"
        assert all(s["max_reads"] - s["min_reads"] <= 1 for s in seen["per_client"])
        assert all(r["averaging_error"] is not None for r in rec["rounds"])


def test_the_plateau_probe_stays_out_of_the_quick_runs_figures():
    from figures.llm import single_runs

    quick = {"method": "fedavg", "model_family": "bert"}
    probe = dict(quick, probe="paper-regime plateau")
    swept = dict(quick, sweep="paper_regime")
    assert single_runs([quick, probe, swept]) == [quick]


def test_the_local_work_axis_table_pools_the_axis_sweeps_at_50_clients():
    from figures.llm import local_work_table

    def rec(sweep, steps, clients, acc, method="fedavg"):
        return {"sweep": sweep, "role": "eval", "method": method, "clients": clients, "partition": "iid",
                "rounds_done": 6000 // (clients * steps), "final_test_accuracy": acc,
                "config": {"local_steps": steps}}

    runs = [rec("paper_regime", 20, 50, 0.60), rec("paper_regime", 20, 50, 0.62), rec("paper_regime", 20, 3, 0.70),
            rec("paper_regime_s5", 5, 50, 0.64), rec("paper_regime_s5", 5, 50, 0.66),
            rec("paper_regime_s2", 2, 50, 0.68), rec("paper_regime_s2", 2, 50, None)]  # a diverged seed
    text = local_work_table(runs, ("paper_regime", "paper_regime_s5", "paper_regime_s2"))
    assert "Local work at 50 clients, iid" in text and "3 clients" not in text
    assert "| 2 steps (60 rounds) | 5 steps (24 rounds) | 20 steps (6 rounds) |" in text
    assert "| fedavg | 0.680 ± – (n=1) | 0.650 ± 0.014 (n=2) | 0.610 ± 0.014 (n=2) |" in text
    assert local_work_table(runs[:3], ("paper_regime",)) == ""  # one local work: no axis
