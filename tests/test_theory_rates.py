"""Finite-sample federated simulations approach the population predictions as samples per client
grow, at the stated rate: errors O(N^{-1/2}) (the empirical covariances Σ̂_k = X_kᵀX_k/N deviate
from Σ_k by O_p(N^{-1/2}) and every quantity checked is a smooth function of them)."""
from __future__ import annotations

import math

import pytest
import torch

from fedlora import GlobalMatrix
from fedlora.seeding import generator
from linear_theory import predictions as P
from linear_theory.analyses import QUICK, rank1_instance, rolora_angle, simulate_rolora_rank1
from linear_theory.model import dtype, heterogeneous_targets, population, random_covariances, sample
from linear_theory.simulate import LocalSpec, effective_weight, run_federated

SAMPLES = (50, 200, 800, 3200, 12800)


def _slope(xs, ys) -> float:
    x = torch.log(torch.tensor(xs, dtype=dtype))
    y = torch.log(torch.tensor(ys, dtype=dtype))
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_rolora_angle_finite_samples_converge_at_rate_half(seed):
    """E max_t |θ_t(N) − θ_t^pop| over the first 5 rounds falls like N^{-1/2} (slope −0.5 ± 0.15)."""
    m, n, K, c = 6, 4, 3, 0.5
    inst = rank1_instance(m=m, n=n, theta0=1.2, b_norm=2.0, seed=seed)
    Ws = inst.W_star.expand(K, m, n).clone()
    pred = P.rolora_angle_trajectory(1.2, c, 5)
    errs = []
    for N in SAMPLES:
        e = []
        for rep in range(16):
            prob = sample(Ws, n_samples=[N] * K, generator=generator(seed, "rate", N, rep))
            th = simulate_rolora_rank1(prob, inst, eta=c / 4.0, rounds=5)
            e.append(max(abs(a - b) for a, b in zip(th, pred)))
        errs.append(sum(e) / len(e))
    assert errs[-1] < errs[0] / 8  # 256× the samples: ≈ 16× smaller error
    assert _slope(SAMPLES, errs) == pytest.approx(-0.5, abs=0.15)


def test_client_drift_finite_sample_fixed_point_converges_at_rate_half():
    """The simulated fixed point on N samples per client approaches the population W_fp like N^{-1/2}."""
    m, n, K, tau, eta = 5, 4, 3, 5, 0.4
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=(1.0, 0.5, 0.25), h=1.0, generator=generator(0, "t"))
    covs = random_covariances(n=n, K=K, eig_range=(0.3, 2.0), generator=generator(0, "c"))
    fp_pop = P.client_drift_fixed_point(Ws, covs, torch.full((K,), 1.0 / K, dtype=dtype), eta, tau)
    errs = []
    for N in SAMPLES:
        e = []
        for rep in range(8):
            prob = sample(Ws, n_samples=[N] * K, covs=covs, generator=generator(0, "drift", N, rep))
            tr = run_federated(prob, "full", GlobalMatrix(W=torch.zeros(m, n, dtype=dtype)), rounds=150,
                               local=LocalSpec(steps=tau, lr=eta))
            e.append(float((effective_weight(tr.state) - fp_pop).norm() / fp_pop.norm()))
        errs.append(sum(e) / len(e))
    assert _slope(SAMPLES, errs) == pytest.approx(-0.5, abs=0.15)


def test_rolora_angle_analysis_records_the_rate():
    records, traces = rolora_angle(QUICK, seed=3)
    rate = [r for r in records if isinstance(r["samples"], list)]
    assert len(rate) == 1 and rate[0]["passed"], rate
    assert all(r["passed"] for r in records)
    assert len(traces["finite_sample"]["mean_max_error"]) == len(QUICK.samples)
