"""Sample-level DP-SGD in the LLM tier (``llm_scale.private`` through Opacus, ``fedlora.dp`` for the
accounting) on tiny random models: the ε each client spends, the plain run recovered at ε = ∞ without
clipping, per-sample clipping and the noise against hand computations, only the trained parameters
noised, determinism and resume, and the refusals."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.config import ConfigError  # noqa: E402
from fedlora.dp import DPPlan, clip_factors  # noqa: E402
from fedlora.loop import ClientTask  # noqa: E402
from llm_scale.config import load_config  # noqa: E402
from llm_scale.engine import Federation  # noqa: E402
from llm_scale.private import dp_sgd  # noqa: E402
from llm_scale.run import run  # noqa: E402

from test_llm_scale import _run, word_table  # noqa: E402


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A learnable two-class CSV whose label words tokenize to different lengths, so that the causal
    path's per-sample mean token loss differs from a token mean over the batch."""
    return word_table(tmp_path_factory.mktemp("dpdata") / "toy.csv", labels=("bad", "quite wonderfully good"))

def _cfg(table, **kw):
    base = dict(model="tiny-roberta", task="table", data_path=str(table), method="fedavg", clients=3, rounds=2,
                local_steps=2, batch_size=4, lr=5e-3, rank=4, test_fraction=0.25, targets=("query", "value"),
                layers=(1,), seed=1)  # layers=(1,): the frozen-layer cache is on, as in the sweeps
    base.update(kw)
    return load_config(None, **base)


@pytest.fixture(scope="module")
def fed(table):
    return Federation(_cfg(table, dp_epsilon=3.0))


def _factors(state):
    return {n: (g.lora.A.clone(), g.lora.B.clone()) for n, g in state.items() if hasattr(g, "lora")}


def _random_state(fed, seed=0):
    """The init with non-zero B, so every trained parameter has a gradient."""
    state = fed.init_state()
    g = torch.Generator().manual_seed(seed)
    for name in fed.bridge.names:
        lora = state[name].lora
        lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.3)
    return state


# ---- accounting ----------------------------------------------------------------------------------
def test_each_client_spends_at_most_its_target_and_sigma_grows_as_epsilon_shrinks(fed, table):
    cfg = _cfg(table, dp_epsilon=3.0)
    rec = run(cfg, federation=fed.reconfigure(cfg), progress=False)
    dp = rec["dp"]
    assert rec["dp_epsilon"] == 3.0 and dp["epsilon_target"] == 3.0 and dp["sampling"] == "poisson"
    assert [c["client"] for c in dp["clients"]] == [0, 1, 2]
    for c in dp["clients"]:
        assert c["steps"] == cfg.rounds * cfg.local_steps == fed.dp_steps[c["client"]]
        assert c["sample_rate"] == pytest.approx(cfg.batch_size / c["samples"])
        assert 0.9 * 3.0 < c["epsilon_spent"] <= 3.0  # every step was taken: the budget is used, not exceeded
    assert dp["epsilon_spent_max"] == max(c["epsilon_spent"] for c in dp["clients"])
    # two of three clients a round: σ is still planned for every round, so a client spends less
    part = _cfg(table, dp_epsilon=3.0, clients_per_round=2, rounds=3)
    rec = run(part, federation=fed.reconfigure(part), progress=False)
    taken = {c: sum(c in r["clients"] for r in rec["rounds"]) for c in range(3)}
    assert min(taken.values()) < 3
    for c in rec["dp"]["clients"]:
        assert c["steps"] == taken[c["client"]] * part.local_steps and c["epsilon_spent"] <= 3.0
        if c["steps"] < part.rounds * part.local_steps:
            assert c["epsilon_spent"] < 0.9 * 3.0
    sigmas = []
    for eps in (8.0, 3.0, 1.0):
        fed.reconfigure(_cfg(table, dp_epsilon=eps))
        sigmas.append(fed.dp_plans[0].noise_multiplier)
    assert 0 < sigmas[0] < sigmas[1] < sigmas[2]
    plain = _cfg(table)
    assert fed.reconfigure(plain).dp_plans is None and run(plain, federation=fed, progress=False)["dp"] is None


# ---- ε = ∞, no clipping, the plain batches: the plain run --------------------------------------------
@pytest.mark.parametrize("method", ["fedavg", "rolora"])
def test_dp_path_without_noise_or_clipping_reproduces_the_plain_run(fed, table, method):
    plain = _run(fed.reconfigure(_cfg(table, method=method)))
    fed.reconfigure(_cfg(table, method=method, dp_epsilon=math.inf, dp_max_grad_norm=math.inf, dp_sampling="shuffle"))
    private = _run(fed)
    assert fed.dp_steps == [4, 4, 4]  # the DP path ran
    pairs = [(x, y) for n, (A, B) in _factors(plain.state).items() for x, y in zip((A, B), _factors(private.state)[n])]
    pairs += [(plain.state[k], private.state[k]) for k in ("classifier.dense.weight", "classifier.out_proj.weight")]
    for x, y in pairs:  # float tolerance: a sum of per-sample gradients is the batch gradient up to rounding
        assert float((x - y).abs().max()) <= 1e-5 * float(x.abs().max())
    assert private.history[-1]["eval"]["test_accuracy"] == plain.history[-1]["eval"]["test_accuracy"]
    assert private.history[-1]["eval"]["test_loss"] == pytest.approx(plain.history[-1]["eval"]["test_loss"], rel=1e-5)


# ---- the DP-SGD step against hand computations ---------------------------------------------------------
def _no_dropout(model):
    """Dropout off (Opacus needs train mode): a sample's gradient alone then equals its gradient in a batch."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    return saved


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-llama"])
def test_clipped_sum_equals_the_hand_computation(fed, table, model):
    """One step of SGD(lr=1) without noise moves the parameters by −Σ_i clip_i g_i / batch_size, with
    g_i each sample's own gradient (its loss alone, by autograd) and clip_i = min(1, C/(‖g_i‖+1e-6)).
    The causal path (tiny-llama scoring label words of 1 and 3 tokens) checks the per-sample mean loss."""
    f = fed if model == "tiny-roberta" else Federation(_cfg(table, model=model, kind="causal",
                                                            targets=("q_proj", "v_proj"), dp_epsilon=3.0))
    saved = _no_dropout(f.model)
    try:
        state = _random_state(f)
        params = f.bridge.load(state, trains="AB")
        f.model.train()
        rows = f.parts[0][:5]
        grads = []
        for r in rows:  # each sample alone, no hooks
            g = torch.autograd.grad(f.loss("train", np.array([r]), per_sample=True), params)
            grads.append(torch.cat([x.flatten() for x in g]))
        grads = torch.stack(grads)  # (5, P)
        norms = grads.norm(dim=1)
        C = float(norms.min() + norms.max()) / 2  # some samples clipped, some not
        assert (norms > C).any() and (norms < C).any()
        want = (clip_factors(norms, C)[:, None] * grads).sum(0) / 4  # expected batch 4, a batch of 5 drawn
        before = torch.cat([p.detach().flatten() for p in params])
        plan = DPPlan(epsilon=math.inf, delta=1e-5, max_grad_norm=C, noise_multiplier=0.0, sample_rate=0.1, steps=1)
        with dp_sgd(f.model, torch.optim.SGD(params, lr=1.0), plan, batch_size=4, seed=0) as opt:
            f.loss("train", rows, per_sample=True).backward()
            opt.step()
        got = before - torch.cat([p.detach().flatten() for p in params])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in f.model.parameters())
    finally:
        for m, p in saved:
            m.p = p
        for p in params:
            p.requires_grad_(False)


def test_noise_has_std_sigma_c_and_comes_from_the_seed(fed):
    """(noised − noise-free update) · batch / lr over every trained coordinate is N(0, (σC)²)."""
    state = _random_state(fed)
    rows = fed.parts[0][:4]
    sigma, C, lr, b = 40.0, 3.0, 1e-2, 4

    def step(noise_multiplier, seed):
        params = fed.bridge.load(state, trains="AB")
        before = torch.cat([p.detach().flatten() for p in params])
        plan = DPPlan(epsilon=1.0, delta=1e-5, max_grad_norm=C, noise_multiplier=noise_multiplier, sample_rate=0.1,
                      steps=1)
        torch.manual_seed(0)  # the same dropout masks in every call
        fed.model.train()
        with dp_sgd(fed.model, torch.optim.SGD(params, lr=lr), plan, batch_size=b, seed=seed) as opt:
            fed.loss("train", rows, per_sample=True).backward()
            opt.step()
        out = torch.cat([p.detach().flatten() for p in params]) - before
        for p in params:
            p.requires_grad_(False)
        return out

    clean = step(0.0, 7)
    noise = (step(sigma, 7) - clean) * b / -lr
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.06)
    assert abs(float(noise.mean())) < 4 * sigma * C / noise.numel() ** 0.5
    assert torch.equal(step(sigma, 7), step(sigma, 7))  # the noise generator is seeded
    assert not torch.equal(step(sigma, 7), step(sigma, 8))


# ---- what is noised --------------------------------------------------------------------------------
def _task(fed, state, trains, seed=11):
    return ClientTask(client=0, round=0, start=state, trains=trains, seed=seed)


def test_only_what_trains_moves_under_heavy_noise(fed, table):
    """RoLoRA's B-round leaves A bit-identical (and its A-round B); FFA never moves A; a frozen head gets
    no noise, a trained one does. σ is huge, so any noise on a parameter would show."""
    fed.reconfigure(_cfg(table, method="rolora", dp_epsilon=0.2))
    assert fed.dp_plans[0].noise_multiplier > 5
    state = _random_state(fed)
    head0 = {k: v.clone() for k, v in fed.bridge.head_params().items()}
    for trains, fixed in (("B", 0), ("A", 1)):
        res = fed.local_train(_task(fed, state, trains))
        for name in fed.bridge.names:
            f = res.params[name]
            assert torch.equal((f.A, f.B)[fixed], _factors(state)[name][fixed])
            assert not torch.equal((f.A, f.B)[1 - fixed], _factors(state)[name][1 - fixed])
        assert all(not torch.equal(res.params[k], state[k]) for k in head0)  # the federated head trains: noised
    fed.bridge.head_mode = "frozen"  # the bridge decides what trains: a frozen head gets no hooks, no noise
    try:
        fed.local_train(_task(fed, state, "AB"))
        assert all(torch.equal(p, fed.bridge.initial_head[k]) for k, p in fed.bridge.head_params().items())
    finally:
        fed.bridge.head_mode = "federated"
    cfg = _cfg(table, method="ffa", dp_epsilon=0.2)
    init = _factors(fed.reconfigure(cfg).init_state())
    final = _factors(_run(fed).state)
    assert all(torch.equal(final[n][0], init[n][0]) and not torch.equal(final[n][1], init[n][1]) for n in init)


# ---- determinism, empty batches, resume ----------------------------------------------------------------
def test_same_seed_same_bits_other_seed_other_bits_and_empty_batches_are_noise_steps(fed, table):
    fed.reconfigure(_cfg(table, dp_epsilon=3.0, batch_size=1, local_steps=12))  # q = 1/30: empty batches
    state = fed.init_state()
    a, b, c = (fed.local_train(_task(fed, state, "AB", seed=s)) for s in (5, 5, 6))
    for name in fed.bridge.names:
        assert torch.equal(a.params[name].B, b.params[name].B) and not torch.equal(a.params[name].B, c.params[name].B)
    batches = fed._batches(_task(fed, state, "AB", seed=5), fed.parts[0])
    assert len(batches) == 12 and any(len(x) == 0 for x in batches)


def test_a_resumed_dp_run_equals_the_uninterrupted_one(fed, table, tmp_path):
    cfg = _cfg(table, method="rolora", dp_epsilon=3.0, rounds=3)
    whole = run(cfg, federation=fed.reconfigure(cfg), progress=False)
    run(cfg, federation=fed.reconfigure(cfg), checkpoint_dir=tmp_path, stop_after=1, progress=False)
    resumed = run(cfg, federation=fed.reconfigure(cfg), checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed["final_test_accuracy"] == whole["final_test_accuracy"]
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in whole["rounds"]]
    assert resumed["dp"] == whole["dp"]  # steps counted from the history, the rounds before the stop included


# ---- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, fix", [
    (dict(dp_epsilon=3.0, dp_max_grad_norm=math.inf), "set dp_max_grad_norm"),
    (dict(dp_epsilon=0.0), "must be a number > 0"),
    (dict(dp_epsilon=3.0, dp_delta=1.0), r"must be in \(0, 1\)"),
    (dict(dp_epsilon=3.0, dp_max_grad_norm=-1.0), "must be > 0"),
    (dict(dp_epsilon=3.0, dp_sampling="bernoulli"), "use 'poisson'"),
])
def test_bad_dp_settings_are_refused_with_the_fix(table, kw, fix):
    with pytest.raises(ConfigError, match=fix):
        _cfg(table, **kw)
    with pytest.raises(ConfigError, match="set dp_max_grad_norm"):  # None (no clipping) is only settable in code
        dataclasses.replace(_cfg(table), dp_epsilon=1.0, dp_max_grad_norm=None)


def test_a_client_smaller_than_the_batch_is_refused(fed, table):
    with pytest.raises(ConfigError, match="at least as many samples as the batch size"):
        fed.reconfigure(_cfg(table, dp_epsilon=3.0, clients=20, batch_size=8))  # 4-5 rows a client
    fed.reconfigure(_cfg(table, dp_epsilon=3.0))


def test_cli_sets_dp_and_refuses_with_the_fix(capsys, tmp_path):
    from llm_scale.__main__ import main

    cfg = load_config("cpu-minilm-tweets", dp_epsilon=float("inf"))
    assert cfg.dp_epsilon == math.inf
    assert main(["--config", "cpu-minilm-tweets", "--set", "dp_epsilon=3", "--set", "dp_max_grad_norm=inf",
                 "--out", str(tmp_path)]) == 2
    assert "set dp_max_grad_norm" in capsys.readouterr().err
