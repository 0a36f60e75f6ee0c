"""The benchmark's plumbing (not its timings): cases, inputs, the report join, the figures."""
from __future__ import annotations

import json

from fedlora.bench import RULES, Case, cases, markdown, report, target
from fedlora.checkpoint import state_from_tensors, state_to_tensors
from fedlora import GlobalMatrix, LoRAFactors, LowRank

import torch


def test_quick_grid_covers_every_rule_with_its_reference_and_floor():
    qc = cases(quick=True)
    assert {c.rule for c in qc if c.kind == "fast"} == set(RULES)
    assert {c.rule for c in qc if c.kind == "reference"} == {"fedex", "flexlora"}
    assert {c.rule for c in qc if c.kind == "floor"} == {"fedavg", "ffa", "rolora"}
    full = cases(quick=False)
    assert any(c.kind == "reference" and (c.m, c.n, c.clients, c.rank) == (4096, 11008, 10, 8) for c in full)


def test_target_records_the_bytes_each_client_receives():
    fn, info = target(Case("fedex", 64, 48, 3, 2, "fast"))
    fn()
    assert info["downlink_bytes"] < info["dense_downlink_bytes"]
    fn, info = target(Case("flexlora", 64, 48, 3, 2, "fast"))
    assert info["downlink_bytes"] == 2 * (64 + 48) * 4


def test_report_joins_fast_reference_and_floor(tmp_path):
    def bench(kind, rule, median):
        return {"stats": {"median": median}, "extra_info": {"rule": rule, "m": 8, "n": 4, "clients": 3, "rank": 2,
                                                             "kind": kind, "downlink_bytes": 10, "dense_downlink_bytes": 128}}
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"benchmarks": [bench("fast", "flexlora", 0.5), bench("reference", "flexlora", 50.0),
                                              bench("fast", "fedavg", 2.0), bench("floor", "fedavg", 1.0)]}))
    recs = {r["rule"]: r for r in report(raw, tmp_path)}
    assert recs["flexlora"]["speedup"] == 100.0 and "floor_ratio" not in recs["flexlora"]
    assert recs["fedavg"]["floor_ratio"] == 2.0 and "speedup" not in recs["fedavg"]
    assert json.loads((tmp_path / "aggregation.json").read_text())[0]["rule"] in ("fedavg", "flexlora")
    assert "| flexlora | 8×4 | 3 | 2 |" in (tmp_path / "aggregation.md").read_text()

    from figures.bench import make_all

    written = make_all(_results_dir(tmp_path), tmp_path / "fig")
    assert {p.suffix for p in written} == {".png", ".pdf"} and all(p.stat().st_size > 0 for p in written)


def _results_dir(tmp_path):
    bench = tmp_path / "res" / "bench"
    bench.mkdir(parents=True)
    (bench / "aggregation.json").write_text((tmp_path / "aggregation.json").read_text())
    return tmp_path / "res"


def test_checkpoint_tensors_round_trip_every_part():
    g = torch.Generator().manual_seed(0)
    state = {"a": GlobalMatrix(lora=LoRAFactors(A=torch.randn(2, 3, generator=g), B=torch.randn(4, 2, generator=g), scale=0.5),
                               base=LowRank(U=torch.randn(4, 1, generator=g), V=torch.randn(1, 3, generator=g))),
             "b": GlobalMatrix(W=torch.randn(4, 3, generator=g))}
    tensors, meta = state_to_tensors(state)
    back = state_from_tensors(tensors, json.loads(json.dumps(meta)))
    for k in state:
        assert torch.equal(back[k].effective_delta(), state[k].effective_delta())
