"""What the rules show a caller beyond round 0 and scale 1: RoLoRA's schedule over many rounds, the
client views of FLoRA and FlexLoRA with bases, warm-start adapters and scales ≠ 1, and the downlink
bytes of every rule (mutation testing, issue 25)."""
from __future__ import annotations

import pytest
import torch

from fedlora import ClientUpdate, DenseBase, GlobalMatrix, LoRAFactors, LowRank, RoundContext, aggregate, get_rule

from rule_cases import make_case

F64 = torch.float64


def _rnd(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def _close(a, b, tol=1e-10):
    assert torch.allclose(a, b, rtol=tol, atol=tol * (1 + float(b.abs().max()))), float((a - b).abs().max())


# --- RoLoRA: B, A, B, A, ... for as long as the run goes ---------------------------------------------

@pytest.mark.parametrize("rule", ["rolora", "rolora-chain"])
def test_rolora_alternates_b_and_a_over_many_rounds(rule):
    assert "".join(get_rule(rule).trains(t) for t in range(10)) == "BABABABABA"


def test_rolora_averages_the_scheduled_factor_every_round_and_keeps_the_other():
    g = torch.Generator().manual_seed(3)
    m, n, r, K, s = 6, 5, 2, 3, 0.5
    state = GlobalMatrix(lora=LoRAFactors(A=_rnd(g, r, n), B=_rnd(g, m, r), scale=s))
    w = torch.tensor([1.0, 2.0, 5.0], dtype=F64)
    p = w / w.sum()
    for t in range(6):
        trains = "B" if t % 2 == 0 else "A"
        shape = (m, r) if trains == "B" else (r, n)
        sent = [_rnd(g, *shape) for _ in range(K)]
        out = aggregate("rolora", state, [ClientUpdate(**{trains: x}, scale=s) for x in sent], w,
                        ctx=RoundContext(round=t))
        frozen = "A" if trains == "B" else "B"
        _close(getattr(out.state.lora, trains), sum(pk * x for pk, x in zip(p, sent)))
        assert torch.equal(getattr(out.state.lora, frozen), getattr(state.lora, frozen))
        assert set(out.broadcast) == {trains} and out.state.lora.scale == s
        state = out.state


# --- FLoRA's client view: the merged base, the warm-start adapter at its own scale ----------------------

def _flora_view(state, rank=3, scale=0.5, seed=7):
    return get_rule("flora").client_view(state, rank=rank, scale=scale, seed=seed)


@pytest.mark.parametrize("base_kind", ["lowrank", "dense"])
def test_flora_view_starts_every_client_from_all_earlier_merges(base_kind):
    g = torch.Generator().manual_seed(0)
    m, n = 7, 5
    base = LowRank(U=_rnd(g, m, 2), V=_rnd(g, 2, n))
    if base_kind == "dense":
        base = DenseBase(M=base.dense())
    v = _flora_view(GlobalMatrix(base=base), rank=3, scale=0.5)
    _close(v.effective_delta(), base.dense())  # the fresh adapter (B = 0) adds nothing on top
    assert v.lora.rank == 3 and v.lora.scale == 0.5 and v.lora.shape == (m, n)
    assert not v.lora.B.any() and v.lora.A.any() and v.lora.A.dtype == F64


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("warm_scale", [2.0, 0.25])
def test_flora_view_merges_a_warm_start_adapter_at_its_scale(with_base, warm_scale):
    g = torch.Generator().manual_seed(1)
    m, n, r = 6, 8, 2
    warm = LoRAFactors(A=_rnd(g, r, n), B=_rnd(g, m, r), scale=warm_scale)
    base = LowRank(U=_rnd(g, m, 1), V=_rnd(g, 1, n)) if with_base else None
    state = GlobalMatrix(lora=warm, base=base)
    v = _flora_view(state, rank=4, scale=1.5)
    want = warm_scale * warm.B @ warm.A + (base.dense() if with_base else 0)
    _close(v.base.dense(), want)
    _close(v.effective_delta(), want)
    assert v.lora.rank == 4 and v.lora.scale == 1.5 and not v.lora.B.any()


def test_flora_aggregate_merges_a_warm_start_adapter_at_its_scale():
    g = torch.Generator().manual_seed(2)
    m, n = 6, 8
    warm = LoRAFactors(A=_rnd(g, 2, n), B=_rnd(g, m, 2), scale=3.0)
    ups = [ClientUpdate(A=_rnd(g, rk, n), B=_rnd(g, m, rk), scale=sk) for rk, sk in ((1, 2.0), (3, 0.5))]
    w = torch.tensor([1.0, 3.0], dtype=F64)
    out = aggregate("flora", GlobalMatrix(lora=warm), ups, w, ctx=RoundContext(client_ranks=[1, 3]))
    want = 3.0 * warm.B @ warm.A + sum(pk * u.scale * u.B @ u.A for pk, u in zip(w / w.sum(), ups))
    _close(out.state.effective_delta(), want)
    assert out.state.lora is None


@pytest.mark.parametrize("rank,scale", [(None, 0.5), (3, None), (None, None)])
def test_flora_view_needs_the_client_rank_and_scale(rank, scale):
    state = GlobalMatrix(base=LowRank(U=torch.ones(4, 1, dtype=F64), V=torch.ones(1, 3, dtype=F64)))
    with pytest.raises(ValueError, match="rank and scale"):
        _flora_view(state, rank=rank, scale=scale)


def test_flora_view_draws_the_adapter_from_the_seed():
    state = GlobalMatrix(base=LowRank(U=torch.ones(6, 1, dtype=F64), V=torch.ones(1, 5, dtype=F64)))
    a, b, c = (_flora_view(state, seed=s).lora.A for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- FlexLoRA's client view at a client scale ≠ the global's --------------------------------------------

@pytest.mark.parametrize("g_scale", [1.0, 0.5])
@pytest.mark.parametrize("rank,scale", [(2, 0.25), (4, 2.0), (3, 0.5), (1, 3.0)])
def test_flexlora_view_keeps_the_truncated_product_at_the_client_scale(g_scale, rank, scale):
    g = torch.Generator().manual_seed(5)
    m, n, R = 7, 6, 4
    glob = LoRAFactors(A=_rnd(g, R, n), B=_rnd(g, m, R), scale=g_scale)
    v = get_rule("flexlora").client_view(GlobalMatrix(lora=glob), rank=rank, scale=scale, seed=0)
    assert v.lora.scale == scale and v.lora.rank == rank
    _close(v.lora.delta(), g_scale * glob.B[:, :rank] @ glob.A[:rank])
    assert torch.equal(v.lora.A, glob.A[:rank])


def test_flexlora_view_defaults_to_the_global_and_refuses_a_larger_rank():
    g = torch.Generator().manual_seed(6)
    glob = LoRAFactors(A=_rnd(g, 3, 5), B=_rnd(g, 4, 3), scale=0.75)
    state = GlobalMatrix(lora=glob)
    v = get_rule("flexlora").client_view(state, rank=None, scale=None, seed=0)
    assert v.lora.rank == 3 and v.lora.scale == 0.75
    _close(v.lora.delta(), glob.delta())
    with pytest.raises(ValueError, match="client rank 4 exceeds the global adapter's rank 3"):
        get_rule("flexlora").client_view(state, rank=4, scale=1.0, seed=0)


def test_flexlora_round_trip_through_the_view_at_client_scales():
    """Aggregate at per-client scales, then each client's view is the best rank-r_k part of Σ p_k s_k B_k A_k."""
    case = make_case("flexlora", m=8, n=6, r=3, K=3, seed=2)
    out = aggregate("flexlora", case.state, case.updates, case.weights, ctx=case.ctx)
    p = case.weights / case.weights.sum()
    total = sum(pk * u.scale * u.B @ u.A for pk, u in zip(p, case.updates))
    U, S, Vt = torch.linalg.svd(total)
    for rk, sk in zip(case.ctx.client_ranks, case.ctx.client_scales):
        v = get_rule("flexlora").client_view(out.state, rank=rk, scale=sk, seed=0)
        assert v.lora.scale == sk
        _close(v.lora.delta(), (U[:, :rk] * S[:rk]) @ Vt[:rk], tol=1e-8)


# --- downlink bytes: what every client receives, per rule ------------------------------------------------

M_, N_, R_, K_ = 6, 5, 3, 3


def _downlinks(rule, round_=0):
    case = make_case(rule, m=M_, n=N_, r=R_, K=K_, seed=1, round_=round_)
    rl = get_rule(rule)
    out = aggregate(rl, case.state, case.updates, case.weights, ctx=case.ctx)
    ranks = case.ctx.client_ranks or [R_] * K_
    return out, [rl.client_downlink_bytes(out, rk) for rk in ranks], case


@pytest.mark.parametrize("rule,round_,numbers", [
    ("fedavg", 0, M_ * R_ + R_ * N_), ("fedavg-chain", 0, M_ * R_ + R_ * N_),
    ("ffa", 0, M_ * R_), ("ffa-chain", 0, M_ * R_),
    ("full", 0, M_ * N_), ("full-galore", 0, M_ * N_),
    ("rolora", 0, M_ * R_), ("rolora", 1, R_ * N_), ("rolora", 2, M_ * R_), ("rolora", 3, R_ * N_),
    ("rolora-chain", 1, R_ * N_),
])
def test_downlink_bytes_of_the_broadcast_rules(rule, round_, numbers):
    out, per_client, _ = _downlinks(rule, round_)
    assert per_client == [numbers * 8] * K_  # float64 cases
    assert out.broadcast_bytes() == numbers * 8


def test_downlink_bytes_of_flexlora_are_each_clients_rank():
    _, per_client, case = _downlinks("flexlora")
    assert per_client == [rk * (M_ + N_) * 8 for rk in case.ctx.client_ranks]


def test_downlink_bytes_of_flora_are_the_whole_stack():
    _, per_client, case = _downlinks("flora")
    assert per_client == [sum(case.ctx.client_ranks) * (M_ + N_) * 8] * K_


def test_downlink_bytes_of_fedex_carry_the_residual_factors():
    out, per_client, _ = _downlinks("fedex")
    q = out.broadcast["residual_U"].shape[1]
    assert out.broadcast["residual_V"].shape == (q, N_) and q >= 1
    assert per_client == [(M_ * R_ + R_ * N_ + q * (M_ + N_)) * 8] * K_


# --- what a rule does not aggregate passes through; what it broadcasts is its new state ---------------------

def _with_extras(case, rule):
    """The case's state plus the parts this rule does not own: a frozen-weight base, a dense W or an adapter."""
    g = torch.Generator().manual_seed(9)
    m, n = case.state.shape
    base = LowRank(U=_rnd(g, m, 1), V=_rnd(g, 1, n))
    if get_rule(rule).trains(case.ctx.round) == "W":
        lora = LoRAFactors(A=_rnd(g, 2, n), B=_rnd(g, m, 2), scale=1.0)  # the uploads' scale
        return case.state.replace(lora=lora, base=base)
    return case.state.replace(W=_rnd(g, m, n), base=case.state.base if rule in ("fedex", "flora") else base)


@pytest.mark.parametrize("rule,round_", [("fedavg", 0), ("ffa", 0), ("rolora", 0), ("rolora", 1), ("flexlora", 0),
                                         ("fedex", 0), ("flora", 0), ("full", 0), ("head-only", 0)])
def test_a_rule_keeps_the_parts_of_the_state_it_does_not_aggregate(rule, round_):
    case = make_case(rule, m=6, n=5, r=3, K=3, seed=4, round_=round_)
    state = _with_extras(case, rule)
    out = aggregate(rule, state, case.updates, case.weights, ctx=case.ctx).state
    if get_rule(rule).trains(round_) == "W":
        assert out.lora is state.lora and out.base is state.base
    else:
        assert out.W is state.W
        if rule not in ("fedex", "flora"):  # these two fold a correction into the base; the others keep it
            assert out.base is state.base


@pytest.mark.parametrize("rule,round_,keys", [
    ("fedavg", 0, {"A", "B"}), ("ffa", 0, {"B"}), ("rolora", 0, {"B"}), ("rolora", 1, {"A"}),
    ("flexlora", 0, {"A", "B"}), ("full", 0, {"W"}), ("head-only", 0, set()),
])
def test_the_broadcast_is_the_new_global(rule, round_, keys):
    case = make_case(rule, m=6, n=5, r=3, K=3, seed=4, round_=round_)
    out = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
    assert set(out.broadcast) == keys
    for k, t in out.broadcast.items():
        assert torch.equal(t, out.state.W if k == "W" else getattr(out.state.lora, k))


def test_fedex_and_flora_broadcast_the_factors_clients_apply():
    case = make_case("fedex", m=6, n=5, r=3, K=3, seed=4)
    out = aggregate("fedex", case.state, case.updates, case.weights, ctx=case.ctx)
    b = out.broadcast
    assert set(b) == {"A", "B", "residual_U", "residual_V"}
    assert torch.equal(b["A"], out.state.lora.A) and torch.equal(b["B"], out.state.lora.B)
    _close(case.state.base.dense() + b["residual_U"] @ b["residual_V"], out.state.base.dense())
    case = make_case("flora", m=6, n=5, r=3, K=3, seed=4)
    out = aggregate("flora", case.state, case.updates, case.weights, ctx=case.ctx)
    assert set(out.broadcast) == {"B_g", "A_g"}
    _close(case.state.base.dense() + out.broadcast["B_g"] @ out.broadcast["A_g"], out.state.base.dense())
    assert out.broadcast["B_g"].shape == (6, sum(case.ctx.client_ranks))


def test_fedex_base_stays_at_the_residual_rank_when_the_residual_repeats():
    """Rounds whose residuals span one subspace: the re-compressed base keeps that rank, not r per round."""
    m, n, r, K = 40, 32, 2, 3  # K r = 6 <= min(m, n) / 4: the residual itself is re-compressed too
    g = torch.Generator().manual_seed(8)
    ups = [ClientUpdate(A=_rnd(g, r, n), B=_rnd(g, m, r), scale=0.5) for _ in range(K)]
    state = GlobalMatrix(lora=LoRAFactors(A=_rnd(g, r, n), B=_rnd(g, m, r), scale=0.5))
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    first = None
    for t in range(4):
        state = aggregate("fedex", state, ups, w, ctx=RoundContext(round=t)).state
        first = first if first is not None else state.base.dense()
        assert isinstance(state.base, LowRank) and state.base.rank == (K - 1) * r, (t, state.base.rank)
        _close(state.base.dense(), (t + 1) * first)


# --- the registry and the matrix name --------------------------------------------------------------------------

def test_a_registered_rule_is_found_by_name_and_listed():
    from fedlora.aggregators.registry import RULES, Rule, register
    from fedlora import rule_names
    rule = Rule(name="test-gap-rule", aggregate=lambda s, u, p, c: None, trains=lambda t: "AB", exact=True, paper="-")
    try:
        assert register(rule) is rule
        assert get_rule("test-gap-rule") is rule and "test-gap-rule" in rule_names()
    finally:
        RULES.pop("test-gap-rule", None)


def test_an_unknown_rule_lists_the_registered_ones():
    from fedlora import rule_names
    with pytest.raises(KeyError) as info:
        get_rule("no-such-rule")
    assert "unknown rule 'no-such-rule'; registered rules: " + ", ".join(rule_names()) in str(info.value)


def _broken_rule(where):
    """A rule that returns a non-finite global (a bug the backstop must catch), NaN in ``where``."""
    from fedlora.aggregators.registry import Aggregated, Rule

    def agg(state, updates, p, ctx):
        lora, base = state.lora, state.base
        nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
        if where == "lora":
            lora = LoRAFactors(A=nan(lora.A), B=lora.B, scale=lora.scale)
        elif where == "lowrank":
            base = LowRank(U=nan(base.U), V=base.V)
        elif where == "lowrank-V":
            base = LowRank(U=base.U, V=nan(base.V))
        else:
            base = DenseBase(M=nan(base.dense()))
        return Aggregated(state=GlobalMatrix(lora=lora, base=base))

    return get_rule("fedavg").__class__(name="broken", aggregate=agg, trains=lambda t: "AB", exact=True, paper="-")


@pytest.mark.parametrize("where", ["lora", "lowrank", "lowrank-V", "dense"])
def test_a_non_finite_aggregate_is_refused_naming_the_matrix(where):
    from fedlora import NonFiniteUpdateError
    case = make_case("fedex", m=6, n=5, r=2, K=2, seed=0)
    with pytest.raises(NonFiniteUpdateError, match=r"^layer\.3\.q: the aggregate is not finite"):
        aggregate(_broken_rule(where), case.state, case.updates, case.weights, name="layer.3.q")


def test_update_errors_name_the_matrix():
    from fedlora import UpdateError
    case = make_case("fedavg", m=6, n=5, r=2, K=2, seed=0)
    bad = ClientUpdate(A=case.updates[1].A, B=case.updates[1].B, scale=3.0)
    with pytest.raises(UpdateError, match=r"^layer\.3\.q: client 1 \(position 1\)|^layer\.3\.q: client 1:"):
        aggregate("fedavg", case.state, [case.updates[0], bad], case.weights, name="layer.3.q")
    with pytest.raises(UpdateError, match=r"^matrix: client 1"):
        aggregate("fedavg", case.state, [case.updates[0], bad], case.weights)
