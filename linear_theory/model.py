"""The linear data model shared by every analysis.

Client k has inputs ``X_k`` (N_k × n, rows i.i.d. N(0, Σ_k)) and noiseless targets
``Y_k = X_k W*_kᵀ`` (N_k × m); the learner fits a weight ``W`` (m × n, out × in). Its loss is

    L_k(W) = (1 / 2N_k) ‖Y_k − X_k Wᵀ‖_F² = ½ tr((W − W*_k) H_k (W − W*_k)ᵀ),

with ``H_k = X_kᵀ X_k / N_k`` (the empirical covariance, n × n). The population limit replaces
``H_k`` by ``Σ_k`` (``I`` unless heterogeneous inputs are asked for), which gives the SPEC's
``L(W) = ½ Σ_k p_k ‖W*_k − W‖_F²``. A client only ever uses its sufficient statistics
``H_k`` and ``C_k = Y_kᵀ X_k / N_k`` (m × n): its gradient is ``∇L_k(W) = W H_k − C_k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import math

import torch
from torch import Tensor

__all__ = ["LinearProblem", "population", "sample", "heterogeneous_targets", "random_covariances",
           "orthonormal", "angle", "dtype"]

dtype = torch.float64  # every analysis runs in float64 so that 1e-8 relative checks are meaningful


@dataclass(frozen=True)
class LinearProblem:
    """K clients of the linear model, by their sufficient statistics."""

    W_star: Tensor  # (K, m, n) client targets W*_k
    H: Tensor  # (K, n, n) input second moments: Σ_k (population) or X_kᵀX_k/N_k (finite sample)
    C: Tensor  # (K, m, n) cross moments: W*_k Σ_k (population) or Y_kᵀX_k/N_k (finite sample)
    p: Tensor  # (K,) client weights, Σ p_k = 1
    n_samples: Optional[tuple[int, ...]] = None  # None in the population limit

    def __post_init__(self) -> None:
        K, m, n = self.W_star.shape
        if self.H.shape != (K, n, n) or self.C.shape != (K, m, n) or self.p.shape != (K,):
            raise ValueError(f"LinearProblem needs W_star (K,m,n), H (K,n,n), C (K,m,n), p (K,); got "
                             f"{tuple(self.W_star.shape)}, {tuple(self.H.shape)}, {tuple(self.C.shape)}, "
                             f"{tuple(self.p.shape)}")

    @property
    def num_clients(self) -> int:
        return self.W_star.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W_star.shape[1:])  # type: ignore[return-value]

    @property
    def W_bar(self) -> Tensor:
        """``W̄* = Σ_k p_k W*_k`` (m × n)."""
        return torch.einsum("k,kmn->mn", self.p, self.W_star)

    def client_loss(self, k: int, W: Tensor) -> Tensor:
        """``L_k(W) = ½ tr((W − W*_k) H_k (W − W*_k)ᵀ)`` (exact for noiseless finite samples too)."""
        E = W - self.W_star[k]  # (m, n)
        return 0.5 * torch.sum((E @ self.H[k]) * E)

    def loss(self, W: Tensor) -> float:
        """``Σ_k p_k L_k(W)``."""
        return float(sum(self.p[k] * self.client_loss(k, W) for k in range(self.num_clients)))

    def grad(self, k: int, W: Tensor) -> Tensor:
        """``∇L_k(W) = W H_k − C_k`` (m × n): what client k computes from its own data."""
        return W @ self.H[k] - self.C[k]


def _weights(K: int, weights: Optional[Sequence[float]]) -> Tensor:
    w = torch.ones(K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
    if w.shape != (K,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"need {K} non-negative weights with a positive sum; got {w.tolist()}")
    return w / w.sum()


def population(W_star: Tensor, *, covs: Optional[Tensor] = None,
               weights: Optional[Sequence[float]] = None) -> LinearProblem:
    """The population limit: ``H_k = Σ_k`` (identity when ``covs`` is None), ``C_k = W*_k Σ_k``."""
    K, m, n = W_star.shape
    H = torch.eye(n, dtype=dtype).expand(K, n, n).clone() if covs is None else covs.to(dtype)
    return LinearProblem(W_star=W_star.to(dtype), H=H, C=W_star.to(dtype) @ H, p=_weights(K, weights))


def sample(W_star: Tensor, *, n_samples: Sequence[int], generator: torch.Generator,
           covs: Optional[Tensor] = None, weights: Optional[Sequence[float]] = None) -> LinearProblem:
    """Draw ``X_k`` (N_k × n, rows N(0, Σ_k)) and ``Y_k = X_k W*_kᵀ``; keep ``H_k``, ``C_k``.

    Weights default to the sample counts (the SPEC's default ``p_k ∝ N_k``).
    """
    K, m, n = W_star.shape
    if len(n_samples) != K:
        raise ValueError(f"got {len(n_samples)} sample counts for {K} clients; pass one per client")
    H, C = [], []
    for k in range(K):
        X = torch.randn(n_samples[k], n, generator=generator, dtype=dtype)  # (N_k, n)
        if covs is not None:
            X = X @ torch.linalg.cholesky(covs[k].to(dtype)).T  # rows ~ N(0, Σ_k)
        Y = X @ W_star[k].to(dtype).T  # (N_k, m)
        H.append(X.T @ X / n_samples[k])  # (n, n)
        C.append(Y.T @ X / n_samples[k])  # (m, n)
    w = n_samples if weights is None else weights
    return LinearProblem(W_star=W_star.to(dtype), H=torch.stack(H), C=torch.stack(C), p=_weights(K, w),
                         n_samples=tuple(int(x) for x in n_samples))


def orthonormal(rows: int, cols: int, *, generator: torch.Generator) -> Tensor:
    """A random ``rows × cols`` matrix with orthonormal columns (QR of a Gaussian)."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))  # (rows, cols), sign-fixed so the draw is unique


def heterogeneous_targets(*, m: int, n: int, K: int, spectrum: Sequence[float], h: float,
                          generator: torch.Generator, weights: Optional[Sequence[float]] = None) -> Tensor:
    """Targets ``W*_k = W̄ + h D_k`` with ``W̄ = U diag(σ) Vᵀ`` and ``Σ_k p_k D_k = 0``.

    ``D_k`` are Gaussian, centred under ``p`` and scaled so that ``Σ_k p_k ‖D_k‖_F² = ‖W̄‖_F²``:
    ``h`` is the relative heterogeneity, and ``W̄* = W̄`` for every ``h`` (only the heterogeneity
    term of the floors moves with ``h``). The draws do not depend on ``h``.
    """
    q = len(spectrum)
    if q > min(m, n):
        raise ValueError(f"spectrum has {q} values but a {m}×{n} matrix has at most {min(m, n)}")
    U = orthonormal(m, q, generator=generator)  # (m, q)
    V = orthonormal(n, q, generator=generator)  # (n, q)
    W_bar = (U * torch.as_tensor(spectrum, dtype=dtype)) @ V.T  # (m, n)
    p = _weights(K, weights)
    D = torch.randn(K, m, n, generator=generator, dtype=dtype)
    D = D - torch.einsum("k,kmn->mn", p, D)  # centred: Σ p_k D_k = 0
    spread = torch.sqrt(torch.einsum("k,k->", p, D.pow(2).sum((1, 2))))
    D = D * (W_bar.norm() / spread) if float(spread) > 0 else D
    return W_bar + h * D  # (K, m, n)


def random_covariances(*, n: int, K: int, eig_range: tuple[float, float],
                       generator: torch.Generator) -> Tensor:
    """``Σ_k = Q_k diag(λ_k) Q_kᵀ`` with random rotations and eigenvalues uniform in ``eig_range``."""
    lo, hi = eig_range
    out = []
    for _ in range(K):
        Q = orthonormal(n, n, generator=generator)
        lam = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=dtype)
        out.append((Q * lam) @ Q.T)
    return torch.stack(out)  # (K, n, n)


def angle(a: Tensor, a_star: Tensor) -> float:
    """Angle between the lines spanned by ``a`` and ``a*``, in [0, π/2]; accurate for tiny angles
    (atan2 of the perpendicular and parallel parts, not acos of a cosine near 1)."""
    a = a.flatten().to(dtype)
    u = a_star.flatten().to(dtype) / a_star.norm()
    along = float(a @ u)
    perp = float((a - along * u).norm())
    return math.atan2(perp, abs(along))
