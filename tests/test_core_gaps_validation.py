"""Every validation path raises an ``UpdateError`` naming the culprit (mutation testing, issue 25):
the global scale, mixed A/B ranks, odd scales, the dtype of a base-only state, the magnitude limit at
its boundary, dense parameters, and weights whose sum overflows."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora import ClientUpdate, DenseBase, GlobalMatrix, LoRAFactors, LowRank, NonFiniteUpdateError, UpdateError
from fedlora import aggregate, RoundContext
from fedlora.validation import magnitude_limit, normalize_weights, state_dtype, validate_dense

from rule_cases import make_case

IDS = ["ann", "bob", "cy"]


def _reject(rule, case, bad_position, bad_update, *, err=UpdateError, match=None):
    ups = list(case.updates)
    ups[bad_position] = bad_update
    before = case.state.effective_delta().clone()
    with pytest.raises(err, match=match) as info:
        aggregate(rule, case.state, ups, case.weights, ctx=case.ctx, client_ids=IDS)
    assert type(info.value) is err
    assert info.value.client == IDS[bad_position] and info.value.position == bad_position
    assert repr(IDS[bad_position]) in str(info.value)
    assert torch.equal(case.state.effective_delta(), before)
    return info.value


# --- the scale ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,round_", [("fedavg", 0), ("ffa", 0), ("fedex", 0), ("rolora", 1)])
def test_a_scale_other_than_the_globals_is_refused(rule, round_):
    case = make_case(rule, m=6, n=4, r=2, K=3, seed=0, round_=round_)
    u = case.updates[1]
    _reject(rule, case, 1, ClientUpdate(A=u.A, B=u.B, scale=2 * u.scale), match="differs from the global's")


def test_per_client_rank_rules_take_each_clients_own_scale():
    case = make_case("flexlora", m=6, n=4, r=3, K=3, seed=0)
    assert len(set(case.ctx.client_scales)) > 1
    aggregate("flexlora", case.state, case.updates, case.weights, ctx=case.ctx)


@pytest.mark.parametrize("scale", [True, False, "0.5", None, [0.5], 0, -1.0, float("nan"), float("inf"),
                                   pytest.param(10 ** 400, id="int-beyond-float")])
@pytest.mark.parametrize("rule", ["fedavg", "flexlora", "flora"])
def test_a_scale_that_is_not_a_finite_positive_number_is_refused(rule, scale):
    case = make_case(rule, m=6, n=4, r=2, K=3, seed=0)
    if rule == "fedavg":  # so that True (== 1) would also pass the global-scale check
        case.state = case.state.replace(lora=dataclasses.replace(case.state.lora, scale=1.0))
        case.updates = [ClientUpdate(A=u.A, B=u.B, scale=1.0) for u in case.updates]
    u = case.updates[2]
    _reject(rule, case, 2, ClientUpdate(A=u.A, B=u.B, scale=scale), match="not a finite positive number")


# --- shapes and ranks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["flexlora", "flora"])
def test_a_client_whose_a_and_b_ranks_differ_is_refused(rule):
    case = make_case(rule, m=6, n=4, r=3, K=3, seed=0)
    g = torch.Generator().manual_seed(0)
    bad = ClientUpdate(A=torch.randn(2, 4, generator=g, dtype=torch.float64),
                       B=torch.randn(6, 3, generator=g, dtype=torch.float64), scale=1.0)
    _reject(rule, case, 1, bad, match="A has rank 2 but B has rank 3")


@pytest.mark.parametrize("field,shape,msg", [("A", (2, 5), r"A has shape \(2, 5\), expected \(r, 4\)"),
                                             ("B", (5, 2), r"B has shape \(5, 2\), expected \(6, r\)"),
                                             ("A", (3, 4), "A has rank 3, the global adapter has rank 2"),
                                             ("B", (6, 3), "B has rank 3, the global adapter has rank 2"),
                                             ("A", (0, 4), "rank"), ("B", (6, 0), "rank")])
def test_wrong_shapes_name_the_client(field, shape, msg):
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    u = case.updates[0]
    fields = {"A": u.A, "B": u.B, field: torch.ones(*shape, dtype=torch.float64)}
    _reject("fedavg", case, 0, ClientUpdate(**fields, scale=u.scale), match=msg)


def test_a_rank_zero_adapter_is_refused_for_per_client_ranks():
    case = make_case("flexlora", m=6, n=4, r=3, K=3, seed=0)
    bad = ClientUpdate(A=torch.ones(0, 4, dtype=torch.float64), B=torch.ones(6, 0, dtype=torch.float64), scale=1.0)
    _reject("flexlora", case, 2, bad, match="rank 0")


# --- the dtype of the global, whatever holds it ---------------------------------------------------------------

@pytest.mark.parametrize("base", [LowRank(U=torch.ones(6, 1, dtype=torch.float64), V=torch.ones(1, 4, dtype=torch.float64)),
                                  DenseBase(M=torch.ones(6, 4, dtype=torch.float64))])
def test_a_base_only_state_fixes_the_upload_dtype(base):
    state = GlobalMatrix(base=base)  # FLoRA after a merge: no adapter on the global, only the base
    assert state_dtype(state) == torch.float64
    ctx = RoundContext(client_ranks=[2, 2, 2])
    good = [ClientUpdate(A=torch.ones(2, 4, dtype=torch.float64), B=torch.ones(6, 2, dtype=torch.float64), scale=1.0)
            for _ in range(3)]
    aggregate("flora", state, good, [1, 1, 1], ctx=ctx, client_ids=IDS)
    bad = list(good)
    bad[1] = ClientUpdate(A=torch.ones(2, 4), B=torch.ones(6, 2), scale=1.0)  # float32
    with pytest.raises(UpdateError, match="float32 but the global is torch.float64") as info:
        aggregate("flora", state, bad, [1, 1, 1], ctx=ctx, client_ids=IDS)
    assert info.value.client == "bob"


def test_state_dtype_reads_the_weight_then_the_adapter_then_the_base():
    f16, f32, f64 = torch.float16, torch.float32, torch.float64
    lora = LoRAFactors(A=torch.ones(1, 3, dtype=f32), B=torch.ones(2, 1, dtype=f32))
    assert state_dtype(GlobalMatrix(W=torch.ones(2, 3, dtype=f16))) == f16
    assert state_dtype(GlobalMatrix(lora=lora, base=DenseBase(M=torch.ones(2, 3, dtype=f64)))) == f32
    assert state_dtype(GlobalMatrix(base=LowRank(U=torch.ones(2, 1, dtype=f16), V=torch.ones(1, 3, dtype=f16)))) == f16
    assert state_dtype(GlobalMatrix()) is None


# --- the magnitude limit, at its boundary -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 8, 1000])
def test_magnitude_limit_keeps_a_product_of_size_terms_finite(dtype, size):
    lim = magnitude_limit(dtype, size)
    fmax = torch.finfo(dtype).max
    assert lim == pytest.approx((fmax / (4 * size)) ** 0.5, rel=1e-12)
    assert size * lim * lim <= fmax / 4 * (1 + 1e-12)
    assert magnitude_limit(dtype, 0) == magnitude_limit(dtype, 1)


@pytest.mark.parametrize("field", ["A", "B"])
@pytest.mark.parametrize("factor,accepted", [(0.97, True), (1.03, False)])
def test_the_magnitude_limit_is_enforced_at_the_boundary(field, factor, accepted):
    m, n, r = 4, 16, 2  # the limit uses max(m, n) = 16
    lim = magnitude_limit(torch.float32, max(m, n))
    state = GlobalMatrix(lora=LoRAFactors(A=torch.zeros(r, n), B=torch.zeros(m, r), scale=1.0))
    ups = [ClientUpdate(A=torch.full((r, n), 1e-3), B=torch.full((m, r), 1e-3), scale=1.0) for _ in range(3)]
    big = {"A": ups[1].A.clone(), "B": ups[1].B.clone()}
    big[field][0, 0] = -lim * factor
    ups[1] = ClientUpdate(**big, scale=1.0)
    if accepted:
        out = aggregate("fedavg", state, ups, [1, 1, 1], client_ids=IDS)
        assert bool(torch.isfinite(out.state.effective_delta()).all())
    else:
        with pytest.raises(NonFiniteUpdateError, match=f"{field} has an entry of magnitude") as info:
            aggregate("fedavg", state, ups, [1, 1, 1], client_ids=IDS)
        assert info.value.client == "bob"


def test_a_dense_weight_has_no_factor_magnitude_limit():
    lim = magnitude_limit(torch.float32, 4)
    state = GlobalMatrix(W=torch.zeros(4, 4))
    ups = [ClientUpdate(W=torch.full((4, 4), 10 * lim)), ClientUpdate(W=torch.zeros(4, 4))]
    out = aggregate("full", state, ups, [1, 1])
    assert torch.allclose(out.state.W, torch.full((4, 4), 5 * lim))


# --- dense parameters (a task head) ---------------------------------------------------------------------------

@pytest.mark.parametrize("position", [0, 2])
@pytest.mark.parametrize("bad,err,msg", [
    (lambda: torch.ones(3, 2), UpdateError, r"shape \(3, 2\), expected \(2, 3\)"),
    (lambda: torch.ones(2, 3, dtype=torch.float64), UpdateError, "float64 but the global is torch.float32"),
    (lambda: torch.ones(2, 3, dtype=torch.int64), UpdateError, "send floating-point"),
    (lambda: [[1.0] * 3] * 2, UpdateError, "sent a list, expected a torch.Tensor"),
    (lambda: torch.full((2, 3), float("inf")), NonFiniteUpdateError, "NaN/Inf"),
])
def test_validate_dense_names_the_real_client(position, bad, err, msg):
    ups = [torch.zeros(2, 3) for _ in IDS]
    ups[position] = bad()
    with pytest.raises(err, match=msg) as info:
        validate_dense(torch.zeros(2, 3), ups, client_ids=IDS, name="head")
    assert type(info.value) is err
    assert (info.value.client, info.value.position) == (IDS[position], position)
    assert str(info.value).startswith(f"head: client {IDS[position]!r} (position {position})")


def test_validate_dense_without_ids_names_the_position():
    with pytest.raises(UpdateError, match=r"client 2: shape") as info:
        validate_dense(torch.zeros(2), [torch.zeros(2), torch.zeros(2), torch.zeros(3)])
    assert (info.value.client, info.value.position) == (2, 2)


def test_validate_dense_accepts_good_heads_and_refuses_an_empty_round():
    validate_dense(torch.zeros(2, 3), [torch.ones(2, 3), torch.zeros(2, 3)], client_ids=IDS[:2])
    with pytest.raises(UpdateError, match="head: no client updates"):
        validate_dense(torch.zeros(2, 3), [], name="head")


# --- weights ----------------------------------------------------------------------------------------------------

def test_weights_whose_sum_overflows_are_still_normalised():
    p = normalize_weights([1e308, 1e308, 0.0], 3)
    assert p.tolist() == [0.5, 0.5, 0.0]
    p = normalize_weights([1e308, 1e308 / 2], 2)
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


@pytest.mark.parametrize("weights", [pytest.param([10 ** 400, 1], id="int-beyond-float"), [1, "a"], [1, None], "12", None, {"a": 1}])
def test_weights_that_are_not_numbers_raise_an_update_error(weights):
    with pytest.raises(UpdateError, match="weight"):
        normalize_weights(weights, 2)


def test_a_bad_weight_names_its_client():
    with pytest.raises(UpdateError, match="client 'cy' \\(position 2\\) has a negative weight") as info:
        normalize_weights([1.0, 2.0, -1.0], 3, client_ids=IDS)
    assert (info.value.client, info.value.position) == ("cy", 2)
    with pytest.raises(UpdateError, match=r"client 'ann' \(position 0\) has a non-finite weight nan") as info:
        normalize_weights([float("nan"), 2.0, 1.0], 3, client_ids=IDS)
    assert info.value.client == "ann"


# --- the messages say what is wrong ------------------------------------------------------------------------------

def test_validate_updates_called_directly_checks_ranks_and_names_the_matrix():
    from fedlora.validation import validate_updates
    case = make_case("fedavg", m=6, n=4, r=2, K=2, seed=0)
    bad = ClientUpdate(A=torch.ones(3, 4, dtype=torch.float64), B=torch.ones(6, 3, dtype=torch.float64),
                       scale=case.updates[0].scale)
    with pytest.raises(UpdateError, match=r"^matrix: client 1: A has rank 3, the global adapter has rank 2"):
        validate_updates(case.state, [case.updates[0], bad], "AB")
    validate_updates(case.state, [case.updates[0], bad], "AB", per_client_rank=True)


@pytest.mark.parametrize("make,msg", [
    (lambda u: {"A": u.A, "B": u.B, "W": torch.ones(6, 4, dtype=torch.float64)},
     r"sent \['A', 'B', 'W'\] but this round trains \['A', 'B'\]"),
    (lambda u: {}, r"sent nothing but this round trains \['A', 'B'\]"),
    (lambda u: {"A": torch.ones(2, 4, 1, dtype=torch.float64), "B": u.B}, r"A has shape \(2, 4, 1\), expected \(r, 4\) for a 6×4"),
    (lambda u: {"A": u.A, "B": torch.ones(6, dtype=torch.float64)}, r"B has shape \(6,\), expected \(6, r\) for a 6×4"),
    (lambda u: {"A": u.A.numpy(), "B": u.B}, r"A is a numpy.ndarray, not a torch.Tensor"),
    (lambda u: {"A": u.A.to(torch.int32), "B": u.B}, "A has dtype torch.int32; send floating-point"),
])
def test_each_refusal_says_what_is_wrong(make, msg):
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    _reject("fedavg", case, 1, ClientUpdate(**make(case.updates[1]), scale=case.updates[1].scale),
            match=f"^matrix: client 'bob' \\(position 1\\)(:)? {msg}")


def test_a_non_update_object_is_refused():
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    _reject("fedavg", case, 0, {"A": 1}, match=r"client 'ann' \(position 0\) sent a dict, expected fedlora.ClientUpdate")


def test_a_wrong_dense_w_is_refused():
    case = make_case("full", m=6, n=4, r=2, K=3, seed=0)
    _reject("full", case, 2, ClientUpdate(W=torch.ones(4, 6, dtype=torch.float64)),
            match=r"W has shape \(4, 6\), expected \(6, 4\)")


def test_non_finite_entries_are_counted():
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    u = case.updates[2]
    B = u.B.clone()
    B[0, 0], B[1, 1] = float("nan"), float("-inf")
    _reject("fedavg", case, 2, ClientUpdate(A=u.A, B=B, scale=u.scale), err=NonFiniteUpdateError,
            match=r"B has 2 NaN/Inf entries; the client diverged")


def test_a_mismatched_scale_says_both_scales():
    case = make_case("fedavg", m=6, n=4, r=2, K=3, seed=0)
    u = case.updates[0]
    _reject("fedavg", case, 0, ClientUpdate(A=u.A, B=u.B, scale=3.0),
            match=rf"scale 3.0 differs from the global's {u.scale}; use one alpha/r")


@pytest.mark.parametrize("field", ["A", "B"])
def test_rank_zero_names_the_factor(field):
    case = make_case("flexlora", m=6, n=4, r=3, K=3, seed=0)
    shapes = {"A": ((0, 4), (6, 2)), "B": ((2, 4), (6, 0))}[field]
    bad = ClientUpdate(A=torch.ones(*shapes[0], dtype=torch.float64), B=torch.ones(*shapes[1], dtype=torch.float64))
    _reject("flexlora", case, 1, bad, match=f"{field} has rank 0; a client must train an adapter of rank >= 1")


def test_weights_none_and_text_say_what_to_pass():
    with pytest.raises(UpdateError, match=r"^weights=None; pass one number per client update"):
        normalize_weights(None, 2)
    with pytest.raises(UpdateError, match=r"^weights of type list are not a sequence of numbers"):
        normalize_weights([1, "a"], 2)
    with pytest.raises(UpdateError, match=r"^all client weights are zero"):
        normalize_weights([0, 0], 2)


def test_update_error_carries_its_culprit_as_data():
    err = UpdateError("boom", client="c7", position=3)
    assert (str(err), err.client, err.position) == ("boom", "c7", 3)
    assert isinstance(err, ValueError) and UpdateError("x").client is None
