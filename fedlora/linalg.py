"""The linear algebra of aggregation, done on the factors.

``Σ_k p_k s_k B_k A_k = B_cat @ A_cat`` with ``B_cat = [p_1 s_1 B_1 … p_K s_K B_K]`` (m × Σr) and
``A_cat = [A_1; …; A_K]`` (Σr × n). Thin QR of both sides and an SVD of the small (Σr × Σr) core give
the SVD of the m × n sum in O((m + n)(Σr)²) instead of O(m n min(m, n)).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .factors import DenseBase, LowRank

__all__ = ["weighted_sum", "factored_svd", "dense_svd", "compress", "compute_dtype", "merge_into_base", "frobenius_norm"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """QR/SVD need float32 or float64: half precision is promoted, float64 is kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(tensors: Sequence[Tensor], p: Tensor) -> Tensor:
    """``Σ_k p_k T_k`` reading every input once (no stacked copy); inputs are not modified."""
    pf = p.tolist()  # python floats: no tiny tensor ops per client
    out = torch.mul(tensors[0], pf[0])
    for k in range(1, len(tensors)):
        out.add_(tensors[k], alpha=pf[k])
    return out


def factored_svd(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``U @ V`` (U m×q, V q×n) without forming it.

    ``U = Q_u R_u``, ``Vᵀ = Q_v R_v``, ``R_u R_vᵀ = U' S V'ᵀ`` ⇒ ``U V = (Q_u U') S (Q_v V')ᵀ``.
    Returns ``(L (m×q'), S (q'), Rt (q'×n))`` with ``q' = min(q, m, n)``, singular values descending.
    """
    dt = compute_dtype(U.dtype)
    Qu, Ru = torch.linalg.qr(U.to(dt))  # (m, q'), (q', q)
    Qv, Rv = torch.linalg.qr(V.to(dt).T)  # (n, q''), (q'', q)
    Uc, S, Vct = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)  # core (q', q'')
    return Qu @ Uc, S, Vct @ Qv.T


def dense_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: thin SVD of the dense m × n matrix (what published implementations do)."""
    dt = compute_dtype(M.dtype)
    return torch.linalg.svd(M.to(dt), full_matrices=False)


def compress(U: Tensor, V: Tensor, *, rtol: Optional[float] = None, max_rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Re-factor ``U @ V`` at its numerical rank: returns ``(L S, Rt)`` with the product unchanged.

    Singular values below ``rtol · σ_max`` are dropped (default: ``max(m, n) · eps`` of the dtype,
    the usual numerical-rank threshold, so the product is kept to float tolerance). ``max_rank``
    additionally truncates (best rank-``max_rank`` approximation, Eckart–Young).
    """
    L, S, Rt = factored_svd(U, V)
    if rtol is None:
        rtol = max(U.shape[0], V.shape[1]) * torch.finfo(S.dtype).eps
    keep = int((S > rtol * (S[0] if S.numel() else 0)).sum()) if S.numel() else 0
    if max_rank is not None:
        keep = min(keep, max_rank)
    keep = max(keep, 1)  # keep a (possibly zero) direction so shapes stay valid
    return (L[:, :keep] * S[:keep]).to(U.dtype), Rt[:keep].to(V.dtype)


def merge_into_base(base: Optional[LowRank | DenseBase], delta: LowRank, *,
                    recompress: bool = True) -> LowRank | DenseBase:
    """``base + delta`` for a frozen-weight correction that grows every round (FedEx-LoRA's residuals,
    FLoRA's stacks), bounded in size.

    Factored, ``base + delta = [U_b U_d][V_b; V_d]`` is re-compressed to its numerical rank q (exact to
    float tolerance, ``compress``). Once ``q (m + n) ≥ m n`` the factors hold more numbers than the
    matrix, so the sum is returned dense (``DenseBase``) and stays dense from then on: the size is
    bounded by ``min(q (m + n), m n)`` whatever the number of rounds.
    """
    acc = delta if base is None else base + delta
    if isinstance(acc, DenseBase):
        return acc
    U, V = compress(acc.U, acc.V) if recompress else (acc.U, acc.V)
    m, n = U.shape[0], V.shape[1]
    if U.shape[1] * (m + n) >= m * n:
        return DenseBase(M=U @ V)  # (m, n)
    return LowRank(U=U, V=V)


def frobenius_norm(lowrank: Sequence[tuple[Tensor, Tensor]], dense: Sequence[Tensor] = (), *,
                   shape: tuple[int, int]) -> float:
    """``‖Σ_i U_i V_i + Σ_j D_j‖_F`` for low-rank terms ``U_i`` (m × q_i), ``V_i`` (q_i × n) and dense
    ``m × n`` terms, in float64.

    With ``U = [U_1 … U_L]`` and ``V = [V_1; …; V_L]``: ``‖U V‖_F² = tr(Uᵀ U V Vᵀ) = Σ (UᵀU) ∘ (V Vᵀ)``,
    O((m + n) q²) for q = Σ q_i, never forming the m × n sum. When dense terms are present, or the
    factors hold at least as many numbers as the matrix (q (m + n) ≥ m n), the sum is formed instead:
    it is then the smaller object.
    """
    m, n = shape
    q = sum(U.shape[1] for U, _ in lowrank)
    if not lowrank and not dense:
        return 0.0
    if dense or q * (m + n) >= m * n:
        M = torch.zeros(m, n, dtype=torch.float64)
        for D in dense:
            M.add_(D.to(torch.float64))
        for U, V in lowrank:
            M.addmm_(U.to(torch.float64), V.to(torch.float64))
        return float(torch.linalg.matrix_norm(M))
    U = torch.cat([U.to(torch.float64) for U, _ in lowrank], dim=1)  # (m, q)
    V = torch.cat([V.to(torch.float64) for _, V in lowrank], dim=0)  # (q, n)
    sq = float(((U.T @ U) * (V @ V.T)).sum())  # ‖U V‖_F²; ≥ 0 up to rounding
    return max(sq, 0.0) ** 0.5
