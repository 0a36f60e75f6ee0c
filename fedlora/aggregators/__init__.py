"""Every server rule as a pure function, registered by name; ``aggregate`` validates, then calls it."""
from __future__ import annotations

from typing import Optional, Sequence

from ..factors import ClientUpdate, GlobalMatrix
from ..validation import normalize_weights, validate_updates
from . import fedavg as _fedavg, ffa as _ffa, rolora as _rolora, fedex as _fedex  # noqa: F401  (register)
from . import flexlora as _flexlora, flora as _flora, full as _full  # noqa: F401
from .registry import RULES, Aggregated, RoundContext, Rule, get_rule, register, rule_names

__all__ = ["RULES", "Aggregated", "RoundContext", "Rule", "get_rule", "register", "rule_names", "aggregate"]


def aggregate(rule: Rule | str, state: GlobalMatrix, updates: Sequence[ClientUpdate], weights, *,
              ctx: RoundContext = RoundContext(), client_ids: Optional[Sequence] = None,
              name: str = "matrix") -> Aggregated:
    """Validate the round's updates and weights, then apply ``rule``. Raises ``UpdateError`` (and
    changes nothing) on NaN/Inf, wrong shapes or ranks, empty rounds, negative or all-zero weights."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    validate_updates(state, updates, rule.trains(ctx.round), per_client_rank=rule.per_client_rank,
                     client_ids=client_ids, name=name)
    p = normalize_weights(weights, len(updates), client_ids=client_ids)
    return rule.aggregate(state, updates, p, ctx)
