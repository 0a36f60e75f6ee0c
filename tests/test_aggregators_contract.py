"""One contract walked by every registered rule (SPEC: "Properties every rule must pass")."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedlora import ClientUpdate, UpdateError, aggregate, get_rule, rule_names
from fedlora.aggregators.reference import weighted_product_dense

from rule_cases import client_factors, identical_clients, make_case

ALL = rule_names()
SHAPES = [(7, 5), (5, 9), (12, 3)]  # non-square on purpose: a transposed residual cannot hide


def _close(a, b, rtol=1e-9):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= rtol * scale


def test_registry_lists_every_spec_rule():
    for name in ["fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "flora", "full", "full-galore",
                 "fedavg-chain", "ffa-chain", "head-only"]:
        assert name in ALL


@pytest.mark.parametrize("name,base", [("rolora-chain", "rolora"), ("fedavg-chain", "fedavg"), ("ffa-chain", "ffa")])
def test_each_chained_control_is_its_rule_with_the_chain(name, base):
    """Same server math and schedule as the base rule; only the loop's chaining differs."""
    chained, plain = get_rule(name), get_rule(base)
    assert chained.chain and not plain.chain
    assert chained.aggregate is plain.aggregate and chained.exact == plain.exact and chained.linear == plain.linear
    assert [chained.trains(t) for t in range(6)] == [plain.trains(t) for t in range(6)]


def test_head_only_trains_no_factor_and_keeps_the_adapter():
    rule = get_rule("head-only")
    case = make_case("head-only", m=7, n=5, r=3, K=4, seed=2)
    assert rule.trains(0) == rule.trains(1) == "" and all(not u.fields() for u in case.updates)
    out = aggregate("head-only", case.state, case.updates, case.weights)
    assert out.state.lora is case.state.lora and out.broadcast_bytes() == 0
    sneaky = ClientUpdate(B=torch.zeros(7, 3, dtype=torch.float64), scale=case.updates[0].scale)
    with pytest.raises(UpdateError, match="trains \\[\\]"):  # a client that sends a factor is refused by name
        aggregate("head-only", case.state, [sneaky] + case.updates[1:], case.weights)


def test_registry_refuses_duplicates():
    from fedlora.aggregators.registry import register

    with pytest.raises(ValueError, match="already registered"):
        register(get_rule("fedavg"))


@pytest.mark.parametrize("rule", ALL)
@pytest.mark.parametrize("round_", [0, 1])
@pytest.mark.parametrize("m,n", SHAPES)
def test_fixed_point_on_identical_clients(rule, round_, m, n):
    case = make_case(rule, m=m, n=n, r=3, K=4, seed=1, round_=round_)
    if rule == "flora":  # FLoRA's steady state carries no adapter: everything is merged into the base
        assert case.state.lora is None
    ups = identical_clients(rule, case)
    new = aggregate(rule, case.state, ups, case.weights, ctx=case.ctx).state
    assert _close(new.effective_delta(), case.state.effective_delta())


@pytest.mark.parametrize("rule", ALL)
@pytest.mark.parametrize("round_", [0, 1])
def test_permuting_clients_changes_nothing(rule, round_):
    case = make_case(rule, m=9, n=4, r=3, K=5, seed=2, round_=round_)
    perm = [3, 0, 4, 1, 2]
    ctx = case.ctx
    if ctx.client_ranks is not None:
        ctx = type(ctx)(round=ctx.round, client_ranks=[ctx.client_ranks[i] for i in perm],
                        client_scales=[ctx.client_scales[i] for i in perm])
    a = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx).state
    b = aggregate(rule, case.state, [case.updates[i] for i in perm], case.weights[perm], ctx=ctx).state
    assert _close(a.effective_delta(), b.effective_delta())


@pytest.mark.parametrize("rule", [r for r in ALL if get_rule(r).exact])
@pytest.mark.parametrize("round_", [0, 1])
@pytest.mark.parametrize("m,n", SHAPES)
def test_exact_rules_apply_the_weighted_product(rule, round_, m, n):
    case = make_case(rule, m=m, n=n, r=3, K=4, seed=3, round_=round_)
    p = case.weights / case.weights.sum()
    new = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx).state
    if get_rule(rule).trains(round_) == "W":
        expected = sum(float(pk) * u.W for u, pk in zip(case.updates, p))
    else:
        trained = [client_factors(rule, case.state, u) for u in case.updates]
        expected = sum(float(pk) * f.delta() for f, pk in zip(trained, p))
        if case.state.base is not None:  # the correction already folded into W0 stays
            expected = expected + case.state.base.dense()
    assert _close(new.effective_delta(), expected)


@pytest.mark.parametrize("m,n", SHAPES)
def test_fedavg_gap_is_the_weighted_cross_covariance(m, n):
    case = make_case("fedavg", m=m, n=n, r=3, K=5, seed=4)
    p = case.weights / case.weights.sum()
    new = aggregate("fedavg", case.state, case.updates, case.weights).state.lora
    Abar, Bbar = new.A, new.B
    gap = sum(float(pk) * (u.B @ u.A) for u, pk in zip(case.updates, p)) - Bbar @ Abar
    cov = sum(float(pk) * ((u.B - Bbar) @ (u.A - Abar)) for u, pk in zip(case.updates, p))
    assert _close(gap, cov)
    assert float(gap.abs().max()) > 1e-3  # heterogeneous random clients: fedavg really is inexact here


@pytest.mark.parametrize("rule", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_keep_dtype_and_inputs_are_untouched(rule, dtype):
    case = make_case(rule, m=6, n=4, r=2, K=3, seed=5, dtype=dtype)
    before = [{k: v.clone() for k, v in u.fields().items()} for u in case.updates]
    state_before = case.state.effective_delta().clone()
    agg = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
    for t in list(agg.broadcast.values()):
        assert t.dtype == dtype and t.device == case.updates[0].fields()[next(iter(case.updates[0].fields()))].device
    assert agg.state.effective_delta().dtype == dtype
    for u, b in zip(case.updates, before):
        for k, v in u.fields().items():
            assert torch.equal(v, b[k])
    assert torch.equal(case.state.effective_delta(), state_before)


@settings(max_examples=25, deadline=None)
@given(rule=st.sampled_from(ALL), m=st.integers(1, 12), n=st.integers(1, 12), r=st.integers(1, 4),
       K=st.integers(1, 6), seed=st.integers(0, 2**16), round_=st.integers(0, 3))
def test_exactness_over_shapes_ranks_clients_seeds(rule, m, n, r, K, seed, round_):
    case = make_case(rule, m=m, n=n, r=r, K=K, seed=seed, round_=round_)
    new = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx).state
    assert new.effective_delta().shape == (m, n)
    if not get_rule(rule).exact:
        return
    p = case.weights / case.weights.sum()
    if get_rule(rule).trains(round_) == "W":
        expected = sum(float(pk) * u.W for u, pk in zip(case.updates, p))
    else:
        expected = weighted_product_dense([_as_update(client_factors(rule, case.state, u)) for u in case.updates], p)
        if case.state.base is not None:
            expected = expected + case.state.base.dense()
    assert _close(new.effective_delta(), expected, rtol=1e-8)


def _as_update(f):
    from fedlora import ClientUpdate

    return ClientUpdate(A=f.A, B=f.B, scale=f.scale)
