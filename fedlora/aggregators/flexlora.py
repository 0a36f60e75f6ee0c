"""FlexLoRA: SVD of the averaged product, redistributed at per-client ranks
(Bai et al., NeurIPS 2024, arXiv:2402.11505)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors
from ..linalg import factored_svd
from .registry import Aggregated, RoundContext, Rule, register


def flexlora(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``ΔW = Σ p_k s_k B_k A_k = U S Vᵀ`` computed on the factors (``fedlora.linalg.factored_svd``).

    The global keeps every direction (rank Σ r_k, so the global ΔW is exact); client k receives the
    best rank-r_k approximation ``B_k = U[:, :r_k] S[:r_k] / s_k``, ``A_k = Vᵀ[:r_k]``. W0 unchanged.
    """
    Bcat = torch.cat([u.B * (u.scale * float(pk)) for u, pk in zip(updates, p)], dim=1)  # (m, Σr)
    Acat = torch.cat([u.A for u in updates], dim=0)  # (Σr, n)
    L, S, Rt = factored_svd(Bcat, Acat)  # (m, q), (q,), (q, n)
    dt = updates[0].B.dtype
    lora = LoRAFactors(A=Rt.to(dt), B=(L * S).to(dt), scale=1.0)
    return Aggregated(state=GlobalMatrix(lora=lora, base=state.base, W=state.W), broadcast={"A": lora.A, "B": lora.B})


def flexlora_view(state: GlobalMatrix, *, rank: Optional[int], scale: Optional[float], seed: int) -> GlobalMatrix:
    """Client k's start: the first r_k SVD directions, rescaled to its own s_k."""
    g = state.lora
    r = g.rank if rank is None else rank
    s = g.scale if scale is None else scale
    if r > g.rank:
        raise ValueError(f"client rank {r} exceeds the global adapter's rank {g.rank}; "
                         "initialise the global at the largest client rank")
    return state.replace(lora=LoRAFactors(A=g.A[:r], B=g.B[:, :r] * (g.scale / s), scale=s))


def _flexlora_downlink(agg: Aggregated, rank: int) -> int:
    A, B = agg.state.lora.A, agg.state.lora.B
    return rank * (A.shape[1] + B.shape[0]) * A.element_size()


register(Rule(name="flexlora", aggregate=flexlora, trains=lambda t: "AB", exact=True, per_client_rank=True,
              client_view=flexlora_view, downlink_bytes=_flexlora_downlink,
              paper="Bai et al. 2024, FlexLoRA (arXiv:2402.11505)"))
