"""Closed forms of linear_theory.predictions against population simulations run through the core's
rules (1e-8 relative), over non-square shapes, ranks, client counts, seeds and step sizes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from fedlora import GlobalMatrix, RoundContext, aggregate, init_lora
from fedlora.seeding import generator
from linear_theory import predictions as P
from linear_theory.analyses import _one_step_autograd, _ffa_run, rank1_instance, simulate_rolora_rank1
from linear_theory.model import dtype, heterogeneous_targets, population, random_covariances, sample
from linear_theory.simulate import LocalSpec, effective_weight, lora_state, run_federated

EXACT = 1e-8
# m ≠ n always: a transposed term hides on square shapes.
shapes = st.tuples(st.integers(3, 9), st.integers(3, 9)).filter(lambda mn: mn[0] != mn[1])
seeds = st.integers(0, 2 ** 31 - 1)


def _spectrum(q: int) -> list[float]:
    return [0.5 ** j for j in range(q)]  # σ_{j+1}/σ_j = 1/2: the rank-r floor is unique, ALS converges fast


@settings(max_examples=30, deadline=None)
@given(mn=shapes, K=st.integers(1, 4), seed=seeds, c=st.floats(0.05, 1.9), theta0=st.floats(0.1, 1.5),
       scale=st.sampled_from([0.5, 1.0, 4.0]))
def test_rolora_angle_recursion_matches_population(mn, K, seed, c, theta0, scale):
    m, n = mn
    inst = rank1_instance(m=m, n=n, theta0=theta0, b_norm=1.5, seed=seed)
    pop = population(inst.W_star.expand(K, m, n).clone())
    sim = simulate_rolora_rank1(pop, inst, eta=c / 1.5 ** 2, rounds=6, scale=scale)
    pred = P.rolora_angle_trajectory(theta0, c, 6)
    for s_, p_ in zip(sim, pred):
        if p_ > 1e-6:  # below, θ is at float64 round-off
            assert math.tan(s_) == pytest.approx(math.tan(p_), rel=EXACT)
        else:
            assert s_ < 1e-5


@settings(max_examples=30, deadline=None)
@given(mn=shapes, seed=seeds, c=st.floats(0.01, 1.0), theta0=st.floats(0.05, 1.55))
def test_rolora_bound_holds_for_c_at_most_one(mn, seed, c, theta0):
    m, n = mn
    inst = rank1_instance(m=m, n=n, theta0=theta0, b_norm=1.0, seed=seed)
    th = simulate_rolora_rank1(population(inst.W_star[None]), inst, eta=c, rounds=6)
    q = P.rolora_bound_factor(theta0, c)
    for a, b in zip(th, th[1:]):
        assert math.sin(b) <= math.sin(a) * q * (1 + 1e-12) + 1e-15


def test_rolora_bound_counterexample_and_domain():
    from linear_theory.analyses import rolora_bound_counterexample
    ce = rolora_bound_counterexample()
    assert ce["violated"] and ce["max_ratio"] > ce["q"]
    with pytest.raises(ValueError, match="c cos²θ0 ≤ 1"):
        P.rolora_bound_factor(0.1, 1.5)


@settings(max_examples=20, deadline=None)
@given(mn=shapes, K=st.integers(1, 5), r=st.integers(1, 3), seed=seeds, h=st.floats(0.0, 2.0),
       tau=st.integers(1, 5))
def test_ffa_reaches_exactly_its_floor(mn, K, r, seed, h, tau):
    m, n = mn
    assume(r < min(m, n))
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=h, generator=generator(seed, "t"))
    pop = population(Ws)
    A0 = init_lora(m, n, r, scale=1.0, generator=generator(seed, "A0"), dtype=dtype).A
    kappa = float(torch.linalg.cond(A0 @ A0.T))
    assume(kappa < 1e3)  # GD needs ~30 κ steps; a near-singular random A0 is a slow case, not a wrong one
    losses = _ffa_run(pop, A0, rounds=None, tau=tau)
    assert losses[-1] == pytest.approx(P.ffa_floor(Ws, pop.p, A0), rel=EXACT)


def test_ffa_rank1_floor_is_the_general_floor():
    inst = rank1_instance(m=6, n=4, theta0=0.7, b_norm=3.0, seed=3)
    Ws = inst.W_star[None]
    general = P.ffa_floor(Ws, torch.ones(1, dtype=dtype), inst.a0[None, :])
    assert P.ffa_floor_rank1(inst.b_star, 0.7) == pytest.approx(general, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(mn=shapes, K=st.integers(1, 4), r=st.integers(1, 3), seed=seeds, h=st.floats(0.0, 2.0),
       N=st.integers(2, 30))
def test_ffa_never_beats_its_floor(mn, K, r, seed, h, N):
    """Whatever the data FFA trains on (few samples, Σ_k ≠ I), the isotropic population loss of
    every iterate stays at or above the floor: the floor is a minimum over B."""
    m, n = mn
    assume(r < min(m, n))
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=h, generator=generator(seed, "t"))
    pop = population(Ws)
    covs = random_covariances(n=n, K=K, eig_range=(0.2, 3.0), generator=generator(seed, "c"))
    fs = sample(Ws, n_samples=[N] * K, covs=covs, generator=generator(seed, "s"))
    A0 = init_lora(m, n, r, scale=1.0, generator=generator(seed, "A0"), dtype=dtype).A
    floor = P.ffa_floor(Ws, pop.p, A0)
    losses = _ffa_run(fs, A0, rounds=15, tau=3, evaluate=pop)
    assert min(losses) >= floor * (1 - 1e-12)


@settings(max_examples=20, deadline=None)
@given(mn=shapes, K=st.integers(1, 4), r=st.integers(1, 3), seed=seeds, h=st.floats(0.0, 2.0))
def test_rolora_reaches_the_rank_floor_from_generic_init(mn, K, r, seed, h):
    """Federated RoLoRA with least-squares steps is alternating least squares on W̄* (isotropic
    inputs make the client solutions average to the global one): it reaches Eckart–Young."""
    m, n = mn
    assume(r < min(m, n))
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=h, generator=generator(seed, "t"))
    pop = population(Ws)
    floor, _ = P.rank_floor(Ws, pop.p, r)
    init = GlobalMatrix(lora=init_lora(m, n, r, scale=2.0, generator=generator(seed, "i"), dtype=dtype))
    tr = run_federated(pop, "rolora", init, rounds=80, local=LocalSpec(solver="ls"))
    assert tr.losses[-1] == pytest.approx(floor, rel=EXACT)
    assert min(tr.losses) >= floor * (1 - 1e-12)  # and, being rank r, never below it


@settings(max_examples=5, deadline=None)
@given(seed=seeds, h=st.floats(0.25, 1.5))
def test_fedavg_with_local_steps_stays_above_the_floor(seed, h):
    m, n, K, r = 7, 5, 3, 2
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(5), h=h, generator=generator(seed, "t"))
    pop = population(Ws)
    floor, _ = P.rank_floor(Ws, pop.p, r)
    init = GlobalMatrix(lora=init_lora(m, n, r, scale=1.0, generator=generator(seed, "i"), dtype=dtype))
    tr = run_federated(pop, "fedavg", init, rounds=100, local=LocalSpec(steps=10, lr=0.3))
    assert tr.losses[-1] > floor * (1 + 1e-6)


@settings(max_examples=30, deadline=None)
@given(mn=shapes, K=st.integers(1, 5), r=st.integers(1, 3), seed=seeds, h=st.floats(0.0, 2.0),
       eta=st.floats(1e-3, 1.0), N=st.one_of(st.none(), st.integers(2, 40)), scale=st.floats(0.25, 4.0))
def test_fedavg_inexactness_identity(mn, K, r, seed, h, eta, N, scale):
    m, n = mn
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=h, generator=generator(seed, "t"))
    prob = population(Ws) if N is None else sample(Ws, n_samples=[N + k for k in range(K)], generator=generator(seed, "s"))
    g = generator(seed, "AB")
    A = torch.randn(r, n, generator=g, dtype=dtype)
    B = torch.randn(m, r, generator=g, dtype=dtype)
    updates = [_one_step_autograd(prob, k, A, B, scale, eta) for k in range(K)]
    out = aggregate("fedavg", lora_state(A, B, scale), updates, prob.p, ctx=RoundContext(round=0)).state.lora
    measured = sum(float(prob.p[k]) * updates[k].B @ updates[k].A for k in range(K)) - out.B @ out.A
    gB, gA = P.lora_gradients(prob, A, B, scale)
    predicted = P.fedavg_inexactness(prob.p, gA, gB, eta)
    tol = EXACT * max(float(predicted.norm()), eta ** 2 * float(gB.norm() * gA.norm()))
    assert float((measured - predicted).norm()) <= tol
    if K == 1 or (h == 0 and N is None):  # identical clients: no averaging error at all
        assert float(predicted.norm()) <= 1e-12 * (1 + eta ** 2 * float(gB.norm() * gA.norm()))


@settings(max_examples=30, deadline=None)
@given(mn=shapes, K=st.integers(1, 4), r=st.integers(1, 3), seed=seeds, scale=st.floats(0.25, 4.0))
def test_lora_gradients_match_autograd(mn, K, r, seed, scale):
    m, n = mn
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=1.0, generator=generator(seed, "t"))
    covs = random_covariances(n=n, K=K, eig_range=(0.5, 2.0), generator=generator(seed, "c"))
    prob = population(Ws, covs=covs)
    g = generator(seed, "AB")
    A, B = torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype)
    gB, gA = P.lora_gradients(prob, A, B, scale)
    for k in range(K):
        A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        prob.client_loss(k, scale * B_ @ A_).backward()
        torch.testing.assert_close(gA[k], A_.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gB[k], B_.grad, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(mn=shapes, K=st.integers(1, 4), seed=seeds, tau=st.integers(1, 6), eta=st.floats(0.05, 0.8),
       finite=st.booleans())
def test_client_drift_fixed_point(mn, K, seed, tau, eta, finite):
    m, n = mn
    Ws = heterogeneous_targets(m=m, n=n, K=K, spectrum=_spectrum(min(m, n)), h=1.0, generator=generator(seed, "t"))
    covs = random_covariances(n=n, K=K, eig_range=(0.3, 2.0), generator=generator(seed, "c"))
    prob = (sample(Ws, n_samples=[4 * n] * K, covs=covs, generator=generator(seed, "s")) if finite
            else population(Ws, covs=covs))
    lam = torch.linalg.eigvalsh(prob.H)
    assume(float(lam.max()) * eta < 1.9 and float(lam.min()) > 0.02)  # contraction, invertible M̄
    fp = P.client_drift_fixed_point(prob.W_star, prob.H, prob.p, eta, tau)
    # Run until the contraction factor ρ(N̄)^t is below 1e-12 instead of a fixed count.
    eye = torch.eye(n, dtype=dtype)
    Nbar = torch.einsum("k,kij->ij", prob.p, torch.linalg.matrix_power(eye - eta * prob.H, tau))
    rho = float(torch.linalg.eigvals(Nbar).abs().max())
    rounds = int(math.ceil(math.log(1e-13) / math.log(max(rho, 1e-3)))) + 5
    assume(rounds < 3000)
    tr = run_federated(prob, "full", GlobalMatrix(W=torch.zeros(m, n, dtype=dtype)), rounds=rounds,
                       local=LocalSpec(steps=tau, lr=eta))
    W = effective_weight(tr.state)
    assert float((W - fp).norm()) <= EXACT * float(fp.norm())
    opt = P.weighted_optimum(prob.W_star, prob.H, prob.p)
    if tau == 1 or K == 1:
        assert float((fp - opt).norm()) <= 1e-9 * float(opt.norm())
