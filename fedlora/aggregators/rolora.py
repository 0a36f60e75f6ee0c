"""RoLoRA: alternate the trained factor by round (Chen et al., 2024, arXiv:2409.02346)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors
from ..linalg import weighted_sum
from .registry import Aggregated, RoundContext, Rule, register


def rolora_trains(round_: int) -> str:
    """Round 2t trains B (A frozen), round 2t+1 trains A (B frozen)."""
    return "B" if round_ % 2 == 0 else "A"


def rolora(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """Average only the trained factor; the frozen one is shared, so the average is exact:
    ``Σ p_k s B_k A = s B̄ A`` (B-round) and ``Σ p_k s B A_k = s B Ā`` (A-round)."""
    old = state.lora
    if rolora_trains(ctx.round) == "B":
        B = weighted_sum([u.B for u in updates], p)  # (m, r)
        return Aggregated(state=GlobalMatrix(lora=LoRAFactors(A=old.A, B=B, scale=old.scale), base=state.base, W=state.W),
                          broadcast={"B": B})
    A = weighted_sum([u.A for u in updates], p)  # (r, n)
    return Aggregated(state=GlobalMatrix(lora=LoRAFactors(A=A, B=old.B, scale=old.scale), base=state.base, W=state.W),
                      broadcast={"A": A})


register(Rule(name="rolora", linear=True, aggregate=rolora, trains=rolora_trains, exact=True,
              paper="Chen et al. 2024, RoLoRA (arXiv:2409.02346)"))
# The released RoLoRA code shares one model object between clients, so client k starts from client
# k-1's trained factor: sequential training. Same server math; the round loop chains the clients.
register(Rule(name="rolora-chain", linear=True, aggregate=rolora, trains=rolora_trains, exact=True, chain=True,
              paper="ablation of the released RoLoRA code's shared-model confound"))
