"""The averaging error recorded every round: e = ‖Σ p_k Δ_k − Σ p_k Δ_server,k‖ / ‖Σ p_k Δ_k − Σ p_k Δ_start,k‖,
checked against the same definition formed densely from what the clients returned, on m ≠ n."""
from __future__ import annotations

import pytest
import torch

from fedlora import get_rule, rule_names
from fedlora.config import FedConfig
from fedlora.linalg import frobenius_norm
from fedlora.loop import run_federated

from linear_tier import M, N, init_state, make_clients, make_local_train

DATA = make_clients(4)
RANKS = [2, 1, 2, 1]


def _ranks(rule):
    return dict(client_ranks=RANKS, client_scales=[1.0] * 4) if get_rule(rule).per_client_rank else {}


def _dense_error(rule_name, old, new, results, kept_ranks):
    """The definition, densely: Δ_k from the client's returned factors on its view's frozen base."""
    rule = get_rule(rule_name)
    w = torch.tensor([float(r.num_samples) for r in results], dtype=torch.float64)
    p = w / w.sum()
    clients = server = start = 0
    for pk, res, (r, s) in zip(p, results, kept_ranks):
        v_old = rule.client_view(old, rank=r, scale=s, seed=0)
        v_new = rule.client_view(new, rank=r, scale=s, seed=0)
        f = res.params["w"]
        if isinstance(f, torch.Tensor):
            d_k = f
        else:
            d_k = f.scale * f.B @ f.A + (v_old.base.dense() if v_old.base is not None else 0)
        clients = clients + pk * d_k
        server = server + pk * v_new.effective_delta()
        start = start + pk * v_old.effective_delta()
    err = float(torch.linalg.matrix_norm(clients - server))
    upd = float(torch.linalg.matrix_norm(clients - start))
    return err, upd


def _run_one_round_at_a_time(rule, rounds=3):
    """Run round by round, capturing the states and what each client returned."""
    cfg = FedConfig(rule=rule, rounds=rounds, num_clients=4, seed=3)
    honest = make_local_train(DATA, steps=5, lr=0.05)
    captured = []

    def local_train(task):
        res = honest(task)
        captured[-1].append(res)
        return res

    states, history = [init_state(rule)], []
    for t in range(rounds):
        captured.append([])
        state, rec = _round(cfg, states[-1], local_train, t)
        states.append(state)
        history.append(rec)
    return states, history, captured


def _round(cfg, state, local_train, t):
    """Round ``t`` of ``cfg`` through the loop's own server, from ``state`` (the rule's parity is t's)."""
    from fedlora.loop import RoundServer, make_task, round_record, sample_clients

    rule = get_rule(cfg.rule)
    kw = _ranks(cfg.rule)
    ranks, scales = kw.get("client_ranks"), kw.get("client_scales")
    server = RoundServer(rule, state, cfg, t, "raise", ranks, scales, fold=rule.linear)
    for c in sample_clients(cfg, t):
        server.add(c, local_train(make_task(rule, cfg, state, client=c, round_=t,
                                            rank=ranks[c] if ranks else None, scale=scales[c] if scales else None,
                                            local={})))
    new, aggs = server.finish()
    return new, round_record(rule, server, aggs, rank_of=lambda c: ranks[c] if ranks else None)


@pytest.mark.parametrize("rule", [r for r in rule_names() if r not in ("full-galore",) and not get_rule(r).chain])
def test_the_recorded_error_is_the_dense_definition_on_non_square_matrices(rule):
    assert M != N
    states, history, captured = _run_one_round_at_a_time(rule)
    kw = _ranks(rule)
    for t, rec in enumerate(history):
        kept = [(kw["client_ranks"][c], kw["client_scales"][c]) if kw else (None, None) for c in rec["clients"]]
        err, upd = _dense_error(rule, states[t]["w"], states[t + 1]["w"], captured[t], kept)
        got = rec["averaging_error"]
        assert got["update"] == pytest.approx(upd, rel=1e-7, abs=1e-12), (rule, t)
        assert got["error"] == pytest.approx(err, rel=1e-6, abs=1e-9 * max(upd, 1e-300)), (rule, t)
        if rule == "head-only":
            assert got["update"] == 0 and got["relative"] is None  # nothing trained, nothing to average
        elif get_rule(rule).exact and rule != "flexlora":
            assert got["relative"] < 1e-7, (rule, t, got)
        else:  # fedavg: the cross-covariance gap; flexlora: the truncation to the clients' ranks
            assert got["relative"] > 1e-4, (rule, t, got)


def test_flexlora_error_is_the_truncation_and_vanishes_at_full_rank():
    """With every client at the global's full rank nothing is truncated: the error is 0."""
    states, history, _ = _run_one_round_at_a_time("flexlora", rounds=1)
    assert history[0]["averaging_error"]["relative"] > 1e-4
    cfg = FedConfig(rule="flexlora", rounds=1, num_clients=4, seed=3)
    res = run_federated(cfg, init=init_state("flexlora"), local_train=make_local_train(DATA, steps=5, lr=0.05),
                        client_ranks=[1] * 4, client_scales=[1.0] * 4, progress=False)
    # rank-1 clients of a 4-client round: the sum has rank ≤ 4 and each client sees its top direction
    assert res.history[0]["averaging_error"]["relative"] > 1e-4


def test_fedavg_error_is_the_cross_covariance_of_the_factors():
    """SPEC: Σ p_k B_k A_k − B̄ Ā = Σ p_k (B_k − B̄)(A_k − Ā): the numerator of fedavg's error."""
    states, history, captured = _run_one_round_at_a_time("fedavg", rounds=1)
    res = captured[0]
    w = torch.tensor([float(r.num_samples) for r in res], dtype=torch.float64)
    p = w / w.sum()
    A = [r.params["w"].A for r in res]
    B = [r.params["w"].B for r in res]
    s = res[0].params["w"].scale
    Ab, Bb = sum(pk * a for pk, a in zip(p, A)), sum(pk * b for pk, b in zip(p, B))
    cross = s * sum(pk * (b - Bb) @ (a - Ab) for pk, a, b in zip(p, A, B))
    assert history[0]["averaging_error"]["error"] == pytest.approx(float(torch.linalg.matrix_norm(cross)), rel=1e-9)


@pytest.mark.parametrize("rule", [r for r in rule_names() if get_rule(r).chain])
def test_chained_rules_measure_against_the_global_not_the_chain(rule):
    """The update is Σ p_k Δ_k minus the round's global: a chained client's start is not the reference."""
    cfg = FedConfig(rule=rule, rounds=1, num_clients=4, seed=3)
    captured = []
    honest = make_local_train(DATA, steps=5, lr=0.05)
    res = run_federated(cfg, init=init_state(rule), local_train=lambda t: captured.append(honest(t)) or captured[-1],
                        progress=False)
    err, upd = _dense_error(rule, init_state(rule)["w"], res.state["w"], captured, [(None, None)] * 4)
    got = res.history[0]["averaging_error"]
    assert got["update"] == pytest.approx(upd, rel=1e-9) and got["error"] == pytest.approx(err, rel=1e-6, abs=1e-12)
    assert (got["relative"] < 1e-7) == get_rule(rule).exact


def test_the_error_can_be_switched_off():
    cfg = FedConfig(rule="fedavg", rounds=1, num_clients=4, seed=3)
    res = run_federated(cfg, init=init_state("fedavg"), local_train=make_local_train(DATA), progress=False,
                        averaging_error=False)
    assert res.history[0]["averaging_error"] is None


@pytest.mark.parametrize("m,n,qs", [(7, 5, (2, 1)), (5, 9, (1, 1, 2)), (40, 60, (3, 4)), (6, 4, (3, 3, 3))])
def test_frobenius_norm_of_a_factored_sum_equals_the_dense_norm(m, n, qs):
    """Both paths: the Gram form (q (m + n) < m n) and the dense fallback (the last two shapes)."""
    g = torch.Generator().manual_seed(m * n)
    terms = [(torch.randn(m, q, generator=g), torch.randn(q, n, generator=g)) for q in qs]
    dense = torch.randn(m, n, generator=g, dtype=torch.float64)
    want = sum(U.double() @ V.double() for U, V in terms)
    assert frobenius_norm(terms, shape=(m, n)) == pytest.approx(float(torch.linalg.matrix_norm(want)), rel=1e-10)
    assert frobenius_norm(terms, [dense], shape=(m, n)) == pytest.approx(
        float(torch.linalg.matrix_norm(want + dense)), rel=1e-10)
    assert frobenius_norm([], shape=(m, n)) == 0.0
