"""Bad input is rejected with a message naming the client and the fix; the global is untouched."""
from __future__ import annotations

import pytest
import torch

from fedlora import ClientUpdate, NonFiniteUpdateError, UpdateError, aggregate, RoundContext

from rule_cases import make_case


def _snapshot(state):
    return state.effective_delta().clone()


@pytest.mark.parametrize("rule", ["fedavg", "fedex", "ffa", "rolora", "flexlora", "full"])
def test_nan_update_is_rejected_naming_the_client(rule):
    case = make_case(rule, m=6, n=4, r=2, K=3, seed=0)
    before = _snapshot(case.state)
    bad = case.updates[1]
    field = next(iter(bad.fields()))
    t = bad.fields()[field].clone()
    t.view(-1)[0] = float("nan")
    case.updates[1] = ClientUpdate(**{**bad.fields(), field: t}, scale=bad.scale)
    with pytest.raises(NonFiniteUpdateError, match=r"client 1: .* NaN/Inf"):
        aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
    assert torch.equal(_snapshot(case.state), before)


def test_wrong_shape_and_wrong_rank_are_rejected():
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    u = case.updates[2]
    transposed = ClientUpdate(A=u.A, B=u.B.T.contiguous(), scale=u.scale)
    with pytest.raises(UpdateError, match=r"client 2: B has shape \(2, 6\), expected \(6, r\)"):
        aggregate("fedavg", case.state, case.updates[:2] + [transposed], case.weights)
    rank3 = ClientUpdate(A=torch.randn(3, 4, dtype=torch.float64), B=torch.randn(6, 3, dtype=torch.float64), scale=u.scale)
    with pytest.raises(UpdateError, match="rank 3, the global adapter has rank 2"):
        aggregate("fedavg", case.state, case.updates[:2] + [rank3], case.weights)


def test_sending_an_untrained_factor_is_rejected():
    case = make_case("rolora", m=6, n=4, r=2, K=2, seed=0, round_=0)  # a B round
    u = case.updates[0]
    both = ClientUpdate(A=case.state.lora.A.clone(), B=u.B, scale=u.scale)
    with pytest.raises(UpdateError, match=r"sent \['A', 'B'\] but this round trains \['B'\]"):
        aggregate("rolora", case.state, [both, case.updates[1]], case.weights)


@pytest.mark.parametrize("weights,msg", [([1.0, -1.0], "negative weight"), ([0.0, 0.0], "all client weights are zero"),
                                         ([1.0], "got 1 weights for 2"), ([1.0, float("inf")], "non-finite")])
def test_bad_weights_are_rejected(weights, msg):
    case = make_case("fedavg", m=5, n=3, r=2, K=2, seed=0)
    with pytest.raises(UpdateError, match=msg):
        aggregate("fedavg", case.state, case.updates, weights)


def test_empty_round_is_rejected():
    case = make_case("fedavg", m=5, n=3, r=2, K=2, seed=0)
    with pytest.raises(UpdateError, match="no client updates"):
        aggregate("fedavg", case.state, [], [])


def test_unknown_rule_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered rules: .*fedavg"):
        aggregate("fedprox-lora", make_case("fedavg", m=2, n=2, r=1, K=1, seed=0).state, [], [])


def test_stack_clients_stacks_equal_ranks_and_refuses_ragged_ones():
    from fedlora import LoRAFactors, stack_clients

    fs = [LoRAFactors(A=torch.full((2, 5), float(k)), B=torch.full((3, 2), float(k))) for k in range(4)]
    A, B = stack_clients(fs)
    assert A.shape == (4, 2, 5) and B.shape == (4, 3, 2) and torch.equal(A[3], fs[3].A)
    with pytest.raises(ValueError, match="equal ranks"):
        stack_clients(fs + [LoRAFactors(A=torch.zeros(1, 5), B=torch.zeros(3, 1))])


@pytest.mark.parametrize("rule", ["fedavg", "rolora", "fedex"])
def test_factors_about_to_overflow_count_as_a_diverged_client(rule):
    """Finite but huge factors (B·A would overflow) are the same failure as NaN: a diverged client.
    Sweeps catch NonFiniteUpdateError to score the run as diverged; before, this case stopped them."""
    case = make_case(rule, m=6, n=4, r=2, K=3, seed=0)
    bad = case.updates[1]
    field = next(iter(bad.fields()))
    t = bad.fields()[field].clone()
    t.view(-1)[0] = 1e200
    case.updates[1] = ClientUpdate(**{**bad.fields(), field: t}, scale=bad.scale)
    with pytest.raises(NonFiniteUpdateError, match=r"client 1: .* magnitude .* the client diverged"):
        aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
