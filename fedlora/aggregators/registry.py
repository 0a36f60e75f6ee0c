"""Server rules registered by name, as in peft's tuner registry: duplicates are refused."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from torch import Tensor

from ..factors import ClientUpdate, GlobalMatrix, nbytes

__all__ = ["RoundContext", "Aggregated", "Rule", "register", "get_rule", "RULES", "rule_names"]


@dataclass(frozen=True)
class RoundContext:
    """What a rule may know about the round besides the tensors."""

    round: int = 0  # 0-based round index (RoLoRA alternates on its parity)
    client_ranks: Optional[Sequence[int]] = None  # per-client rank r_k (flexlora, flora)
    client_scales: Optional[Sequence[float]] = None  # per-client s_k = alpha / r_k


@dataclass(frozen=True)
class Aggregated:
    """A rule's result: the new global state and exactly what is broadcast to every client."""

    state: GlobalMatrix
    broadcast: Mapping[str, Tensor] = field(default_factory=dict)

    def broadcast_bytes(self) -> int:
        return sum(nbytes(t) for t in self.broadcast.values())


AggregateFn = Callable[[GlobalMatrix, Sequence[ClientUpdate], Tensor, RoundContext], Aggregated]


def _same_view(state: GlobalMatrix, *, rank: Optional[int], scale: Optional[float], seed: int) -> GlobalMatrix:
    return state


@dataclass(frozen=True)
class Rule:
    """A federated-LoRA server rule.

    ``aggregate(state, updates, p, ctx)`` is a pure function: ``p`` are normalised, validated client
    weights (Σ p_k = 1); inputs are never modified. ``trains(round)`` says what clients train that
    round: ``"AB"``, ``"A"``, ``"B"`` or ``"W"`` (dense weight). ``client_view`` gives the state a
    client starts from (FlexLoRA truncates to r_k, FLoRA starts a fresh adapter).
    """

    name: str
    aggregate: AggregateFn
    trains: Callable[[int], str]
    exact: bool
    paper: str
    client_view: Callable[..., GlobalMatrix] = _same_view
    per_client_rank: bool = False  # clients may have different ranks r_k
    chain: bool = False  # clients train one after another from the previous client's result (ablation)
    # aggregate depends on the updates only through Σ p_k u_k (fedavg, ffa, rolora, full): the loop may
    # then fold each finished client into a running weighted sum instead of holding all of them
    linear: bool = False
    local_optimizer: str = "default"  # "galore" for full-galore
    downlink_bytes: Optional[Callable[[Aggregated, int], int]] = None  # (aggregated, r_k) -> bytes

    def client_downlink_bytes(self, agg: Aggregated, rank: int) -> int:
        if self.downlink_bytes is not None:
            return self.downlink_bytes(agg, rank)
        return agg.broadcast_bytes()


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    if rule.name in RULES:
        raise ValueError(f"a rule named {rule.name!r} is already registered; pick another name")
    RULES[rule.name] = rule
    return rule


def rule_names() -> list[str]:
    return sorted(RULES)


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"unknown rule {name!r}; registered rules: {', '.join(rule_names())}") from None
