"""Slow, obviously correct dense references for the factored fast paths (tests and benchmark only).

They form the m × n products, as the published implementations do. Never the default.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors, LowRank
from ..linalg import dense_svd
from .registry import Aggregated, RoundContext


def weighted_product_dense(updates: Sequence[ClientUpdate], p: Tensor) -> Tensor:
    """``Σ p_k s_k B_k A_k`` as a dense m × n matrix."""
    out = None
    for u, pk in zip(updates, p):
        term = float(pk) * u.scale * (u.B @ u.A)  # (m, n)
        out = term if out is None else out + term
    return out


def fedex_dense(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """FedEx-LoRA with the residual formed densely: ``R = s Σ p_k B_k A_k − s B̄ Ā`` (m × n)."""
    s = state.lora.scale
    A = sum(float(pk) * u.A for u, pk in zip(updates, p))
    B = sum(float(pk) * u.B for u, pk in zip(updates, p))
    R = weighted_product_dense(updates, p) - s * (B @ A)  # (m, n)
    base_dense = R if state.base is None else state.base.dense() + R
    eye = torch.eye(R.shape[1], dtype=R.dtype, device=R.device)  # base kept as (dense) @ I to fit LowRank
    new = state.replace(lora=LoRAFactors(A=A, B=B, scale=s), base=LowRank(U=base_dense, V=eye))
    return Aggregated(state=new, broadcast={"A": A, "B": B, "residual": R})


def flexlora_dense(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """FlexLoRA as published: full SVD of the dense ``Σ p_k s_k B_k A_k``, kept at rank Σ r_k."""
    M = weighted_product_dense(updates, p)  # (m, n)
    U, S, Vt = dense_svd(M)
    q = min(sum(u.A.shape[0] for u in updates), S.numel())
    dt = updates[0].B.dtype
    lora = LoRAFactors(A=Vt[:q].to(dt), B=(U[:, :q] * S[:q]).to(dt), scale=1.0)
    return Aggregated(state=state.replace(lora=lora), broadcast={"A": lora.A, "B": lora.B})


REFERENCES = {"fedex": fedex_dense, "flexlora": flexlora_dense}
