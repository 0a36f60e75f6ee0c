"""Closed-form predictions for the five analyses (SPEC, "Theory to implement").

Each function states its formula and where it comes from. None of them runs a federated round:
the simulations in ``linear_theory.simulate`` measure the same quantities through the core's rules.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from .model import LinearProblem, dtype

__all__ = ["rolora_angle_step", "rolora_angle_trajectory", "rolora_bound_factor", "heterogeneity_term",
           "ffa_floor", "ffa_floor_rank1", "rank_floor", "lora_gradients", "fedavg_inexactness",
           "client_drift_fixed_point", "weighted_optimum", "round_map"]


# ---- 1. rank-1 RoLoRA -------------------------------------------------------------------------

def rolora_angle_step(theta: float, c: float) -> float:
    """One RoLoRA round (b-step then a-step) on the rank-1 population model, exactly:

        tan θ⁺ = tan θ · |1 − c cos²θ| / (1 + c sin²θ),   c = η ‖b*‖².

    Derivation (target ``W* = b* a*ᵀ``, ‖a*‖ = ‖a‖ = 1, ``cos θ = a*ᵀa``, isotropic inputs): the
    exact least-squares b-step gives ``s b = W* a = b* cos θ``; the a-step gradient of
    ``½‖W* − s b aᵀ‖²`` is ``−‖b*‖² cos θ (a* − a cos θ)``, so after one step of size η

        a' = a* cos θ (1 + c sin²θ) + a⊥ sin θ (1 − c cos²θ),   a = a* cos θ + a⊥ sin θ,

    and normalising a' does not change its angle. This confirms the SPEC's recursion (RoLoRA,
    Chen et al. 2024, arXiv:2409.02346, linear-model theorem); θ is the angle between lines,
    so θ ∈ [0, π/2] and the absolute value covers ``c cos²θ > 1`` (overshoot past a*).
    Equivalently ``sin²θ⁺ = sin²θ (1 − c cos²θ)² / (1 + c² sin²θ cos²θ)``.
    """
    return math.atan(math.tan(theta) * abs(1.0 - c * math.cos(theta) ** 2) / (1.0 + c * math.sin(theta) ** 2))


def rolora_angle_trajectory(theta0: float, c: float, rounds: int) -> list[float]:
    """``[θ_0, θ_1, …, θ_rounds]`` under :func:`rolora_angle_step`."""
    out = [theta0]
    for _ in range(rounds):
        out.append(rolora_angle_step(out[-1], c))
    return out


def rolora_bound_factor(theta0: float, c: float) -> float:
    """The paper's contraction factor ``q = sqrt(1 − c (1 − δ0²))``, ``δ0 = sin θ0``, so that
    ``sin θ⁺ ≤ q sin θ`` every round (quoted second-hand in the SPEC).

    It is defined only for ``c cos²θ0 ≤ 1``. From the exact recursion
    ``sin²θ⁺ / sin²θ = (1 − c cos²θ)² / (1 + c² sin²θ cos²θ) ≤ 1 − c cos²θ ≤ 1 − c cos²θ0``
    whenever ``0 ≤ 1 − c cos²θ`` along the path (θ only shrinks, so cos²θ ≥ cos²θ0): ``c ≤ 1``,
    i.e. ``η ≤ 1/‖b*‖²``, is sufficient. For ``1 < c < 2`` the iteration still converges but the
    bound can fail (``analyses.rolora_bound_counterexample``).
    """
    x = 1.0 - c * math.cos(theta0) ** 2
    if x < 0:
        raise ValueError(f"the bound needs c cos²θ0 ≤ 1; got c={c}, θ0={theta0} (c cos²θ0 = {1 - x:.3f}); "
                         "take η ≤ 1/‖b*‖²")
    return math.sqrt(x)


# ---- 2./3. floors ---------------------------------------------------------------------------

def heterogeneity_term(W_star: Tensor, p: Tensor) -> float:
    """``½ Σ_k p_k ‖W*_k − W̄*‖_F²``: the loss of the best single matrix ``W̄*`` (isotropic inputs).

    ``Σ_k p_k ‖W*_k − W‖² = Σ_k p_k ‖W*_k − W̄*‖² + ‖W̄* − W‖²`` (bias–variance split), so no
    shared weight does better, whatever its rank.
    """
    W_bar = torch.einsum("k,kmn->mn", p, W_star)
    return 0.5 * float(torch.einsum("k,k->", p, (W_star - W_bar).pow(2).sum((1, 2))))


def ffa_floor(W_star: Tensor, p: Tensor, A0: Tensor) -> float:
    """FFA-LoRA floor with A frozen at ``A0`` (r × n), isotropic inputs:

        min_B ½ Σ_k p_k ‖W*_k − s B A0‖² = ½ Σ_k p_k ‖W*_k − W̄*‖² + ½ ‖W̄* (I − P)‖²,
        P = A0ᵀ (A0 A0ᵀ)⁻¹ A0   (projector onto the row space of A0, n × n).

    The bias–variance split leaves ``½‖W̄* − s B A0‖²``, a least-squares problem in B whose
    residual is the part of W̄*'s rows outside row(A0) (Sun et al. 2024, FFA-LoRA, discussed
    in RoLoRA's linear-model section).
    """
    P = A0.T @ torch.linalg.solve(A0 @ A0.T, A0)  # (n, n)
    W_bar = torch.einsum("k,kmn->mn", p, W_star)
    resid = W_bar - W_bar @ P  # (m, n)
    return heterogeneity_term(W_star, p) + 0.5 * float(resid.pow(2).sum())


def ffa_floor_rank1(b_star: Tensor, theta0: float) -> float:
    """Rank 1, homogeneous: ``½ ‖b*‖² sin²θ0`` with θ0 the angle between ``a0`` and ``a*``
    (the general floor with ``P = a0 a0ᵀ``: ``‖b* a*ᵀ (I − a0 a0ᵀ)‖² = ‖b*‖² sin²θ0``)."""
    return 0.5 * float(b_star.pow(2).sum()) * math.sin(theta0) ** 2


def rank_floor(W_star: Tensor, p: Tensor, r: int) -> tuple[float, float]:
    """Eckart–Young floor for any rank-r weight (isotropic inputs):

        min_{rank W ≤ r} ½ Σ_k p_k ‖W*_k − W‖² = ½ Σ_k p_k ‖W*_k − W̄*‖² + ½ Σ_{j>r} σ_j(W̄*)².

    Returns ``(floor, heterogeneity term)``; the latter is what an unconstrained ``W`` reaches.
    """
    het = heterogeneity_term(W_star, p)
    W_bar = torch.einsum("k,kmn->mn", p, W_star)
    sigma = torch.linalg.svdvals(W_bar)
    return het + 0.5 * float(sigma[r:].pow(2).sum()), het


# ---- 4. FedAvg inexactness ------------------------------------------------------------------

def lora_gradients(problem: LinearProblem, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Client gradients of ``L_k(s B A)``: with ``G_k = ∇L_k(W) = W H_k − C_k`` (m × n),

        g_B,k = s G_k Aᵀ  (K, m, r),     g_A,k = s Bᵀ G_k  (K, r, n)   (chain rule on W = s B A).
    """
    W = scale * B @ A  # (m, n)
    G = W @ problem.H - problem.C  # (K, m, n)
    return scale * G @ A.T, scale * B.T @ G


def fedavg_inexactness(p: Tensor, g_A: Tensor, g_B: Tensor, eta: float) -> Tensor:
    """After one local step from a common (A, B), ``A_k = A − η g_A,k``, ``B_k = B − η g_B,k``:

        Σ_k p_k B_k A_k − B̄ Ā = Σ_k p_k (B_k − B̄)(A_k − Ā) = η² Σ_k p_k (g_B,k − ḡ_B)(g_A,k − ḡ_A).

    (SPEC, "FedAvg inexactness"; the first equality is the weighted covariance identity, the second
    because the common (A, B) cancels in ``B_k − B̄``.) Zero for identical clients. Returns m × n.
    """
    dB = g_B - torch.einsum("k,kmr->mr", p, g_B)  # (K, m, r)
    dA = g_A - torch.einsum("k,krn->rn", p, g_A)  # (K, r, n)
    return eta ** 2 * torch.einsum("k,kmr,krn->mn", p, dB, dA)


# ---- 5. client drift ------------------------------------------------------------------------

def client_drift_fixed_point(W_star: Tensor, H: Tensor, p: Tensor, eta: float, tau: int) -> Tensor:
    """Fixed point of full-weight FedAvg with τ local GD steps of size η on
    ``L_k(W) = ½ tr((W − W*_k) H_k (W − W*_k)ᵀ)``.

    A client ends at ``W*_k + (W − W*_k) N_k``, ``N_k = (I − η H_k)^τ``; the server averages, so a
    fixed point solves ``Σ_k p_k (W − W*_k)(I − N_k) = 0``:

        W_fp = (Σ_k p_k W*_k M_k) (Σ_k p_k M_k)⁻¹,   M_k = I − (I − η H_k)^τ   (n × n).

    The SPEC writes ``Σ p_k (I − (I − ηH_k)^τ)(W − W*_k) = 0``, the form for a column weight;
    with W as m × n (out × in) the Hessian acts on the input side, i.e. from the right.
    (Client drift: Charles & Konečný 2021; Malinovsky et al. 2020; Pathak & Wainwright 2020.)
    For τ = 1, ``M_k = η H_k`` and W_fp is the optimum; for τ > 1 it is not, unless all H_k agree.
    """
    n = H.shape[-1]
    eye = torch.eye(n, dtype=H.dtype)
    M = eye - torch.linalg.matrix_power(eye - eta * H, tau)  # (K, n, n)
    lhs = torch.einsum("k,kmn,knj->mj", p, W_star, M)  # (m, n)
    Mbar = torch.einsum("k,knj->nj", p, M)  # (n, n)
    return torch.linalg.solve(Mbar.T, lhs.T).T  # lhs Mbar⁻¹


def weighted_optimum(W_star: Tensor, H: Tensor, p: Tensor) -> Tensor:
    """The minimiser of ``Σ_k p_k L_k``: ``W_opt = (Σ_k p_k W*_k H_k)(Σ_k p_k H_k)⁻¹``."""
    lhs = torch.einsum("k,kmn,knj->mj", p, W_star, H)
    Hbar = torch.einsum("k,knj->nj", p, H)
    return torch.linalg.solve(Hbar.T, lhs.T).T


# ---- every analysis: the server step the theory assumes -------------------------------------------

def round_map(rule: str, state, updates, p: Tensor, trains: str) -> Tensor:
    """The effective weight ``W − W0`` (m × n) that the paper's server step gives after one round,
    formed densely from what the clients sent (``ClientUpdate``\ s) and the previous global:

    - fedavg:   s (Σ p_k B_k)(Σ p_k A_k)                       (the product of the averages)
    - ffa:      s (Σ p_k B_k) A,        A the frozen global
    - rolora:   s (Σ p_k B_k) A  on B-rounds,  s B (Σ p_k A_k)  on A-rounds
    - fedex:    base + Σ p_k s B_k A_k                          (exact: the residual joins the base)
    - flexlora: Σ p_k s_k B_k A_k                               (the SVD keeps every direction)
    - flora:    base + Σ p_k s_k B_k A_k                        (the stack is merged into W0)
    - full, full-galore: Σ p_k W_k

    Every analysis checks the core's aggregate against this on every round of its runs, so a bound
    that any rank-r weight satisfies is paired with an exact check of the rule that produced it.
    """
    pw = [float(x) for x in p]
    if rule in ("full", "full-galore"):
        return sum(pk * u.W for pk, u in zip(pw, updates))
    base = state.base.dense() if state.base is not None else 0.0
    g = state.lora
    if rule in ("fedex", "flexlora", "flora"):
        prod = sum(pk * u.scale * (u.B @ u.A) for pk, u in zip(pw, updates))
        return prod if rule == "flexlora" else base + prod
    A = sum(pk * u.A for pk, u in zip(pw, updates)) if "A" in trains else g.A
    B = sum(pk * u.B for pk, u in zip(pw, updates)) if "B" in trains else g.B
    if rule not in ("fedavg", "ffa", "rolora", "rolora-chain"):
        raise ValueError(f"no round map for rule {rule!r}")
    return base + g.scale * (B @ A)
