"""Federated simulations on the linear model, with the core's server rules doing the server step.

A round: every client starts from its own view of the global state (``Rule.client_view``), trains
what the rule trains that round (``Rule.trains``) on its own sufficient statistics, and uploads only
that; ``fedlora.aggregate`` validates and aggregates. So the theory checks the same server code the
MNIST toy and the LLMs run.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from fedlora import ClientUpdate, GlobalMatrix, LoRAFactors, RoundContext, aggregate, get_rule

from .model import LinearProblem, dtype
from .predictions import round_map

__all__ = ["LocalSpec", "local_train", "run_federated", "RunTrace", "effective_weight", "lora_state",
           "round_map_log"]

_RUNS: Optional[list] = None  # inside ``round_map_log``: (rule, rounds, max round-map error) per run


@contextmanager
def round_map_log():
    """Collect every run's round-map check made inside the block (``analyses.run_all`` turns them
    into one exact record per analysis)."""
    global _RUNS
    outer, _RUNS = _RUNS, []
    try:
        yield _RUNS
    finally:
        _RUNS = outer


@dataclass(frozen=True)
class LocalSpec:
    """How a client trains in one round.

    ``solver="gd"``: ``steps`` full-batch gradient steps of size ``lr`` on every trained factor at
    once. ``solver="ls"``: the exact least-squares solution for the trained factor with the other
    frozen (the b-step of RoLoRA's analysis; only for ``trains`` = "A" or "B").
    """

    solver: str = "gd"
    steps: int = 1
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.solver not in ("gd", "ls"):
            raise ValueError(f"solver must be 'gd' or 'ls', got {self.solver!r}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError(f"need steps >= 1 and lr > 0; got steps={self.steps}, lr={self.lr}")


def lora_state(A: Tensor, B: Tensor, scale: float = 1.0) -> GlobalMatrix:
    return GlobalMatrix(lora=LoRAFactors(A=A.to(dtype), B=B.to(dtype), scale=scale))


def effective_weight(state: GlobalMatrix) -> Tensor:
    """The learner's weight ``W − W0`` (m × n): ``base + s B A``, or ``W`` for full-weight rules."""
    return state.effective_delta()


def _base(state: GlobalMatrix) -> Optional[Tensor]:
    return state.base.dense() if state.base is not None else None


def local_train(problem: LinearProblem, k: int, start: GlobalMatrix, trains: str, spec: LocalSpec) -> ClientUpdate:
    """Client k's round from ``start``; returns only what ``trains`` names."""
    H, C = problem.H[k], problem.C[k]  # (n, n), (m, n)
    if trains == "W":
        if spec.solver != "gd":
            raise ValueError("full-weight clients train by gradient descent (solver='gd')")
        W = effective_weight(start).clone()
        for _ in range(spec.steps):
            W = W - spec.lr * (W @ H - C)  # ∇L_k(W) = W H_k − C_k
        return ClientUpdate(W=W)
    lo = start.lora
    A, B, s = lo.A.clone(), lo.B.clone(), lo.scale
    base = _base(start)
    if spec.solver == "ls":
        target = C if base is None else C - base @ H  # what s B A must explain, (m, n)
        if trains == "B":  # ∇_B = 0  ⇔  s B (A H Aᵀ) = target Aᵀ
            B = torch.linalg.solve((A @ H @ A.T).T, (target @ A.T).T).T / s  # (m, r)
            return ClientUpdate(B=B, scale=s)
        if trains == "A":  # ∇_A = 0  ⇔  s² BᵀB A H = s Bᵀ target
            A = torch.linalg.solve(s * (B.T @ B), B.T @ target)  # (r, n), still times H
            A = torch.linalg.solve(H.T, A.T).T  # (r, n)
            return ClientUpdate(A=A, scale=s)
        raise ValueError(f"solver='ls' trains one factor at a time, got trains={trains!r}")
    for _ in range(spec.steps):
        W = s * B @ A if base is None else base + s * B @ A  # (m, n)
        G = W @ H - C  # (m, n)
        gB, gA = s * G @ A.T, s * B.T @ G  # (m, r), (r, n)
        if "B" in trains:
            B = B - spec.lr * gB
        if "A" in trains:
            A = A - spec.lr * gA
    return ClientUpdate(**{f: t for f, t in (("A", A), ("B", B)) if f in trains}, scale=s)


@dataclass
class RunTrace:
    state: GlobalMatrix
    losses: list[float]  # evaluation after every round (index 0: before training)
    extra: list  # what ``observe`` returned after every round (index 0: before training)
    round_map_error: float = 0.0  # max over rounds of ‖core aggregate − predictions.round_map‖ / ‖round_map‖


def run_federated(problem: LinearProblem, rule_name: str, init: GlobalMatrix, *, rounds: int,
                  local: Union[LocalSpec, Mapping[str, LocalSpec]], rank: Optional[int] = None,
                  scale: Optional[float] = None, evaluate: Optional[LinearProblem] = None,
                  post_round: Optional[Callable[[GlobalMatrix, int], GlobalMatrix]] = None,
                  observe: Optional[Callable[[GlobalMatrix], object]] = None) -> RunTrace:
    """``rounds`` rounds of ``rule_name`` over all clients of ``problem`` (weights ``problem.p``).

    ``local`` may map what is trained ("A", "B", "AB", "W") to a ``LocalSpec``. ``rank``/``scale``
    are the clients' rank and s (FlexLoRA's view truncates to them). The loss is measured on
    ``evaluate`` (default: ``problem``) at the weight a client receives (``client_view``).
    ``post_round`` edits the state after aggregation (e.g. RoLoRA's normalisation of a).
    """
    rule = get_rule(rule_name)
    K = problem.num_clients
    ev = evaluate if evaluate is not None else problem
    ctx_extra = {}
    if rule.per_client_rank:
        ctx_extra = dict(client_ranks=[rank] * K, client_scales=[scale] * K)

    def view(state: GlobalMatrix, k: int, t: int) -> GlobalMatrix:
        return rule.client_view(state, rank=rank, scale=scale, seed=t * K + k)

    def measure(state: GlobalMatrix):
        W = effective_weight(view(state, 0, 0))
        return ev.loss(W), (observe(state) if observe is not None else None)

    state, map_err = init, 0.0
    first = measure(state)
    losses, extra = [first[0]], [first[1]]
    for t in range(rounds):
        trains = rule.trains(t)
        spec = local[trains] if isinstance(local, Mapping) else local
        updates = [local_train(problem, k, view(state, k, t), trains, spec) for k in range(K)]
        new = aggregate(rule, state, updates, problem.p, ctx=RoundContext(round=t, **ctx_extra)).state
        want = round_map(rule_name, state, updates, problem.p, trains)
        err = float((effective_weight(new) - want).norm()) / max(float(want.norm()), 1e-300)
        map_err = max(map_err, err)
        state = new
        if post_round is not None:
            state = post_round(state, t)
        loss, obs = measure(state)
        losses.append(loss)
        extra.append(obs)
    if _RUNS is not None:
        _RUNS.append((rule_name, rounds, map_err))
    return RunTrace(state=state, losses=losses, extra=extra, round_map_error=map_err)
