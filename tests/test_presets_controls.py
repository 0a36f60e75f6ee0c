"""The presets of the controls study (issue 20): the toy at RoLoRA's Table 2 schedule with every chained
control, and the LLM controls on the scaling study's own cells."""
from __future__ import annotations

from collections import Counter

from fedlora import get_rule
from llm_scale.sweep import PRESETS as LLM
from mnist_toy import sweep as toy_sweep
from mnist_toy.sweep import PRESETS as TOY, Setting


def test_toy_paper_scaling_is_table_2s_schedule_with_a_local_work_axis_at_50_clients():
    sw = TOY["paper-scaling"]
    cells = list(sw.cells())
    per = Counter((w.local_steps, s.clients if s else "central") for w, s, _, _ in cells)
    assert {k for k in per} == {(20, 3), (20, 20), (20, 50), (5, 50), (2, 50), (20, "central")}
    assert [sw.rounds(sw.works[0], k) for k in (3, 20, 50)] == [500, 75, 30]  # RoLoRA Table 2
    assert [sw.rounds(w, 50) for w in sw.works] == [30, 120, 300]  # the budget fixed along the axis
    for w, s, m, r in cells:
        cfg = toy_sweep._cfg(sw, w, s, m, r, lr=0.1, seed=0)
        assert cfg.rounds * cfg.clients * cfg.local_steps == 30_000, (w, s, m)
    chained = {m for m in sw.methods if get_rule(m).chain}
    assert chained == {"fedavg-chain", "ffa-chain", "rolora-chain"}
    assert {m.removesuffix("-chain") for m in chained} <= set(sw.methods)  # each control beside its rule
    assert len(sw.seeds) >= 5 and len(sw.tune_seeds) >= 3 and sw.lr_factor == 2.0
    assert sw.tune_setting(Setting(50, "iid")) == Setting(50, "dirichlet")


def test_llm_controls_run_on_the_scaling_cells_and_tuning():
    base, ctl, frozen = LLM["scaling"], LLM["controls"], LLM["frozen-head"]
    assert set(ctl.methods) == {"fedavg-chain", "ffa-chain", "head-only"} and ctl.ranks == (2,)
    for sw in (ctl, frozen):
        assert (sw.clients, sw.total_steps, sw.local_steps, sw.tune_cell, sw.seeds) == \
               (base.clients, base.total_steps, base.local_steps, base.tune_cell, base.seeds)
        assert {k: v for k, v in sw.base.items() if k != "head"} == base.base
        assert sw.name != base.name  # own folders: the committed study is never overwritten
    assert frozen.base["head"] == "frozen" and "head" not in ctl.base
    cfg = frozen.config_for("rolora-chain", 50, "iid", 2, lr=1e-3, seed=0, role="eval")
    assert cfg.head == "frozen" and cfg.rounds == 6
