"""The averaging error of a round: how far the server's new global is from the average of what the
clients trained — the quantity RoLoRA and FedEx-LoRA argue about.

With ``Δ_k = base + s_k B_k A_k`` (or the dense ``W_k``) what client k's model applies after local
training, ``Δ_start,k`` what it started from (its view of the old global) and ``Δ_server,k`` what it
starts from next round (its view of the new global; FlexLoRA's rank-r_k truncation, say):

    e_t = ‖Σ_k p_k Δ_k − Σ_k p_k Δ_server,k‖_F / ‖Σ_k p_k Δ_k − Σ_k p_k Δ_start,k‖_F

summed over the adapted matrices (squared norms added before the root). Zero for exact rules (up to
float rounding), ``‖Σ p_k s (B_k − B̄)(A_k − Ā)‖ / ‖update‖`` for FedAvg-LoRA (SPEC, "fedavg"), the
truncation for FlexLoRA. Computed on the factors (``fedlora.linalg.frobenius_norm``); views are made
once per distinct (rank, scale), and terms that are the same object (a shared frozen base) cancel
exactly before any arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .factors import ClientUpdate, DenseBase, GlobalMatrix, LoRAFactors, LowRank
from .linalg import frobenius_norm

__all__ = ["ErrorTracker", "relative_error"]


class _Expr:
    """A signed sum of matrices: shared objects (bases, view adapters, dense W) by identity, so that a
    term added and subtracted cancels exactly, plus free low-rank and dense terms."""

    def __init__(self) -> None:
        self.shared: dict[int, list] = {}  # id(obj) -> [coef, obj]
        self.lowrank: list[tuple[Tensor, Tensor]] = []
        self.dense: list[Tensor] = []

    def add_obj(self, obj, coef: float) -> None:
        if obj is None or coef == 0:
            return
        slot = self.shared.setdefault(id(obj), [0.0, obj])
        slot[0] += coef

    def add_view(self, g: GlobalMatrix, coef: float) -> None:
        """``coef · Δ`` of a global/view: ``base + s B A``, or ``W`` for the full-weight rules."""
        self.add_obj(g.W, coef)
        self.add_obj(g.base, coef)
        self.add_obj(g.lora, coef)

    def extend(self, other: "_Expr", sign: float) -> None:
        for coef, obj in other.shared.values():
            self.add_obj(obj, sign * coef)
        self.lowrank += [(U * sign, V) for U, V in other.lowrank]
        self.dense += [D * sign for D in other.dense]

    def norm(self, shape: tuple[int, int]) -> float:
        lowrank, dense = list(self.lowrank), list(self.dense)
        for coef, obj in self.shared.values():
            if coef == 0:
                continue
            if isinstance(obj, LoRAFactors):
                lowrank.append((obj.B.to(torch.float64) * (coef * obj.scale), obj.A))
            elif isinstance(obj, LowRank):
                lowrank.append((obj.U.to(torch.float64) * coef, obj.V))
            elif isinstance(obj, DenseBase):
                dense.append(obj.M.to(torch.float64) * coef)
            else:  # a dense W
                dense.append(obj.to(torch.float64) * coef)
        return frobenius_norm(lowrank, dense, shape=shape)


@dataclass
class ErrorTracker:
    """Collects, client by client, ``w_k Δ_k`` of the adapted matrices; ``finish`` gives the round's error.

    Low-rank uploads are kept as factors (per client, so a client rejected late can be taken out);
    dense ``W_k`` (the full-weight rules) are summed into one float64 matrix per name as they arrive.
    """

    clients: dict = field(default_factory=dict)  # client -> name -> (w s B (m×r), A (r×n))
    dense: dict = field(default_factory=dict)  # name -> Σ w_k W_k (m×n, float64)
    valid: bool = True

    def add(self, client, w: float, state: Mapping, uploads: Mapping) -> None:
        """``uploads``: the client's validated ``ClientUpdate`` per name; a factor it did not train is the
        global's (RoLoRA, FFA and the chained controls freeze one factor at the global's value)."""
        mine = {}
        for name, u in uploads.items():
            g = state[name]
            if isinstance(g, Tensor) or not isinstance(u, ClientUpdate):
                continue  # dense parameters (a head) are not adapted matrices
            if u.W is not None:
                acc = self.dense.setdefault(name, torch.zeros(u.W.shape, dtype=torch.float64))
                acc.add_(u.W.to(torch.float64), alpha=w)
                continue
            if g.lora is None and (u.A is None or u.B is None):
                continue
            A = u.A if u.A is not None else g.lora.A
            B = u.B if u.B is not None else g.lora.B
            mine[name] = (B.to(torch.float64) * (w * u.scale), A)
        self.clients[client] = mine

    def drop(self, client) -> None:
        """A client rejected after it was added: its factors leave; a dense sum cannot be undone."""
        self.clients.pop(client, None)
        if self.dense:
            self.valid = False

    def finish(self, rule, old: Mapping, new: Mapping, kept: Sequence, weights: Sequence[float], *,
               ranks: Optional[Sequence], scales: Optional[Sequence]) -> Optional[dict]:
        total = float(sum(weights))
        if not self.valid or total <= 0:
            return None
        groups: dict[tuple, float] = {}  # (rank, scale) -> Σ p_k of the clients that see that view
        for i, c in enumerate(kept):
            key = (ranks[i] if ranks is not None else None, scales[i] if scales is not None else None)
            groups[key] = groups.get(key, 0.0) + weights[i] / total
        err_sq = upd_sq = 0.0
        for name, g_old in old.items():
            if isinstance(g_old, Tensor):
                continue
            g_new = new[name]
            clients, start, server = _Expr(), _Expr(), _Expr()
            for c in kept:
                if name in self.clients.get(c, {}):
                    U, V = self.clients[c][name]
                    clients.lowrank.append((U / total, V))
            if name in self.dense:
                clients.dense.append(self.dense[name] / total)
            for (r, s), P in groups.items():
                v_old = rule.client_view(g_old, rank=r, scale=s, seed=0)
                v_new = rule.client_view(g_new, rank=r, scale=s, seed=0)
                clients.add_obj(v_old.base, P)  # the frozen base the client trained on top of
                start.add_view(v_old, P)
                server.add_view(v_new, P)
            num, den = _Expr(), _Expr()
            num.extend(clients, 1.0)
            num.extend(server, -1.0)
            den.extend(clients, 1.0)
            den.extend(start, -1.0)
            shape = g_old.shape
            err_sq += num.norm(shape) ** 2
            upd_sq += den.norm(shape) ** 2
        return relative_error(err_sq ** 0.5, upd_sq ** 0.5)


def relative_error(error: float, update: float) -> dict:
    """The record's entry: ``relative`` is ``None`` when the clients made no update at all."""
    return {"relative": error / update if update > 0 else None, "error": error, "update": update}
