"""Direct full-weight averaging (no LoRA), optionally with a GaLore local optimizer."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix
from ..linalg import weighted_sum
from .registry import Aggregated, RoundContext, Rule, register


def full(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """``W ← Σ p_k W_k`` (McMahan et al., 2017, FedAvg), exact; uplink m·n per matrix."""
    W = weighted_sum([u.W for u in updates], p)  # (m, n)
    return Aggregated(state=GlobalMatrix(lora=state.lora, base=state.base, W=W), broadcast={"W": W})


register(Rule(name="full", linear=True, aggregate=full, trains=lambda t: "W", exact=True,
              paper="McMahan et al. 2017 (FedAvg); recommended by the gradient-subspace study"))
# Same server math; clients use GaLore (Zhao et al., ICML 2024) as the local optimizer.
register(Rule(name="full-galore", linear=True, aggregate=full, trains=lambda t: "W", exact=True,
              local_optimizer="galore",
              paper="Zhao et al. 2024, GaLore (arXiv:2403.03507) as local optimizer"))
