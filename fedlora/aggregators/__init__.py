"""Every server rule as a pure function, registered by name; ``aggregate`` validates, then calls it."""
from __future__ import annotations

from typing import Optional, Sequence

from ..factors import ClientUpdate, GlobalMatrix
from ..validation import normalize_weights, validate_result, validate_updates
from . import fedavg as _fedavg, ffa as _ffa, rolora as _rolora, fedex as _fedex  # noqa: F401  (register)
from . import flexlora as _flexlora, flora as _flora, full as _full, head_only as _head_only  # noqa: F401
from .registry import RULES, Aggregated, RoundContext, Rule, get_rule, register, rule_names

__all__ = ["RULES", "Aggregated", "RoundContext", "Rule", "get_rule", "register", "rule_names", "aggregate"]


def aggregate(rule: Rule | str, state: GlobalMatrix, updates: Sequence[ClientUpdate], weights, *,
              ctx: RoundContext = RoundContext(), client_ids: Optional[Sequence] = None,
              name: str = "matrix") -> Aggregated:
    """Validate the round's updates and weights, then apply ``rule``. Raises ``UpdateError`` (and
    changes nothing) on a non-tensor, NaN/Inf, overflowing magnitudes, a dtype other than the global's,
    wrong shapes or ranks (rank 0 included), a non-positive or non-finite scale, empty rounds, and
    weights that are not one finite non-negative number per client (not all zero)."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    validate_updates(state, updates, rule.trains(ctx.round), per_client_rank=rule.per_client_rank,
                     client_ids=client_ids, name=name)
    p = normalize_weights(weights, len(updates), client_ids=client_ids)
    out = rule.aggregate(state, updates, p, ctx)
    validate_result(out.state, name=name)
    return out
