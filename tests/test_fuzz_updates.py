"""The fuzz corpus of bad client uploads, for every registered rule: each ends in ``UpdateError``
naming the client and the fix, the global untouched; in the round loop ``drop`` drops that client and
the run goes on. The table printed by ``python tests/test_fuzz_updates.py`` is input × rule → outcome."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import ClientUpdate, LoRAFactors, UpdateError, aggregate, rule_names
from fedlora.config import FedConfig
from fedlora.loop import ClientResult, run_federated

from linear_tier import init_state, make_clients, make_local_train
from rule_cases import make_case

BAD = 1  # the position of the bad client in every case


def _first(u: ClientUpdate) -> str:
    return next(iter(u.fields()))


def _with(u: ClientUpdate, **kw) -> ClientUpdate:
    return ClientUpdate(**{**u.fields(), "scale": u.scale, **kw})


def _rank0(u: ClientUpdate) -> ClientUpdate:
    fields = {}
    for f, t in u.fields().items():
        fields[f] = t[:0] if f == "A" else t[:, :0]
    return ClientUpdate(**fields, scale=u.scale)


# name -> (how client BAD's upload is broken, what the error must say)
CORRUPTIONS = {
    "numpy array": (lambda u: _with(u, **{_first(u): u.fields()[_first(u)].numpy()}), "not a torch.Tensor"),
    "nested list": (lambda u: _with(u, **{_first(u): u.fields()[_first(u)].tolist()}), "not a torch.Tensor"),
    "huge finite (1e200)": (lambda u: _with(u, **{f: torch.full_like(t, 1e200) for f, t in u.fields().items()}),
                            "beyond .* B·A overflows"),
    "NaN scale": (lambda u: _with(u, scale=float("nan")), "not a finite positive number"),
    "zero scale": (lambda u: _with(u, scale=0.0), "not a finite positive number"),
    "negative scale": (lambda u: _with(u, scale=-1.0), "not a finite positive number"),
    "float32 in a float64 state": (lambda u: _with(u, **{f: t.float() for f, t in u.fields().items()}),
                                   "is torch.float32 but the global is torch.float64"),
    "rank 0": (_rank0, "rank 0|rank >= 1|has rank 0"),
}


def _case(rule: str):
    return make_case(rule, m=6, n=5, r=3, K=3, seed=0, round_=0)


def _applies(rule: str, corruption: str) -> bool:
    u = _case(rule).updates[BAD]
    if u.W is not None:  # the full-weight rules: no factors, no rank, no scale in use
        return corruption not in ("rank 0", "huge finite (1e200)")
    if not u.fields():  # head-only sends no factor: only its scale can be corrupted
        return "scale" in corruption
    return True


def _snapshot(state):
    out = [state.effective_delta().clone()]
    if state.base is not None:
        out.append(state.base.dense().clone())
    return out


def outcome(rule: str, corruption: str) -> str:
    """What ``aggregate`` does with the corruption: for the fuzz table and the test."""
    case = _case(rule)
    breaker, _ = CORRUPTIONS[corruption]
    case.updates[BAD] = breaker(case.updates[BAD])
    try:
        agg = aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
    except UpdateError as err:
        return f"UpdateError(client={err.client})"
    except Exception as err:  # noqa: BLE001 - the table shows what escapes
        return f"raw {type(err).__name__}"
    finite = all(bool(torch.isfinite(t).all()) for t in _snapshot(agg.state))
    return "accepted, finite" if finite else "accepted, NON-FINITE"


@pytest.mark.parametrize("rule", rule_names())
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_upload_is_rejected_by_name_and_changes_nothing(rule, corruption):
    if not _applies(rule, corruption):
        # full / full-galore average dense W: a huge finite W gives a finite average, and they have no
        # rank; head-only sends no tensor to corrupt
        if _case(rule).updates[BAD].fields():
            assert outcome(rule, corruption) in ("accepted, finite", "UpdateError(client=1)")
        return
    case = _case(rule)
    before = _snapshot(case.state)
    breaker, message = CORRUPTIONS[corruption]
    case.updates[BAD] = breaker(case.updates[BAD])
    with pytest.raises(UpdateError, match=message) as info:
        aggregate(rule, case.state, case.updates, case.weights, ctx=case.ctx)
    assert info.value.client == BAD and "client 1" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(case.state), before))


@pytest.mark.parametrize("weights", [None, "1,2,3", {"a": 1}, [object(), 1, 2], [[1, 2], [3]]])
def test_weights_that_are_not_numbers_are_refused_with_the_fix(weights):
    case = _case("fedavg")
    with pytest.raises(UpdateError, match="one number per client"):
        aggregate("fedavg", case.state, case.updates, weights)


def test_no_rule_leaves_a_non_finite_global_from_finite_uploads():
    """The original report: 1e200 factors made fedavg's ΔW inf and flexlora/flora/fedex raise a raw
    LinAlgError. Now each is rejected by the magnitude check; and if a rule ever produced a non-finite
    global from accepted input, the backstop refuses the round."""
    from fedlora.validation import NonFiniteUpdateError, validate_result
    from fedlora import GlobalMatrix

    for rule in rule_names():
        if _applies(rule, "huge finite (1e200)") and _case(rule).updates[BAD].fields():
            assert outcome(rule, "huge finite (1e200)") == "UpdateError(client=1)", rule
    bad = GlobalMatrix(lora=LoRAFactors(A=torch.full((2, 5), float("inf")), B=torch.ones(6, 2)))
    with pytest.raises(NonFiniteUpdateError, match="aggregate is not finite"):
        validate_result(bad)


DATA = make_clients(4)


def _poisoned_with(corruption: str, bad_client: int = 2):
    honest = make_local_train(DATA)
    breaker, _ = CORRUPTIONS[corruption]

    def local_train(task):
        res = honest(task)
        if task.client != bad_client or task.round != 0:
            return res
        f = res.params["w"]
        if isinstance(f, torch.Tensor):  # a W round
            u = breaker(ClientUpdate(W=f))
            return ClientResult(params={"w": u.W}, num_samples=res.num_samples)
        t = task.trains  # break what goes on the wire (FFA and RoLoRA send one factor)
        u = breaker(ClientUpdate(A=f.A if "A" in t else None, B=f.B if "B" in t else None, scale=f.scale))
        bad = _Factors(u.A if "A" in t else f.A, u.B if "B" in t else f.B, u.scale)
        return ClientResult(params={"w": bad}, num_samples=res.num_samples)

    return local_train


class _Factors(LoRAFactors):
    """LoRAFactors without the constructor's shape check, as a hostile client could send."""

    def __post_init__(self) -> None:
        pass


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "rolora", "fedex", "flexlora", "flora", "full"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_drop_drops_the_bad_client_and_the_run_goes_on(rule, corruption):
    if not _applies(rule, corruption) or (rule == "full" and "scale" in corruption):
        return  # a W upload is a bare tensor in the loop: it carries no scale to corrupt
    cfg = FedConfig(rule=rule, rounds=2, num_clients=4, seed=0)
    ranks = [2, 1, 2, 1] if rule in ("flexlora", "flora") else None
    scales = [1.0] * 4 if ranks else None
    res = run_federated(cfg, init=init_state(rule), local_train=_poisoned_with(corruption), on_bad_update="drop",
                        client_ranks=ranks, client_scales=scales, progress=False)
    first = res.history[0]
    assert first["clients"] == [0, 1, 3] and [r["client"] for r in first["rejected"]] == [2], first["rejected"]
    assert res.history[1]["clients"] == [0, 1, 2, 3]
    assert torch.isfinite(res.state["w"].effective_delta()).all()


if __name__ == "__main__":  # the fuzz table: input × rule → outcome
    rules = rule_names()
    print("| input | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    for c in CORRUPTIONS:
        print(f"| {c} | " + " | ".join(outcome(r, c) for r in rules) + " |")
