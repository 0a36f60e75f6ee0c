"""FedIT: FedAvg of the LoRA factors (Zhang et al., 2024, "Towards Building the Federated GPT")."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, LoRAFactors
from ..linalg import weighted_sum
from .registry import Aggregated, RoundContext, Rule, register


def fedavg(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``.

    Inexact: ``Σ p_k B_k A_k − B̄ Ā = Σ p_k (B_k − B̄)(A_k − Ā)``, the weighted cross-covariance of
    the client factors (SPEC, "fedavg").
    """
    A = weighted_sum([u.A for u in updates], p)  # (r, n)
    B = weighted_sum([u.B for u in updates], p)  # (m, r)
    lora = LoRAFactors(A=A, B=B, scale=state.lora.scale)
    return Aggregated(state=GlobalMatrix(lora=lora, base=state.base, W=state.W), broadcast={"A": A, "B": B})


register(Rule(name="fedavg", linear=True, aggregate=fedavg, trains=lambda t: "AB", exact=False,
              paper="Zhang et al. 2024, FedIT (arXiv:2305.05644)"))
# The released RoLoRA code's shared model object chains every rule it runs, FedAvg-LoRA included:
# client k starts from client k-1's trained factors. The chained control of fedavg (same server math).
register(Rule(name="fedavg-chain", linear=True, aggregate=fedavg, trains=lambda t: "AB", exact=False, chain=True,
              paper="control: fedavg with the released RoLoRA code's chain of clients"))
