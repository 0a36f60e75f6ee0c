"""The round loop: independent client copies, RoLoRA chaining, byte accounting, resume, bad clients."""
from __future__ import annotations

import json

import pytest
import torch

from fedlora import ClientUpdate, LoRAFactors, UpdateError, get_rule, rule_names
from fedlora.config import ConfigError, FedConfig, from_mapping, load_toml
from fedlora.loop import ClientResult, run_federated, sample_clients

from linear_tier import M, N, R, init_state, make_clients, make_evaluate, make_local_train

DATA = make_clients(4)


def _run(rule, rounds=4, **kw):
    cfg = FedConfig(rule=rule, rounds=rounds, num_clients=4, clients_per_round=kw.pop("cpr", 1.0), seed=3)
    if rule == "full-galore":  # this test tier's SGD stands in for GaLore: declared, so the loop accepts it
        kw.setdefault("local_optimizers", ("default", "galore"))
    ranks = [2, 1, 2, 1] if rule in ("flexlora", "flora") else None
    scales = [1.0] * 4 if ranks else None
    return run_federated(cfg, init=init_state(rule), local_train=make_local_train(DATA), evaluate=make_evaluate(DATA),
                         client_ranks=ranks, client_scales=scales, progress=False, **kw)


@pytest.mark.parametrize("rule", [r for r in rule_names() if r != "head-only"])  # no head in the linear tier
def test_every_rule_lowers_the_loss_in_a_short_run(rule):
    res = _run(rule, rounds=6)
    first, last = res.history[0]["eval"]["loss"], res.history[-1]["eval"]["loss"]
    assert last < first, (rule, first, last)


def test_a_rule_needing_an_undeclared_local_optimizer_is_refused():
    cfg = FedConfig(rule="full-galore", rounds=1, num_clients=2)
    with pytest.raises(ConfigError, match="needs the local optimizer 'galore'"):
        run_federated(cfg, init=init_state("full"), local_train=make_local_train(DATA), progress=False)


def test_same_command_same_numbers():
    a, b = _run("fedex"), _run("fedex")
    assert [h["eval"] for h in a.history] == [h["eval"] for h in b.history]


def test_bytes_follow_what_was_sent():
    s = 8  # float64
    h = _run("rolora").history
    assert h[0]["trains"] == "B" and h[1]["trains"] == "A"
    assert set(h[0]["uplink_bytes"].values()) == {M * R * s} and set(h[1]["uplink_bytes"].values()) == {R * N * s}
    assert set(h[0]["downlink_bytes"].values()) == {M * R * s}
    ffa = _run("ffa").history
    assert all(set(r["uplink_bytes"].values()) == {M * R * s} for r in ffa)  # A never sent
    fedavg = _run("fedavg").history
    assert set(fedavg[0]["uplink_bytes"].values()) == {R * (M + N) * s}
    fedex = _run("fedex").history[0]
    assert fedex["total_downlink_bytes"] > fedavg[0]["total_downlink_bytes"]  # the residual is counted
    flex = _run("flexlora").history[0]
    assert flex["uplink_bytes"] == {"0": 2 * (M + N) * s, "1": 1 * (M + N) * s, "2": 2 * (M + N) * s, "3": 1 * (M + N) * s}
    assert flex["downlink_bytes"] == flex["uplink_bytes"]
    # FLoRA's downlink is the whole stack, Σ r_k (m + n), and grows with the clients in the round
    fl4 = _run("flora").history[0]
    fl2 = _run("flora", cpr=2).history[0]
    assert set(fl4["downlink_bytes"].values()) == {6 * (M + N) * s}
    assert max(fl2["downlink_bytes"].values()) < 6 * (M + N) * s
    full = _run("full").history[0]
    assert set(full["uplink_bytes"].values()) == {M * N * s}


def test_rolora_chain_differs_from_independent_clients():
    ind, chain = _run("rolora"), _run("rolora-chain")
    assert ind.history[0]["eval"] != chain.history[0]["eval"]


@pytest.mark.parametrize("rule", ["fedavg-chain", "ffa-chain", "rolora-chain"])
def test_a_chained_client_starts_from_the_previous_clients_trained_factors(rule):
    """The released RoLoRA code's shared model: client k's start is client k−1's result in the trained
    factors; the frozen factor stays the global's (FFA's A, RoLoRA's other factor)."""
    seen: dict[int, list] = {0: [], 1: []}  # round -> [(start, end)] in client order
    honest = make_local_train(DATA)

    def local_train(task):
        res = honest(task)
        seen[task.round].append((task.start["w"].lora, res.params["w"]))
        return res

    run_federated(FedConfig(rule=rule, rounds=2, num_clients=4, seed=0), init=init_state(rule),
                  local_train=local_train, progress=False)
    for t, pairs in seen.items():
        trains, first = get_rule(rule).trains(t), pairs[0][0]
        for (start, _), (_, prev_end) in zip(pairs[1:], pairs[:-1]):
            for f in "AB":
                if f in trains:  # a real chain: the previous client's result, away from the round's global
                    assert torch.equal(getattr(start, f), getattr(prev_end, f)), (rule, t, f)
                    assert not torch.equal(getattr(start, f), getattr(first, f)), (rule, t, f)
                else:
                    assert torch.equal(getattr(start, f), getattr(first, f)), (rule, t, f)


def test_clients_start_from_independent_copies():
    seen = []

    def local_train(task):
        lora = task.start["w"].lora
        seen.append(lora.B.clone())
        lora.B.add_(1.0)  # a careless client mutating its start in place must not leak to the next
        return ClientResult(params={"w": LoRAFactors(A=lora.A, B=lora.B, scale=lora.scale)}, num_samples=1)

    cfg = FedConfig(rule="rolora", rounds=1, num_clients=3, seed=0)
    run_federated(cfg, init=init_state("rolora"), local_train=local_train, progress=False)
    assert all(torch.equal(s, seen[0]) for s in seen)


def test_client_sampling_is_seeded_and_sized():
    cfg = FedConfig(rule="fedavg", rounds=5, num_clients=20, clients_per_round=0.25, seed=11)
    draws = [sample_clients(cfg, t) for t in range(5)]
    assert all(len(d) == 5 and len(set(d)) == 5 for d in draws)
    assert draws == [sample_clients(cfg, t) for t in range(5)]
    assert len({tuple(d) for d in draws}) > 1
    assert len(sample_clients(FedConfig(rule="fedavg", num_clients=20, clients_per_round=3), 0)) == 3


@pytest.mark.parametrize("rule", ["fedex", "rolora", "flora", "full"])
def test_resume_reaches_the_same_final_numbers(rule, tmp_path):
    whole = _run(rule, rounds=5)
    _run(rule, rounds=5, checkpoint_dir=tmp_path, stop_after=2)  # interrupted after 2 rounds
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    assert info["round_done"] == 1 and len(info["history"]) == 2
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))  # safetensors + JSON only
    resumed = _run(rule, rounds=5, checkpoint_dir=tmp_path, resume=True)
    assert [h["eval"] for h in resumed.history] == [h["eval"] for h in whole.history]
    assert torch.equal(resumed.state["w"].effective_delta(), whole.state["w"].effective_delta())


def test_resume_restores_global_generators_a_tier_may_use(tmp_path):
    """A tier drawing from torch's global RNG (dropout, say) still resumes to the same numbers."""
    honest = make_local_train(DATA)

    def noisy(task):
        res = honest(task)
        f = res.params["w"]
        return ClientResult(params={"w": LoRAFactors(A=f.A + 0.01 * torch.randn(f.A.shape, dtype=f.A.dtype), B=f.B,
                                                     scale=f.scale)}, num_samples=res.num_samples)

    cfg = FedConfig(rule="fedavg", rounds=4, num_clients=3, seed=0)
    torch.manual_seed(123)
    whole = run_federated(cfg, init=init_state("fedavg"), local_train=noisy, progress=False)
    torch.manual_seed(123)
    run_federated(cfg, init=init_state("fedavg"), local_train=noisy, checkpoint_dir=tmp_path, stop_after=2, progress=False)
    torch.manual_seed(999)  # whatever happened in between
    resumed = run_federated(cfg, init=init_state("fedavg"), local_train=noisy, checkpoint_dir=tmp_path, resume=True,
                            progress=False)
    assert torch.equal(resumed.state["w"].effective_delta(), whole.state["w"].effective_delta())


def test_resume_refuses_a_different_config(tmp_path):
    _run("fedavg", rounds=3, checkpoint_dir=tmp_path, stop_after=1)
    with pytest.raises(ConfigError, match="resume with the same config"):
        _run("fedex", rounds=3, checkpoint_dir=tmp_path, resume=True)


def _poisoned(bad_client, rule="fedavg"):
    honest = make_local_train(DATA)

    def local_train(task):
        res = honest(task)
        if task.client == bad_client:
            f = res.params["w"]
            return ClientResult(params={"w": LoRAFactors(A=f.A * float("nan"), B=f.B, scale=f.scale)},
                                num_samples=res.num_samples)
        return res

    return local_train


def test_a_nan_client_stops_the_run_by_default_and_the_state_is_untouched():
    cfg = FedConfig(rule="fedavg", rounds=2, num_clients=4, seed=0)
    init = init_state("fedavg")
    before = init["w"].effective_delta().clone()
    with pytest.raises(UpdateError, match="client 2 .*NaN/Inf"):
        run_federated(cfg, init=init, local_train=_poisoned(2), progress=False)
    assert torch.equal(init["w"].effective_delta(), before)


def test_a_nan_client_can_be_dropped_and_is_recorded():
    cfg = FedConfig(rule="fedavg", rounds=2, num_clients=4, seed=0)
    res = run_federated(cfg, init=init_state("fedavg"), local_train=_poisoned(2), on_bad_update="drop", progress=False)
    assert res.history[0]["clients"] == [0, 1, 3]
    assert res.history[0]["rejected"][0]["client"] == 2 and "NaN/Inf" in res.history[0]["rejected"][0]["error"]
    assert torch.isfinite(res.state["w"].effective_delta()).all()


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown FedConfig keys \['rouns'\]"):
        from_mapping(FedConfig, {"rouns": 3})
    with pytest.raises(ConfigError, match="choose one of"):
        FedConfig(rule="fedprox")
    with pytest.raises(ConfigError, match="fraction in"):
        FedConfig(clients_per_round=0)
    p = tmp_path / "exp.toml"
    p.write_text('[fed]\nrule = "rolora"\nrounds = 7\n')
    cfg = load_toml(FedConfig, p, section="fed", seed=5)
    assert (cfg.rule, cfg.rounds, cfg.seed) == ("rolora", 7, 5)
