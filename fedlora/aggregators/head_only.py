"""The head-only baseline: the adapters stay at their init, only the dense parameters (a task head) train.

Not a published rule but the control every LoRA rule must beat: how much of the accuracy comes from
the classifier head alone, averaged ``Σ p_k W_k`` by the round loop like every dense parameter.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix
from .registry import Aggregated, RoundContext, Rule, register


def head_only(state: GlobalMatrix, updates: Sequence[ClientUpdate], p: Tensor, ctx: RoundContext) -> Aggregated:
    """Clients train no factor and send none: the adapted matrix keeps its init, nothing is broadcast."""
    return Aggregated(state=state, broadcast={})


register(Rule(name="head-only", aggregate=head_only, trains=lambda t: "", exact=True,
              paper="baseline: adapters frozen at init, only the dense parameters (the head) trained"))
