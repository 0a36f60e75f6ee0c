"""What the LLM tier needs from the core: dense parameters beside the adapters, a client's own state
across rounds, lazy client views, a streaming fold for linear rules, culprits as data, bounded bases."""
from __future__ import annotations

import pytest
import torch

import fedlora.loop as loop_mod
from fedlora import DenseBase, GlobalMatrix, LoRAFactors, LowRank, UpdateError, aggregate, get_rule, rule_names
from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.config import FedConfig
from fedlora.factors import ClientUpdate, init_lora
from fedlora.linalg import merge_into_base
from fedlora.loop import ClientResult, run_federated

from linear_tier import M, N, init_state, make_clients, make_evaluate, make_local_train

DATA = make_clients(4)
HEAD = (3, 5)


def _with_head(rule, local_train):
    """A tier with a dense 'head' trained by every client: head_k = head + (k + 1) · 0.1 (k the client id)."""
    def train(task):
        res = local_train(task)
        head = task.start["head"] + 0.1 * (task.client + 1)
        return ClientResult(params={**res.params, "head": head}, num_samples=res.num_samples, metrics=res.metrics)

    init = {**init_state(rule), "head": torch.zeros(HEAD, dtype=torch.float64)}
    return init, train


def _cfg(rule, rounds=3, **kw):
    return FedConfig(rule=rule, rounds=rounds, num_clients=4, seed=5, **kw)


def _ranks(rule):
    return dict(client_ranks=[2, 1, 2, 1], client_scales=[1.0] * 4) if rule in ("flexlora", "flora") else {}


@pytest.mark.parametrize("rule", [r for r in rule_names() if r != "full-galore" and not get_rule(r).chain])
def test_dense_parameters_are_averaged_by_sample_count_under_every_rule(rule):
    init, train = _with_head(rule, make_local_train(DATA))
    res = run_federated(_cfg(rule, rounds=2), init=init, local_train=train, progress=False, **_ranks(rule))
    n = torch.tensor([float(X.shape[0]) for X, _ in DATA], dtype=torch.float64)
    step = float((n / n.sum() * 0.1 * torch.arange(1, 5, dtype=torch.float64)).sum())  # Σ p_k 0.1 (k + 1)
    torch.testing.assert_close(res.state["head"], torch.full(HEAD, 2 * step, dtype=torch.float64), rtol=0, atol=1e-12)
    head_bytes = 3 * 5 * 8
    h = res.history[0]
    assert all(b >= head_bytes for b in h["uplink_bytes"].values())


@pytest.mark.parametrize("rule", [r for r in rule_names() if get_rule(r).chain])
def test_chained_rules_chain_the_dense_parameters_too(rule):
    """The released code's shared model carries the head from client to client as well."""
    init, train = _with_head(rule, make_local_train(DATA))
    res = run_federated(_cfg(rule, rounds=1), init=init, local_train=train, progress=False)
    n = torch.tensor([float(X.shape[0]) for X, _ in DATA], dtype=torch.float64)
    chained = 0.1 * torch.cumsum(torch.arange(1, 5, dtype=torch.float64), 0)  # client k ends at Σ_{j≤k} 0.1 (j + 1)
    torch.testing.assert_close(res.state["head"], torch.full(HEAD, float((n / n.sum() * chained).sum()),
                                                             dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "rolora", "full"])
def test_streaming_fold_equals_aggregating_all_clients_at_once(rule):
    """Linear rules fold each client into a running sum; the batched path aggregates all at once."""
    init, train = _with_head(rule, make_local_train(DATA))
    one = run_federated(_cfg(rule), init=init, local_train=train, progress=False)
    batch = run_federated(_cfg(rule), init=init, local_train=train, progress=False,
                          local_train_batch=lambda tasks: [train(t) for t in tasks])
    for name in init:
        a, b = one.state[name], batch.state[name]
        a, b = (a, b) if isinstance(a, torch.Tensor) else (a.effective_delta(), b.effective_delta())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert one.history[-1]["uplink_bytes"] == batch.history[-1]["uplink_bytes"]


def test_client_views_are_made_when_each_client_starts(monkeypatch):
    made = []
    real = loop_mod.client_view
    monkeypatch.setattr(loop_mod, "client_view", lambda *a, **k: made.append(k["client"]) or real(*a, **k))
    trained = []
    base = make_local_train(DATA)

    def train(task):
        trained.append(task.client)
        assert made == trained, "a view was made before its client started"
        return base(task)

    run_federated(_cfg("fedex", rounds=1), init=init_state("fedex"), local_train=train, progress=False)
    assert trained == [0, 1, 2, 3]


def test_a_client_keeps_its_local_state_across_rounds_and_resume(tmp_path):
    base = make_local_train(DATA)
    seen = {}

    def train(task):
        seen.setdefault(task.client, []).append(float(task.local["count"]) if task.local else 0.0)
        res = base(task)
        count = (task.local["count"] if task.local else torch.zeros(())) + 1
        return ClientResult(params=res.params, num_samples=res.num_samples, local={"count": count})

    cfg = FedConfig(rule="fedavg", rounds=4, num_clients=4, clients_per_round=2, seed=1)
    whole = run_federated(cfg, init=init_state("fedavg"), local_train=train, progress=False)
    assert all(v == list(range(len(v))) for v in seen.values())  # each client counts its own rounds
    assert {c: float(s["count"]) for c, s in whole.client_state.items()} == {c: len(v) for c, v in seen.items()}
    seen.clear()
    run_federated(cfg, init=init_state("fedavg"), local_train=train, progress=False, checkpoint_dir=tmp_path,
                  stop_after=2)
    resumed = run_federated(cfg, init=init_state("fedavg"), local_train=train, progress=False,
                            checkpoint_dir=tmp_path, resume=True)
    assert {c: float(s["count"]) for c, s in resumed.client_state.items()} == \
           {c: float(s["count"]) for c, s in whole.client_state.items()}


@pytest.mark.parametrize("rule", ["fedavg", "fedex"])  # the folding and the collecting server
def test_a_bad_client_is_named_as_data_and_dropped(rule):
    base = make_local_train(DATA)

    def train(task):
        res = base(task)
        if task.client == 2:
            f = res.params["w"]
            return ClientResult(params={"w": LoRAFactors(A=f.A * float("nan"), B=f.B, scale=f.scale)},
                                num_samples=res.num_samples)
        return res

    with pytest.raises(UpdateError) as err:
        run_federated(_cfg(rule, rounds=1), init=init_state(rule), local_train=train, progress=False)
    assert err.value.client == 2
    res = run_federated(_cfg(rule, rounds=2), init=init_state(rule), local_train=train, progress=False,
                        on_bad_update="drop", evaluate=make_evaluate(DATA))
    assert [r["client"] for r in res.history[0]["rejected"]] == [2]
    assert res.history[0]["clients"] == [0, 1, 3]
    assert torch.isfinite(res.state["w"].effective_delta()).all()


def test_a_client_missing_a_name_is_rejected_by_name():
    base = make_local_train(DATA)
    init = {**init_state("fedavg"), "head": torch.zeros(HEAD, dtype=torch.float64)}

    def train(task):
        res = base(task)
        extra = {} if task.client == 1 else {"head": task.start["head"]}
        return ClientResult(params={**res.params, **extra}, num_samples=res.num_samples)

    res = run_federated(_cfg("fedavg", rounds=1), init=init, local_train=train, progress=False, on_bad_update="drop")
    (rej,) = res.history[0]["rejected"]
    assert rej["client"] == 1 and "head" in rej["error"]


def _random_lowrank(m, n, q, g):
    return LowRank(U=torch.randn(m, q, generator=g, dtype=torch.float64), V=torch.randn(q, n, generator=g, dtype=torch.float64))


def test_merge_into_base_stays_bounded_and_switches_to_dense_exactly():
    m, n, q = 12, 7, 3
    g = torch.Generator().manual_seed(0)
    base, dense, kinds = None, torch.zeros(m, n, dtype=torch.float64), []
    for _ in range(6):
        d = _random_lowrank(m, n, q, g)
        base = merge_into_base(base, d)
        dense = dense + d.dense()
        kinds.append(type(base).__name__)
        assert base.nbytes() <= min((m + n) * min(m, n), m * n) * 8
        torch.testing.assert_close(base.dense(), dense, rtol=0, atol=1e-12)
    # rank 3, 6 (factored: 6·19 = 114 > 84 = m n) -> dense from the second merge on
    assert kinds == ["LowRank"] + ["DenseBase"] * 5


def test_fedex_and_flora_bases_stay_bounded_over_many_rounds():
    for rule in ("fedex", "flora"):
        ranks = _ranks(rule)
        init = init_state(rule)
        cfg = FedConfig(rule=rule, rounds=8, num_clients=4, seed=2)
        res = run_federated(cfg, init=init, local_train=make_local_train(DATA), progress=False, **ranks)
        base = res.state["w"].base
        assert isinstance(base, DenseBase), (rule, type(base))
        assert base.nbytes() == M * N * 8


def test_fedex_with_a_dense_base_equals_the_factored_path():
    """The switch to dense changes nothing beyond float tolerance."""
    g = torch.Generator().manual_seed(4)
    lora = init_lora(M, N, 2, scale=0.5, generator=g, dtype=torch.float64)
    lora = LoRAFactors(A=lora.A, B=torch.randn(M, 2, generator=g, dtype=torch.float64), scale=0.5)
    ups = [ClientUpdate(A=torch.randn(2, N, generator=g, dtype=torch.float64),
                        B=torch.randn(M, 2, generator=g, dtype=torch.float64), scale=0.5) for _ in range(3)]
    prior = _random_lowrank(M, N, 1, g)
    factored = aggregate("fedex", GlobalMatrix(lora=lora, base=prior), ups, [1, 2, 3]).state
    dense = aggregate("fedex", GlobalMatrix(lora=lora, base=DenseBase(M=prior.dense())), ups, [1, 2, 3]).state
    assert isinstance(dense.base, DenseBase)
    torch.testing.assert_close(factored.effective_delta(), dense.effective_delta(), rtol=0, atol=1e-12)


def test_checkpoint_round_trips_dense_bases_dense_parameters_and_client_state(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": GlobalMatrix(lora=init_lora(M, N, 2, scale=1.0, generator=g), base=DenseBase(M=torch.randn(M, N))),
             "v": GlobalMatrix(base=_random_lowrank(M, N, 2, g)), "head": torch.randn(3), "W": GlobalMatrix(W=torch.ones(2, 2))}
    local = {3: {"head": torch.arange(3.0)}, 11: {"x": torch.ones(2, 2)}}
    save_checkpoint(tmp_path, state=state, round_done=4, info={"note": "x"}, client_state=local)
    back, info = load_checkpoint(tmp_path)
    assert torch.equal(back["head"], state["head"]) and isinstance(back["w"].base, DenseBase)
    for name in ("w", "v", "W"):
        assert torch.equal(back[name].effective_delta(), state[name].effective_delta())
    assert set(info["client_state"]) == {3, 11} and torch.equal(info["client_state"][3]["head"], torch.arange(3.0))


@pytest.mark.parametrize("bad", ["nan", "shape", "weight"])
def test_aggregate_names_the_culprit_as_data(bad):
    g = torch.Generator().manual_seed(1)
    state = GlobalMatrix(lora=init_lora(M, N, 2, scale=1.0, generator=g, dtype=torch.float64))
    ups = [ClientUpdate(A=torch.randn(2, N, generator=g, dtype=torch.float64),
                        B=torch.randn(M, 2, generator=g, dtype=torch.float64)) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    if bad == "nan":
        ups[1] = ClientUpdate(A=ups[1].A * float("nan"), B=ups[1].B)
    elif bad == "shape":
        ups[1] = ClientUpdate(A=ups[1].A[:, :-1], B=ups[1].B)
    else:
        weights[1] = -1.0
    with pytest.raises(UpdateError) as err:
        aggregate("fedavg", state, ups, weights, client_ids=["a", "b", "c"])
    assert (err.value.client, err.value.position) == ("b", 1)
