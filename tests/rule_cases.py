"""Random but valid aggregation inputs for any registered rule (shared by the contract tests)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora import ClientUpdate, GlobalMatrix, LoRAFactors, LowRank, RoundContext, get_rule


@dataclass
class Case:
    state: GlobalMatrix
    updates: list
    weights: torch.Tensor
    ctx: RoundContext


def client_factors(rule_name: str, state: GlobalMatrix, u: ClientUpdate) -> LoRAFactors:
    """The adapter client k ends the round with: its trained factors, the global's frozen ones."""
    g = state.lora
    A = u.A if u.A is not None else g.A
    B = u.B if u.B is not None else g.B
    return LoRAFactors(A=A, B=B, scale=u.scale)


def make_case(rule_name: str, *, m: int, n: int, r: int, K: int, seed: int, round_: int = 0,
              dtype=torch.float64, with_base: bool = True) -> Case:
    rule = get_rule(rule_name)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    trains = rule.trains(round_)
    base = LowRank(U=rnd(m, 2), V=rnd(2, n)) if with_base else None
    if trains == "W":
        state = GlobalMatrix(W=rnd(m, n))
        return Case(state, [ClientUpdate(W=rnd(m, n)) for _ in range(K)], weights, RoundContext(round=round_))
    if rule.per_client_rank:
        ranks = [1 + (k * 7 + seed) % r for k in range(K)]
        scales = [2.0 / rk for rk in ranks]
        lora = LoRAFactors(A=rnd(r, n), B=rnd(m, r), scale=0.5) if rule_name != "flora" else None
        state = GlobalMatrix(lora=lora, base=base)
        ups = [ClientUpdate(A=rnd(rk, n), B=rnd(m, rk), scale=s) for rk, s in zip(ranks, scales)]
        return Case(state, ups, weights, RoundContext(round=round_, client_ranks=ranks, client_scales=scales))
    s = 2.0 / r
    state = GlobalMatrix(lora=LoRAFactors(A=rnd(r, n), B=rnd(m, r), scale=s), base=base if rule_name == "fedex" else None)
    ups = [ClientUpdate(A=rnd(r, n) if "A" in trains else None, B=rnd(m, r) if "B" in trains else None, scale=s)
           for _ in range(K)]
    return Case(state, ups, weights, RoundContext(round=round_))


def identical_clients(rule_name: str, case: Case) -> list:
    """Every client returns exactly what it was given (its view of the global)."""
    rule = get_rule(rule_name)
    trains = rule.trains(case.ctx.round)
    out = []
    for k in range(len(case.updates)):
        rank = case.ctx.client_ranks[k] if case.ctx.client_ranks else None
        scale = case.ctx.client_scales[k] if case.ctx.client_scales else None
        if rule_name == "flexlora":  # the global's rank bounds what a client can receive unchanged
            rank, scale = case.state.lora.rank, case.state.lora.scale
        v = rule.client_view(case.state, rank=rank, scale=scale, seed=k)
        if trains == "W":
            out.append(ClientUpdate(W=v.W.clone()))
        else:
            out.append(ClientUpdate(A=v.lora.A.clone() if "A" in trains else None,
                                    B=v.lora.B.clone() if "B" in trains else None, scale=v.lora.scale))
    return out
