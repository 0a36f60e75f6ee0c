"""The round loop's behaviour that its first mutation report (issue 25, suite ``loop``) found untested:
weighting, refused sample counts, the weighted train metrics, the round record and its bytes, chained
starts, client views and seeds, uploads by name, the averaging error switch, drops at aggregation,
half precision in the fold, the batched and chained trainers, the evaluation and checkpoint schedule,
resume and its fingerprint. Each test states what a caller of ``run_federated`` (or of
``RoundServer``, which the Flower strategy drives) sees. Fast: the linear tier, a round or a few."""
from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace

import pytest
import torch

import fedlora.loop as loop_mod
from fedlora import GlobalMatrix, LoRAFactors, LowRank, UpdateError, get_rule, init_lora
from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.config import ConfigError, FedConfig
from fedlora.loop import ClientResult, RoundServer, make_task, run_federated, sample_clients

from linear_tier import M, N, R, init_state, make_clients, make_evaluate, make_local_train

DATA = make_clients(4)
SIZES = [X.shape[0] for X, _ in DATA]  # 40, 43, 46, 49
HEAD = (3, 5)
F64 = 8


def _cfg(rule="fedavg", rounds=1, **kw):
    return dict(rule=rule, rounds=rounds, num_clients=4, seed=kw.pop("seed", 5), **kw)


def _head_train(local_train, step=0.1):
    """Adds a dense head: client k sends head + step · (k + 1)."""
    def train(task):
        res = local_train(task)
        head = task.start["head"] + step * (task.client + 1)
        return ClientResult(params={**res.params, "head": head}, num_samples=res.num_samples, metrics=res.metrics,
                            local=res.local)
    return train


def _head_first(rule, dtype=torch.float64, scale=1.0):
    """A state whose dense head comes before the adapted matrix (the loop must not stop at the head)."""
    g = torch.Generator().manual_seed(0)
    w = (GlobalMatrix(W=torch.zeros(M, N, dtype=dtype)) if rule.startswith("full")
         else GlobalMatrix(lora=init_lora(M, N, R, scale=scale, generator=g, dtype=dtype)))
    return {"head": torch.zeros(HEAD, dtype=dtype), "w": w}


# --- weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fedavg", "fedex"])  # the folding and the collecting server
def test_uniform_weighting_averages_the_clients_equally_whatever_their_sample_counts(rule):
    train = _head_train(make_local_train(DATA))
    init = {**init_state(rule), "head": torch.zeros(HEAD, dtype=torch.float64)}
    uni = run_federated(FedConfig(**_cfg(rule, weighting="uniform")), init=init, local_train=train, progress=False)
    torch.testing.assert_close(uni.state["head"], torch.full(HEAD, 0.25, dtype=torch.float64), rtol=0, atol=1e-12)
    by_n = run_federated(FedConfig(**_cfg(rule)), init=init, local_train=train, progress=False)
    expect = sum(n * 0.1 * (k + 1) for k, n in enumerate(SIZES)) / sum(SIZES)
    torch.testing.assert_close(by_n.state["head"], torch.full(HEAD, expect, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan")])
@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_a_negative_infinite_or_nan_sample_count_is_refused_naming_the_client(rule, bad):
    honest = make_local_train(DATA)

    def train(task):
        res = honest(task)
        return dataclasses_replace(res, num_samples=bad) if task.client == 2 else res

    with pytest.raises(UpdateError, match=r"client 2 reported num_samples=.*finite count >= 0") as err:
        run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=train, progress=False)
    assert err.value.client == 2
    res = run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=train, progress=False,
                        on_bad_update="drop")
    assert res.history[0]["clients"] == [0, 1, 3] and [r["client"] for r in res.history[0]["rejected"]] == [2]
    assert "num_samples" in res.history[0]["rejected"][0]["error"]


@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_a_client_with_no_samples_is_kept_and_carries_no_weight(rule):
    train = _head_train(make_local_train(DATA))

    def zero_for_1(task):
        res = train(task)
        return dataclasses_replace(res, num_samples=0) if task.client == 1 else res

    init = {**init_state(rule), "head": torch.zeros(HEAD, dtype=torch.float64)}
    res = run_federated(FedConfig(**_cfg(rule)), init=init, local_train=zero_for_1, progress=False)
    assert res.history[0]["clients"] == [0, 1, 2, 3] and res.history[0]["rejected"] == []
    n = [SIZES[0], 0, SIZES[2], SIZES[3]]
    expect = sum(nk * 0.1 * (k + 1) for k, nk in enumerate(n)) / sum(n)
    torch.testing.assert_close(res.state["head"], torch.full(HEAD, expect, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_all_clients_without_samples_is_refused_and_a_lone_client_of_weight_one_is_fine(rule):
    honest = make_local_train(DATA)
    zero = lambda task: dataclasses_replace(honest(task), num_samples=0)  # noqa: E731
    with pytest.raises(UpdateError, match="all client weights are zero"):
        run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=zero, progress=False)
    one = lambda task: dataclasses_replace(honest(task), num_samples=1)  # noqa: E731
    cfg = FedConfig(**_cfg(rule, clients_per_round=0.25))  # one client per round, total weight exactly 1
    got = run_federated(cfg, init=init_state(rule), local_train=one, progress=False)
    ref = run_federated(cfg, init=init_state(rule), local_train=honest, progress=False)  # any weight: p = [1]
    torch.testing.assert_close(got.state["w"].effective_delta(), ref.state["w"].effective_delta(), rtol=1e-12, atol=1e-12)


# --- the round record ------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_train_metrics_are_weighted_means_over_the_clients_that_report_each(rule):
    """p_k ∝ n_k, renormalised over the clients reporting a metric: one that only some clients report is
    their weighted mean, not shrunk towards 0 by the silent ones; fractional weights are normalised too."""
    honest = make_local_train(DATA)
    n = [0.25, 0.5, 0.125, 0.0625]  # Σ n < 1
    reported = {0: {"loss": 1.0, "acc": 0.5}, 1: {"loss": 3.0}, 2: {"loss": 2.0, "acc": 0.25}, 3: {}}

    def train(task):
        return ClientResult(params=honest(task).params, num_samples=n[task.client], metrics=reported[task.client])

    h = run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=train, progress=False).history[0]
    loss = (0.25 * 1.0 + 0.5 * 3.0 + 0.125 * 2.0) / (0.25 + 0.5 + 0.125)
    acc = (0.25 * 0.5 + 0.125 * 0.25) / (0.25 + 0.125)
    assert h["train"].keys() == {"acc", "loss"}
    assert h["train"]["loss"] == pytest.approx(loss, rel=1e-13) and h["train"]["acc"] == pytest.approx(acc, rel=1e-13)


def test_train_metrics_are_exact_in_float64():
    honest = make_local_train(DATA)
    vals = [1 / 3, 2 / 7, 5 / 11, 7 / 13]

    def train(task):
        return ClientResult(params=honest(task).params, num_samples=SIZES[task.client],
                            metrics={"loss": vals[task.client]})

    h = run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=train, progress=False).history[0]
    assert h["train"]["loss"] == pytest.approx(sum(n * v for n, v in zip(SIZES, vals)) / sum(SIZES), rel=1e-14, abs=0)


def test_the_round_record_names_every_field_and_counts_a_dense_head_in_both_directions():
    train = _head_train(make_local_train(DATA))
    init = {**init_state("fedavg"), "head": torch.zeros(HEAD, dtype=torch.float64)}
    h = run_federated(FedConfig(**_cfg(rounds=2)), init=init, local_train=train, progress=False).history
    assert [r["round"] for r in h] == [0, 1] and all(r["trains"] == "AB" for r in h)
    assert set(h[0]) == {"round", "clients", "trains", "train", "rejected", "averaging_error", "uplink_bytes",
                         "downlink_bytes", "total_uplink_bytes", "total_downlink_bytes"}
    assert h[0]["train"].keys() == {"train_loss"} and isinstance(h[0]["averaging_error"], dict)
    one = R * (M + N) * F64 + HEAD[0] * HEAD[1] * F64  # the factors and the head, each way
    assert h[0]["uplink_bytes"] == h[0]["downlink_bytes"] == {str(c): one for c in range(4)}
    assert h[0]["total_downlink_bytes"] == 4 * one


def test_flexlora_without_client_ranks_sends_each_client_the_global_at_its_full_rank():
    """No client_ranks: every client starts from (and is counted as receiving) the whole global adapter."""
    ranks = []
    honest = make_local_train(DATA)

    def train(task):
        ranks.append((task.round, task.start["w"].lora.rank))
        return honest(task)

    res = run_federated(FedConfig(**_cfg("flexlora", rounds=2)), init=init_state("flexlora"), local_train=train,
                        progress=False)
    q0 = res.history[0]
    assert ranks[:4] == [(0, R)] * 4
    g_rank = ranks[4][1]  # the global's rank after round 0 (the SVD keeps every direction)
    assert g_rank > R and ranks[4:] == [(1, g_rank)] * 4
    assert q0["downlink_bytes"] == {str(c): g_rank * (M + N) * F64 for c in range(4)}


# --- chains, views, seeds ----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fedavg-chain", "ffa-chain", "rolora-chain"])
def test_a_chained_client_starts_from_its_predecessors_trained_factors_and_head_with_the_scale_kept(rule):
    """Client k starts from client k−1's trained factors and dense head; the factor the round freezes is the
    global's whatever k−1 sent back for it, and the adapter's scale stays the global's (here 2)."""
    trains_of = get_rule(rule).trains
    starts, sent, globals_ = [], [], []
    honest = make_local_train(DATA)

    def train(task):
        w = task.start["w"]
        starts.append((task.round, task.client, w.lora, task.start["head"]))
        res = honest(task)
        f = res.params["w"]
        junk = {x: getattr(f, x) + 1.0 if x not in task.trains else getattr(f, x) for x in "AB"}  # frozen: not sent
        out = {"w": LoRAFactors(A=junk["A"], B=junk["B"], scale=f.scale),
               "head": task.start["head"] + 0.1 * (task.client + 1)}
        sent.append(out)
        return ClientResult(params=out, num_samples=res.num_samples)

    res = run_federated(FedConfig(**_cfg(rule, rounds=2)), init=_head_first(rule, scale=2.0), local_train=train,
                        progress=False, on_round_start=lambda t, s: globals_.append(s))
    assert list(res.state) == ["head", "w"] and res.state["w"].lora.scale == 2.0
    for i, (t, c, lora, head) in enumerate(starts):
        g = globals_[t]
        assert lora.scale == 2.0
        if c == 0:  # the round's first client: the global
            assert torch.equal(lora.A, g["w"].lora.A) and torch.equal(lora.B, g["w"].lora.B)
            assert torch.equal(head, g["head"])
            continue
        prev = sent[i - 1]
        assert torch.equal(head, prev["head"])
        for x in "AB":
            want = getattr(prev["w"], x) if x in trains_of(t) else getattr(g["w"].lora, x)
            assert torch.equal(getattr(lora, x), want), (rule, t, c, x)


@pytest.mark.parametrize("rule", ["fedex", "fedavg", "flora"])
def test_every_client_starts_from_the_whole_global_base_and_head_included(rule):
    """After round 0 FedEx and FLoRA carry a base; a client's start must hold it (and the head listed first)."""
    globals_, starts = [], []
    honest = make_local_train(DATA)
    kw = dict(client_ranks=[R] * 4, client_scales=[1.0] * 4) if rule == "flora" else {}

    def train(task):
        starts.append((task.round, task.start))
        return ClientResult(params={**honest(task).params, "head": task.start["head"] + 1.0}, num_samples=1)

    init = _head_first(rule)
    if rule == "flora":  # FLoRA needs a non-zero frozen weight: start from a random base (its docstring)
        g = torch.Generator().manual_seed(1)
        init["w"] = GlobalMatrix(base=LowRank(U=torch.randn(M, 1, generator=g, dtype=torch.float64),
                                              V=torch.randn(1, N, generator=g, dtype=torch.float64)))
    run_federated(FedConfig(**_cfg(rule, rounds=2)), init=init, local_train=train, progress=False,
                  on_round_start=lambda t, s: globals_.append(s), **kw)
    for t, start in starts:
        g = globals_[t]
        assert list(start) == ["head", "w"] and torch.equal(start["head"], g["head"])
        if rule == "flora":  # a fresh adapter (B = 0) on the merged base
            assert torch.equal(start["w"].effective_delta(), g["w"].effective_delta())
            continue
        torch.testing.assert_close(start["w"].effective_delta(), g["w"].effective_delta(), rtol=0, atol=0)
        assert (start["w"].base is None) == (g["w"].base is None)
    if rule == "fedex":
        assert all(s["w"].base is not None for t, s in starts if t == 1)


def test_flora_draws_a_fresh_adapter_per_client_round_and_matrix():
    seen = {}
    honest = make_local_train(DATA)
    g = torch.Generator().manual_seed(1)
    base = lambda: LowRank(U=torch.randn(M, 1, generator=g, dtype=torch.float64),  # noqa: E731
                           V=torch.randn(1, N, generator=g, dtype=torch.float64))
    init = {"w": GlobalMatrix(base=base()), "v": GlobalMatrix(base=base())}

    def train(task):
        for name in ("w", "v"):
            seen[(task.round, task.client, name)] = task.start[name].lora.A
        res = honest(task)
        return ClientResult(params={"w": res.params["w"], "v": task.start["v"].lora}, num_samples=1)

    run_federated(FedConfig(**_cfg("flora", rounds=2)), init=init, local_train=train, progress=False,
                  client_ranks=[R] * 4, client_scales=[1.0] * 4)
    keys = list(seen)
    assert len(keys) == 16
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(seen[a], seen[b]), (a, b)


def test_the_seeded_draws_are_pinned():
    """Sampling, each client-round's seed and the clients' views derive from (seed, purpose, round, client,
    name); a changed derivation changes every committed result on rerun, so the draws are pinned here."""
    cfg = FedConfig(rule="flora", rounds=3, num_clients=20, clients_per_round=0.25, seed=11)
    assert [sample_clients(cfg, t) for t in range(3)] == PINNED_SAMPLES
    state = {"w": GlobalMatrix(base=LowRank(U=torch.ones(M, 1, dtype=torch.float64),
                                            V=torch.ones(1, N, dtype=torch.float64)))}
    task = make_task(get_rule("flora"), cfg, state, client=3, round_=2, rank=R, scale=1.0, local={})
    assert task.seed == PINNED_TASK_SEED and (task.client, task.round, task.trains) == (3, 2, "AB")
    assert float(task.start["w"].lora.A.sum()) == pytest.approx(PINNED_VIEW_SUM, rel=1e-12)


PINNED_SAMPLES = [[1, 4, 5, 9, 12], [5, 7, 10, 11, 12], [1, 2, 4, 5, 12]]
PINNED_TASK_SEED = 9090172275114063385
PINNED_VIEW_SUM = -0.9735853210892174


def test_a_task_names_the_local_optimizer_its_rule_needs_and_an_empty_local_state_first():
    cfg = FedConfig(rule="full-galore", rounds=1, num_clients=2)
    tasks = []
    honest = make_local_train(DATA)

    def train(task):
        tasks.append(task)
        return honest(task)

    run_federated(cfg, init=init_state("full"), local_train=train, progress=False,
                  local_optimizers=("default", "galore"))
    assert [t.local_optimizer for t in tasks] == ["galore", "galore"]
    assert all(t.local == {} and hasattr(t.local, "get") for t in tasks)


# --- uploads ---------------------------------------------------------------------------------------

def test_a_client_sending_unknown_names_is_refused_naming_them():
    honest = make_local_train(DATA)

    def train(task):
        res = honest(task)
        if task.client == 1:
            return ClientResult(params={**res.params, "typo": torch.zeros(2)}, num_samples=1)
        if task.client == 2:
            return ClientResult(params={"typo": torch.zeros(2)}, num_samples=1)
        return res

    res = run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=train, progress=False,
                        on_bad_update="drop")
    rej = {r["client"]: r["error"] for r in res.history[0]["rejected"]}
    assert set(rej) == {1, 2} and res.history[0]["clients"] == [0, 3]
    tail = "; local_train must return exactly the names of the global state"
    assert rej[1] == "client 1 sent unknown names ['typo']" + tail
    assert rej[2] == "client 2 sent no update for ['w'] and unknown names ['typo']" + tail
    init = {**init_state("fedavg"), "head": torch.zeros(HEAD, dtype=torch.float64)}
    with_head = _head_train(honest)
    no_head_0 = lambda task: honest(task) if task.client == 0 else with_head(task)  # noqa: E731
    res = run_federated(FedConfig(**_cfg()), init=init, local_train=no_head_0, progress=False, on_bad_update="drop")
    assert res.history[0]["rejected"] == [{"client": 0, "error": "client 0 sent no update for ['head']" + tail}]
    with pytest.raises(UpdateError, match="client 1 sent unknown names") as err:
        run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=train, progress=False)
    assert err.value.client == 1


def test_a_full_weight_client_may_send_its_weight_as_a_tensor_or_as_a_matrix():
    honest = make_local_train(DATA)
    as_matrix = lambda task: dataclasses_replace(  # noqa: E731
        honest(task), params={"w": GlobalMatrix(W=honest(task).params["w"])})
    a = run_federated(FedConfig(**_cfg("full")), init=init_state("full"), local_train=honest, progress=False)
    b = run_federated(FedConfig(**_cfg("full")), init=init_state("full"), local_train=as_matrix, progress=False)
    assert torch.equal(a.state["w"].W, b.state["w"].W)


def test_a_tensor_sent_for_an_adapted_matrix_is_refused_naming_the_matrix_and_what_was_sent():
    honest = make_local_train(DATA)
    bad = lambda task: dataclasses_replace(honest(task), params={"w": torch.zeros(M, N, dtype=torch.float64)})  # noqa
    with pytest.raises(UpdateError, match="w: client 0 sent a Tensor, expected LoRAFactors") as err:
        run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=bad, progress=False)
    assert err.value.client == 0


def test_a_bad_head_or_adapter_is_blamed_on_its_client_by_id_and_by_name():
    honest = make_local_train(DATA)

    def train(task):
        res = honest(task)
        head = task.start["head"] + (float("nan") if task.client == 2 else 1.0)
        f = res.params["w"]
        w = LoRAFactors(A=f.A * float("inf"), B=f.B, scale=f.scale) if task.client == 3 else f
        return ClientResult(params={"w": w, "head": head}, num_samples=res.num_samples)

    init = {**init_state("fedavg"), "head": torch.zeros(HEAD, dtype=torch.float64)}
    res = run_federated(FedConfig(**_cfg()), init=init, local_train=train, progress=False, on_bad_update="drop")
    rej = {r["client"]: r["error"] for r in res.history[0]["rejected"]}
    assert set(rej) == {2, 3} and res.history[0]["clients"] == [0, 1]
    assert rej[2].startswith("head: client 2") and rej[3].startswith("w: client 3")


def test_a_round_with_every_client_rejected_fails_and_says_so():
    honest = make_local_train(DATA)
    bad = lambda task: dataclasses_replace(honest(task), num_samples=-1)  # noqa: E731
    with pytest.raises(UpdateError, match=r"round 0: no client update was accepted \(4 rejected\)"):
        run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=bad, progress=False,
                      on_bad_update="drop")


def test_bad_loop_arguments_are_refused_saying_what_to_pass():
    honest = make_local_train(DATA)
    with pytest.raises(ConfigError, match="on_bad_update='skip'; use 'raise' or 'drop'"):
        run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=honest, on_bad_update="skip")
    with pytest.raises(ConfigError, match="client_ranks has 3 entries for 4 clients"):
        run_federated(FedConfig(**_cfg("flexlora")), init=init_state("flexlora"), local_train=honest,
                      client_ranks=[R] * 3)


# --- the averaging error, the server -----------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_the_averaging_error_is_recorded_by_default_and_only_then(rule):
    honest = make_local_train(DATA)
    on = run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=honest, progress=False)
    err = on.history[0]["averaging_error"]
    assert err["update"] > 0 and (err["relative"] < 1e-7) == get_rule(rule).exact
    off = run_federated(FedConfig(**_cfg(rule)), init=init_state(rule), local_train=honest, progress=False,
                        averaging_error=False)
    assert off.history[0]["averaging_error"] is None
    torch.testing.assert_close(on.state["w"].effective_delta(), off.state["w"].effective_delta(), rtol=0, atol=0)
    server = RoundServer(get_rule(rule), init_state(rule), FedConfig(**_cfg(rule)), 0, "raise", None, None,
                         fold=get_rule(rule).linear)  # the Flower strategy's use: tracked unless switched off
    for c in range(2):
        server.add(c, honest(make_task(get_rule(rule), FedConfig(**_cfg(rule)), init_state(rule), client=c, round_=0,
                                       rank=None, scale=None, local={})))
    server.finish()
    assert server.averaging_error is not None and server.averaging_error["update"] > 0


def _server_round(rule, clients, corrupt=None, on_bad="drop", part="w"):
    """One collecting RoundServer round of ``clients`` (a batched tier's path); ``corrupt`` = a client whose
    tier overwrites its returned tensor (``part``: the adapter's A, the full W or the head) with NaN after the
    server took it, as a tier reusing its buffers would: the server only sees it when it aggregates."""
    cfg, r = FedConfig(**_cfg(rule)), get_rule(rule)
    state = {**init_state(rule), "head": torch.zeros(HEAD, dtype=torch.float64)}
    train = _head_train(make_local_train(DATA))
    server = RoundServer(r, state, cfg, 0, on_bad, None, None, fold=False)
    for c in clients:
        res = train(make_task(r, cfg, state, client=c, round_=0, rank=None, scale=None, local={}))
        assert server.add(c, res)
        if c == corrupt:
            t = res.params[part]
            (t.A if isinstance(t, LoRAFactors) else t).fill_(float("nan"))
    return server


@pytest.mark.parametrize("rule,part", [("fedex", "w"), ("fedex", "head"), ("full", "w")])
def test_a_client_failing_at_aggregation_is_dropped_and_the_round_is_the_round_without_it(rule, part):
    server = _server_round(rule, [1, 2, 3, 0], corrupt=2, part=part)  # ids are not positions
    new, aggs = server.finish()
    clean = _server_round(rule, [1, 3, 0])
    new2, _ = clean.finish()
    assert [r["client"] for r in server.rejected] == [2] and "NaN/Inf" in server.rejected[0]["error"]
    assert server.rejected[0]["error"].startswith(f"{part}: client 2")
    assert server.kept == [1, 3, 0] and server.weights == clean.weights and server.uplink == clean.uplink
    assert len(server.metrics) == len(server.uploads) == 3
    for name in ("w", "head"):
        a, b = new[name], new2[name]
        a, b = (a, b) if isinstance(a, torch.Tensor) else (a.effective_delta(), b.effective_delta())
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if rule == "full":  # the dropped client's W is inside the float64 sum already: no error rather than a wrong one
        assert server.averaging_error is None and clean.averaging_error is not None
    else:
        assert server.averaging_error == pytest.approx(clean.averaging_error, rel=1e-12)
    with pytest.raises(UpdateError) as err:  # under "raise" it stops the round, naming the client
        _server_round(rule, [0, 1, 2], corrupt=1, on_bad="raise", part=part).finish()
    assert err.value.client == 1
    with pytest.raises(UpdateError) as err:  # the last client left is not dropped: the round fails
        _server_round(rule, [1], corrupt=1, part=part).finish()
    assert err.value.client == 1


def test_half_precision_uploads_are_summed_in_float32_and_the_state_keeps_its_dtype():
    """bfloat16 adapters and head under a folding rule: the global is the float32 weighted mean rounded
    once to bfloat16, and stays bfloat16 (a float32 global would refuse the next round's uploads)."""
    g = torch.Generator().manual_seed(7)
    K = 8
    ups = [(torch.randn(R, N, generator=g), torch.randn(M, R, generator=g), torch.randn(HEAD, generator=g))
           for _ in range(K)]
    n = [40 + 3 * k for k in range(K)]
    bf = torch.bfloat16

    def train(task):
        A, B, h = ups[task.client]
        return ClientResult(params={"w": LoRAFactors(A=A.to(bf), B=B.to(bf), scale=1.0), "head": h.to(bf)},
                            num_samples=n[task.client])

    cfg = FedConfig(rule="fedavg", rounds=2, num_clients=K, seed=0)
    res = run_federated(cfg, init=_head_first("fedavg", dtype=bf), local_train=train, progress=False)
    assert res.state["head"].dtype == bf and res.state["w"].lora.A.dtype == bf and len(res.history) == 2
    collected = run_federated(cfg, init=_head_first("fedavg", dtype=bf), local_train=train, progress=False,
                              local_train_batch=lambda tasks: [train(t) for t in tasks])  # no fold
    assert collected.state["head"].dtype == bf and len(collected.history) == 2

    def mean(i):
        return (sum(nk * u[i].to(bf).double() for nk, u in zip(n, ups)) / sum(n)).to(bf)

    assert torch.equal(res.state["w"].lora.A, mean(0)) and torch.equal(res.state["w"].lora.B, mean(1))
    assert torch.equal(res.state["head"], mean(2))


# --- the trainers ----------------------------------------------------------------------------------

def _refuse(task):
    raise AssertionError("local_train called although local_train_batch was given")


@pytest.mark.parametrize("rule", ["fedavg", "fedex"])
def test_a_batched_trainer_gets_every_client_of_a_round_in_one_call(rule):
    honest = make_local_train(DATA)
    calls = []

    def batch(tasks):
        calls.append([t.client for t in tasks])
        return [honest(t) for t in tasks]

    got = run_federated(FedConfig(**_cfg(rule, rounds=2)), init=init_state(rule), local_train=_refuse,
                        local_train_batch=batch, progress=False)
    ref = run_federated(FedConfig(**_cfg(rule, rounds=2)), init=init_state(rule), local_train=honest, progress=False)
    assert calls == [[0, 1, 2, 3], [0, 1, 2, 3]]
    torch.testing.assert_close(got.state["w"].effective_delta(), ref.state["w"].effective_delta(), rtol=1e-12, atol=1e-14)


def test_a_chained_rule_calls_the_batched_trainer_one_client_at_a_time():
    honest = make_local_train(DATA)
    calls = []

    def batch(tasks):
        calls.append([t.client for t in tasks])
        return [honest(t) for t in tasks]

    got = run_federated(FedConfig(**_cfg("rolora-chain")), init=init_state("rolora-chain"), local_train=_refuse,
                        local_train_batch=batch, progress=False)
    ref = run_federated(FedConfig(**_cfg("rolora-chain")), init=init_state("rolora-chain"), local_train=honest,
                        progress=False)
    assert calls == [[0], [1], [2], [3]]
    assert torch.equal(got.state["w"].effective_delta(), ref.state["w"].effective_delta())


def test_a_rejected_client_keeps_no_local_state():
    honest = make_local_train(DATA)

    def train(task):
        res = honest(task)
        n = -1 if task.client == 2 else res.num_samples
        return ClientResult(params=res.params, num_samples=n, local={"seen": torch.ones(1)})

    res = run_federated(FedConfig(**_cfg()), init=init_state("fedavg"), local_train=train, progress=False,
                        on_bad_update="drop")
    assert sorted(res.client_state) == [0, 1, 3]


# --- the schedule, the hooks -------------------------------------------------------------------------

def test_evaluation_checkpoints_sampling_and_the_round_hook_follow_the_schedule(tmp_path):
    cfg = FedConfig(rule="fedavg", rounds=5, num_clients=4, clients_per_round=2, eval_every=3, checkpoint_every=3,
                    seed=2)
    evals, starts = [], []
    honest = make_local_train(DATA)

    def evaluate(t, state):
        evals.append(t)
        return make_evaluate(DATA)(t, state)

    def on_round_start(t, state):
        starts.append((t, state["w"].effective_delta().clone()))

    res = run_federated(cfg, init=init_state("fedavg"), local_train=honest, evaluate=evaluate, progress=False,
                        on_round_start=on_round_start, checkpoint_dir=tmp_path / "a" / "b")
    assert evals == [2, 4] and [("eval" in h) for h in res.history] == [False, False, True, False, True]
    assert [h["clients"] for h in res.history] == [sample_clients(cfg, t) for t in range(5)]
    assert [t for t, _ in starts] == [0, 1, 2, 3, 4]
    assert torch.equal(starts[0][1], init_state("fedavg")["w"].effective_delta())
    assert json.loads((tmp_path / "a" / "b" / "checkpoint.json").read_text())["round_done"] == 4
    part = run_federated(cfg, init=init_state("fedavg"), local_train=honest, progress=False,
                         checkpoint_dir=tmp_path / "c", stop_after=4)
    assert isinstance(part, loop_mod.RunResult) and len(part.history) == 4
    assert json.loads((tmp_path / "c" / "checkpoint.json").read_text())["round_done"] == 2  # every 3rd round


def test_a_progress_bar_changes_nothing():
    honest = make_local_train(DATA)
    a = run_federated(FedConfig(**_cfg(rounds=2)), init=init_state("fedavg"), local_train=honest, progress=True)
    b = run_federated(FedConfig(**_cfg(rounds=2)), init=init_state("fedavg"), local_train=honest, progress=False)
    assert len(a.history) == 2 and torch.equal(a.state["w"].effective_delta(), b.state["w"].effective_delta())


# --- resume ----------------------------------------------------------------------------------------

def test_a_checkpoint_directory_is_resumed_only_when_asked(tmp_path):
    honest = make_local_train(DATA)
    cfg = FedConfig(**_cfg(rounds=3))
    run_federated(cfg, init=init_state("fedavg"), local_train=honest, progress=False, checkpoint_dir=tmp_path,
                  stop_after=2)
    rounds = []
    counted = lambda task: rounds.append(task.round) or honest(task)  # noqa: E731
    fresh = run_federated(cfg, init=init_state("fedavg"), local_train=counted, progress=False, checkpoint_dir=tmp_path)
    assert [h["round"] for h in fresh.history] == [0, 1, 2] and sorted(set(rounds)) == [0, 1, 2]  # started over
    rounds.clear()
    whole = run_federated(cfg, init=init_state("fedavg"), local_train=counted, progress=False, resume=True)
    assert [h["round"] for h in whole.history] == [0, 1, 2]  # resume without a directory: nothing to resume
    assert sorted(set(rounds)) == [0, 1, 2]


def test_resume_checks_the_fingerprint_naming_every_changed_key(tmp_path):
    honest = make_local_train(DATA)
    cfg = FedConfig(**_cfg(rounds=3))
    fp = {"lr": 0.1, "data": "abc", "model": {"hidden": 8}}
    run = lambda d, **kw: run_federated(cfg, init=init_state("fedavg"), local_train=honest, progress=False,  # noqa
                                        checkpoint_dir=d, **kw)
    run(tmp_path, stop_after=1, fingerprint=fp, run_info={"note": "x"})
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    assert info["fingerprint"] == fp and info["note"] == "x" and info["seed"] == 5
    with pytest.raises(ConfigError) as err:
        run(tmp_path, resume=True, fingerprint={**fp, "lr": 0.2, "model": {"hidden": 16}})
    msg = str(err.value)
    assert "written with other settings (lr: 0.1 -> 0.2; model.hidden: 8 -> 16)" in msg
    assert "resume with the same settings" in msg
    resumed = run(tmp_path, resume=True, fingerprint=dict(fp))
    assert [h["round"] for h in resumed.history] == [0, 1, 2]
    run(tmp_path / "old", stop_after=1)  # a checkpoint written without a fingerprint
    with pytest.raises(ConfigError, match=r"\(the checkpoint records no fingerprint\)"):
        run(tmp_path / "old", resume=True, fingerprint=fp)
    assert len(run(tmp_path / "old", resume=True).history) == 3  # no fingerprint asked: the config check alone


# --- checkpoint ------------------------------------------------------------------------------------

def test_client_local_names_may_contain_the_separator_and_ids_come_back_as_ints(tmp_path):
    state = {"w": GlobalMatrix(lora=LoRAFactors(A=torch.ones(1, 2), B=torch.ones(2, 1), scale=0.5))}
    local = {12: {"head::bias": torch.arange(3.0), "head": torch.ones(2)}}
    save_checkpoint(tmp_path / "new" / "dir", state=state, round_done=0, info={}, client_state=local)
    _, info = load_checkpoint(tmp_path / "new" / "dir")
    assert set(info["client_state"]) == {12} and set(info["client_state"][12]) == {"head::bias", "head"}
    assert torch.equal(info["client_state"][12]["head::bias"], torch.arange(3.0))


def test_a_key_added_or_removed_with_the_value_none_is_a_difference():
    from fedlora.checkpoint import fingerprint_diff

    assert fingerprint_diff({}, {"max_rows": None}) == ["max_rows: '(absent)' -> None"]
    assert fingerprint_diff({"max_rows": None}, {}) == ["max_rows: None -> '(absent)'"]
