"""Every theory check is one a wrong rule fails: inject a bug into a rule (the registered aggregate
replaced by a broken one) and at least one counted check of the analyses that run it goes red,
while the same checks pass with the real rule. The bugs are the ones that left the earlier lower
bounds green: using only the first client, and shrinking FFA's B by 10%."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from fedlora.aggregators.registry import RULES
from linear_theory import analyses as T

# Small instances: every analysis still runs its simulations through the core's rules.
SMALL = T.Settings(hetero=(0.0, 1.0), rounds=20, angle_c=(0.5,), bound_c=(0.5,), angle_rounds=4,
                   samples=(50, 100), replicates=1, drift_tau=(1, 2))


def _first_client_only(agg):
    def broken(state, updates, p, ctx):
        one = torch.zeros_like(p)
        one[0] = 1.0
        return agg(state, updates[:1], one[:1], ctx)
    return broken


def _shrink_B(agg):
    def broken(state, updates, p, ctx):
        out = agg(state, updates, p, ctx)
        lo = out.state.lora
        return dataclasses.replace(out, state=out.state.replace(lora=dataclasses.replace(lo, B=lo.B * 0.9)))
    return broken


# rule -> (the bug, the analysis that runs that rule; the cheapest one where it runs)
MUTATIONS = {
    "fedavg": (_first_client_only, (T.rank_floor,)),
    "ffa": (_first_client_only, (T.ffa_floor,)),
    "ffa×0.9": (_shrink_B, (T.ffa_floor,)),
    "rolora": (_first_client_only, (T.rolora_angle,)),
    "flexlora": (_first_client_only, (T.rank_floor,)),
    "fedex": (_first_client_only, (T.rank_floor,)),
    "flora": (_first_client_only, (T.rank_floor,)),
    "full": (_first_client_only, (T.client_drift,)),
}


@functools.lru_cache(maxsize=None)
def _clean(analyses) -> dict[str, bool]:
    return _counted(analyses)


def _counted(analyses) -> dict[str, bool]:
    records, _ = T.run_all(SMALL, 0, analyses=analyses)
    return {f"{r['name']}: {r['check']} {r.get('method')} h={r.get('h')} tau={r.get('tau')} N={r.get('samples')}":
            r["passed"] for r in records if r["counted"]}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_an_injected_bug_fails_a_counted_theory_check(mutation, monkeypatch):
    rule = mutation.split("×")[0]
    bug, analyses = MUTATIONS[mutation]
    clean = _clean(analyses)
    real = RULES[rule]
    monkeypatch.setitem(RULES, rule, dataclasses.replace(real, aggregate=bug(real.aggregate)))
    broken = _counted(analyses)
    caught = [k for k, ok in broken.items() if clean.get(k) and not ok]
    assert caught, f"{mutation}: no check that passes with the real rule fails with the bug"
    assert any("round_map" in k for k in caught)  # the exact server-step check is among them
