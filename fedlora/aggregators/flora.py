"""FLoRA: stack the client adapters and merge the stack into the frozen weight
(Wang et al., NeurIPS 2024, arXiv:2409.05976)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LowRank, init_lora
from ..linalg import merge_into_base
from .registry import Aggregated, RoundContext, Rule, register


def flora(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``B_g = [B_1 … B_K]``, ``A_g = [p_1 s_1 A_1; …; p_K s_K A_K]`` so ``B_g A_g = Σ p_k s_k B_k A_k``.

    Every client merges ``B_g A_g`` into its frozen weight and starts a fresh adapter next round;
    the downlink (Σ r_k (m + n)) grows with K. The server's copy of the merged base is re-compressed
    (and held dense once that is smaller).
    """
    Bg = torch.cat([u.B for u in updates], dim=1)  # (m, Σr)
    Ag = torch.cat([u.A * (u.scale * float(pk)) for u, pk in zip(updates, p)], dim=0)  # (Σr, n)
    stack = LowRank(U=Bg, V=Ag)
    if state.lora is not None:  # an adapter left on the global (e.g. a warm start) is merged too
        stack = stack + LowRank(U=state.lora.B * state.lora.scale, V=state.lora.A)
    base = merge_into_base(state.base, stack)  # re-compressed; dense once factored would be larger
    return Aggregated(state=GlobalMatrix(lora=None, base=base, W=state.W), broadcast={"B_g": Bg, "A_g": Ag})


def flora_view(state: GlobalMatrix, *, rank: Optional[int], scale: Optional[float], seed: int) -> GlobalMatrix:
    """A fresh adapter (B = 0, A random from the client-round seed) on the merged base.

    With B = 0 the adapter's gradient flows only through B, via the frozen weight's activations: a
    model whose frozen weight is zero (the RoLoRA toy with W0 = 0) gets no gradient at all, so such a
    tier must start FLoRA from a non-zero base (e.g. merge the other methods' random start s B0 A0).
    """
    if rank is None or scale is None:
        raise ValueError("flora needs each client's rank and scale to start a fresh adapter")
    m, n = state.shape
    base = state.base
    if state.lora is not None:  # an adapter still on the global is part of the frozen weight from now on
        merged = LowRank(U=state.lora.B * state.lora.scale, V=state.lora.A)
        base = merged if base is None else base + merged
    dt = base.dtype if base is not None else torch.float32
    g = torch.Generator().manual_seed(seed)
    return state.replace(lora=init_lora(m, n, rank, scale=scale, generator=g, dtype=dt), base=base)


register(Rule(name="flora", aggregate=flora, trains=lambda t: "AB", exact=True, per_client_rank=True,
              client_view=flora_view, paper="Wang et al. 2024, FLoRA (arXiv:2409.05976)"))
