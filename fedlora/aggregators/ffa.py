"""FFA-LoRA: A frozen at its shared random init, only B trained (Sun et al., ICLR 2024)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors
from ..linalg import weighted_sum
from .registry import Aggregated, RoundContext, Rule, register


def ffa(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``B ← Σ p_k B_k`` with ``A = A0`` on every client: ``Σ p_k s B_k A0 = s B̄ A0`` exactly.

    A is never sent (clients draw it from the shared seed).
    """
    B = weighted_sum([u.B for u in updates], p)  # (m, r)
    lora = LoRAFactors(A=state.lora.A, B=B, scale=state.lora.scale)
    return Aggregated(state=GlobalMatrix(lora=lora, base=state.base, W=state.W), broadcast={"B": B})


register(Rule(name="ffa", linear=True, aggregate=ffa, trains=lambda t: "B", exact=True,
              paper="Sun et al. 2024, FFA-LoRA (arXiv:2403.12313)"))
# The chained control of ffa: client k starts from client k-1's trained B (A stays at the shared init).
register(Rule(name="ffa-chain", linear=True, aggregate=ffa, trains=lambda t: "B", exact=True, chain=True,
              paper="control: ffa with the released RoLoRA code's chain of clients"))
