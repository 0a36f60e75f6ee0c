"""DP-SGD in the MNIST toy: the batched engine's hand-written per-sample clipping and noise equal
Opacus's (the reference engine) to float64 round-off, the accountant keeps every client at or below
its target, and the DP path without noise or clipping is the plain run."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora import get_rule
from fedlora.config import ConfigError
from fedlora.dp import plan
from fedlora.loop import ClientTask, client_view
from fedlora.seeding import derive_seed
from mnist_toy.config import ToyConfig
from mnist_toy.engine import train_batched, train_reference
from mnist_toy.model import NAME, build_toy, init_state
from mnist_toy.run import run

from test_mnist_toy import mnist  # noqa: F401  (the session's real-MNIST fixture)

SMALL = dict(train_subset=3000, val_size=300, test_subset=500, rank=4, hidden=16, rounds=2, local_steps=3,
             batch_size=32, lr=0.1, clients=5, labels_per_client=2, dtype="float64")


def _val_losses(rec):
    return [r["val_loss"] for r in rec["rounds"]]


@pytest.mark.parametrize("method", ["fedavg", "ffa", "rolora", "fedex", "full"])
def test_batched_per_sample_clipping_and_noise_equal_opacus(mnist, method):  # noqa: F811
    """Clipped and noised: the batched engine (norms as products of norms, no per-sample gradients
    formed) and Opacus's GradSampleModule + DPOptimizer agree on every round of the run."""
    for eps, clip in ((math.inf, 0.3), (2.0, 1.0)):
        cfg = ToyConfig(method=method, dp_epsilon=eps, dp_max_grad_norm=clip, **SMALL)
        fast = run(cfg, data=mnist, progress=False)
        ref = run(dataclasses.replace(cfg, engine="reference"), data=mnist, progress=False)
        assert _val_losses(fast) == pytest.approx(_val_losses(ref), rel=1e-10, abs=1e-12)
        plain = run(dataclasses.replace(cfg, dp_epsilon=None), data=mnist, progress=False)
        assert _val_losses(fast) != pytest.approx(_val_losses(plain), rel=1e-6)  # DP changed something


@pytest.mark.parametrize("method", ["fedavg", "rolora", "full"])
def test_dp_path_without_noise_or_clipping_is_the_plain_run(mnist, method):  # noqa: F811
    cfg = ToyConfig(method=method, **SMALL)
    plain = run(cfg, data=mnist, progress=False)
    dp = run(dataclasses.replace(cfg, dp_epsilon=math.inf, dp_max_grad_norm=None, dp_sampling="shuffle"), data=mnist,
             progress=False)
    assert _val_losses(dp) == pytest.approx(_val_losses(plain), rel=1e-12, abs=1e-14)
    assert dp["final_test_accuracy"] == plain["final_test_accuracy"]
    assert dp["dp"]["epsilon_spent_max"] == math.inf and plain["dp"] is None


def _one_round(cfg, mnist, method, round_=0):  # noqa: F811
    toy = build_toy(cfg, mnist)
    rule = get_rule(method)
    state = init_state(cfg, toy)
    tasks = [ClientTask(client=c, round=round_, trains=rule.trains(round_), seed=derive_seed(5, c, round_),
                        start=client_view(rule, state, client=c, round_=round_, seed=5, rank=cfg.rank, scale=cfg.scale))
             for c in range(len(toy.sizes))]
    return toy, tasks


def test_noise_std_is_sigma_times_c_over_the_batch(mnist):  # noqa: F811
    """One SGD step of ``full``: noisy minus noise-free update = lr · N(0, (σC)²) / batch, per coordinate."""
    cfg = ToyConfig(method="full", dp_epsilon=1.0, dp_max_grad_norm=2.0, **{**SMALL, "local_steps": 1, "rounds": 1})
    toy, tasks = _one_round(cfg, mnist, "full")
    noisy = train_batched(tasks, toy, cfg)
    sigma = [p.noise_multiplier for p in toy.dp]
    toy.dp = [dataclasses.replace(p, noise_multiplier=0.0) for p in toy.dp]
    clean = train_batched(tasks, toy, cfg)
    for k, (a, b) in enumerate(zip(noisy, clean)):
        d = (a.params[NAME] - b.params[NAME]) * cfg.batch_size / cfg.lr  # (h, 784) = 12,544 draws
        assert abs(float(d.mean())) < 4 * sigma[k] * 2.0 / math.sqrt(d.numel())
        assert float(d.std()) == pytest.approx(sigma[k] * 2.0, rel=0.04)


@pytest.mark.parametrize("method, round_, frozen", [("rolora", 0, "A"), ("rolora", 1, "B"), ("ffa", 0, "A"),
                                                   ("ffa", 1, "A")])
def test_only_the_trained_factor_moves_under_dp(mnist, method, round_, frozen):  # noqa: F811
    cfg = ToyConfig(method=method, dp_epsilon=1.0, dp_max_grad_norm=1.0, **SMALL)
    toy, tasks = _one_round(cfg, mnist, method, round_)
    for t, res in zip(tasks, train_batched(tasks, toy, cfg)):
        assert torch.equal(getattr(res.params[NAME], frozen), getattr(t.start[NAME].lora, frozen))
        moved = "B" if frozen == "A" else "A"
        assert not torch.equal(getattr(res.params[NAME], moved), getattr(t.start[NAME].lora, moved))
    ref = train_reference(tasks[0], toy, cfg)
    assert torch.equal(getattr(ref.params[NAME], frozen), getattr(tasks[0].start[NAME].lora, frozen))


def test_every_client_spends_at_most_its_target(mnist):  # noqa: F811
    recs = {eps: run(ToyConfig(method="rolora", dp_epsilon=eps, dp_max_grad_norm=1.0, **SMALL), data=mnist,
                     progress=False) for eps in (8.0, 1.0)}
    for eps, rec in recs.items():
        steps = SMALL["rounds"] * SMALL["local_steps"]
        for c in rec["dp"]["clients"]:
            assert c["steps"] == steps and c["sample_rate"] == pytest.approx(SMALL["batch_size"] / c["samples"])
            assert 0.9 * eps <= c["epsilon_spent"] <= eps
        assert rec["dp"]["epsilon_spent_max"] <= eps
    s8 = [c["noise_multiplier"] for c in recs[8.0]["dp"]["clients"]]
    s1 = [c["noise_multiplier"] for c in recs[1.0]["dp"]["clients"]]
    assert all(a < b for a, b in zip(s8, s1))


def test_accountant_plan_matches_opacus_and_rounds_the_rate_up():
    from opacus.accountants import RDPAccountant

    p = plan(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, batch_size=64, samples=5321, steps=500)
    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, 64 / 5321, 500)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(p.spent(), rel=1e-9)
    assert 2.95 <= p.spent() <= 3.0  # q rounded up to 3 significant figures costs at most ≈1% of ε
    assert plan(epsilon=None, delta=1e-5, max_grad_norm=None, batch_size=64, samples=100, steps=5).noise_multiplier == 0


@pytest.mark.parametrize("fields, match", [
    (dict(dp_epsilon=3.0, dp_max_grad_norm=None), "dp_max_grad_norm"),
    (dict(dp_epsilon=0.0), "dp_epsilon"),
    (dict(dp_epsilon=3.0, local_epochs=1), "local_steps"),
    (dict(dp_epsilon=3.0, dp_sampling="uniform"), "poisson or shuffle"),
])
def test_bad_dp_configs_name_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        ToyConfig(method="fedavg", **{**SMALL, **fields})


def test_a_client_smaller_than_the_batch_is_refused(mnist):  # noqa: F811
    cfg = ToyConfig(method="fedavg", dp_epsilon=3.0, **{**SMALL, "batch_size": 4096})
    with pytest.raises(ConfigError, match="at least as many samples as the batch"):
        build_toy(cfg, mnist)
