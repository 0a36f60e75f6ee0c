"""FedEx-LoRA: FedAvg of the factors plus the averaging residual folded into the frozen weight
(Singhal et al., 2024, arXiv:2410.09432)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor
import torch

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors, LowRank
from ..linalg import compress, merge_into_base, weighted_sum
from .registry import Aggregated, RoundContext, Rule, register


def fedex_residual(updates: Sequence[ClientUpdate], p: Tensor, scale: float, A_bar: Tensor, B_bar: Tensor,
                   *, recompress: Optional[bool] = None) -> LowRank:
    """``R = s (Σ p_k B_k A_k − B̄ Ā) = s Σ p_k (B_k − B̄)(A_k − Ā)``, kept factored.

    ``U = [s p_1 (B_1 − B̄) … s p_K (B_K − B̄)]`` (m × Kr), ``V = [A_1 − Ā; …; A_K − Ā]`` (Kr × n), so
    rank ≤ K r (in fact ≤ (K − 1) r, since Σ p_k (A_k − Ā) = 0). With ``recompress``
    it is re-factored by QR + SVD at its numerical rank (exact to float tolerance). By default that
    is done when K r ≤ min(m, n) / 4: above it the SVD of the (K r)² core costs as much as the dense
    path, and random clients leave nothing to drop.
    Call ``.dense()`` on the result to materialise the m × n residual.
    """
    U = torch.cat([(u.B - B_bar) * (scale * float(pk)) for u, pk in zip(updates, p)], dim=1)  # (m, K r)
    V = torch.cat([u.A - A_bar for u in updates], dim=0)  # (K r, n)
    if recompress is None:
        recompress = U.shape[1] <= min(U.shape[0], V.shape[1]) // 4
    if recompress:
        U, V = compress(U, V)
    return LowRank(U=U, V=V)


def fedex(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``, ``W0 ← W0 + s (Σ p_k B_k A_k − B̄ Ā)``: exact.

    The frozen-weight correction accumulates in ``state.base`` (factored and re-compressed while that
    is smaller than m × n, dense after: ``fedlora.linalg.merge_into_base``); the
    broadcast carries this round's residual factors, never a dense m × n matrix.
    """
    s = state.lora.scale
    A = weighted_sum([u.A for u in updates], p)  # (r, n)
    B = weighted_sum([u.B for u in updates], p)  # (m, r)
    R = fedex_residual(updates, p, s, A, B)
    # the first residual is kept as fedex_residual left it; later ones are concatenated, re-compressed
    # to their numerical rank, and held dense once that is smaller (the base must not grow without bound)
    base = merge_into_base(state.base, R, recompress=state.base is not None)
    new = GlobalMatrix(lora=LoRAFactors(A=A, B=B, scale=s), base=base, W=state.W)
    return Aggregated(state=new, broadcast={"A": A, "B": B, "residual_U": R.U, "residual_V": R.V})


register(Rule(name="fedex", aggregate=fedex, trains=lambda t: "AB", exact=True,
              paper="Singhal et al. 2024, FedEx-LoRA (arXiv:2410.09432)"))
