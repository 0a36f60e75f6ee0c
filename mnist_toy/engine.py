"""Local training: every client of a round at once, with hand-written gradients over a client dim.

Forward, per client k (leading dim K), for a batch ``x`` (b × 784):

    z    = x Aᵀ                      (b, r)   — cached for the whole local run when A is frozen
    pre  = x W_fᵀ + c + s z Bᵀ       (b, h)   — x W_fᵀ cached too (W_f = W0 + base is always frozen)
    out  = ReLU(pre) W_outᵀ          (b, 10)

Backward of the mean cross-entropy ``ℓ``: ``δ = (softmax − onehot)/b``, ``g = (δ W_out) ⊙ 1[pre > 0]``,
``∂ℓ/∂B = s gᵀ z``, ``∂ℓ/∂A = s (g B)ᵀ x``, ``∂ℓ/∂W = gᵀ x`` (full rule).

``train_batched`` is the fast path; ``train_reference`` is the plain one (autograd, ``torch.optim``,
one client at a time, dense ``W_f + s B A``) that the tests hold it to.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora import GlobalMatrix, LoRAFactors
from fedlora.loop import ClientResult, ClientTask

from .config import ToyConfig
from .model import NAME, Toy, frozen_weight

__all__ = ["batch_plan", "train_batched", "train_sequential", "train_reference"]


def batch_plan(n: int, cfg: ToyConfig, seed: int) -> tuple[Tensor, Tensor]:
    """The batches of one client's local run: indices (S, b) into its n samples and a validity mask.

    Epochs: a fresh permutation per epoch, the last batch short (masked). Steps: a stream of
    permutations cut into ``local_steps`` full batches. Shared by every engine, so they see the same data.
    """
    g = torch.Generator().manual_seed(seed)
    b = cfg.batch_size
    if cfg.local_epochs:
        per_epoch = -(-n // b)
        idx = torch.zeros(cfg.local_epochs * per_epoch * b, dtype=torch.long)
        valid = torch.zeros(idx.numel(), dtype=torch.bool)
        for e in range(cfg.local_epochs):
            off = e * per_epoch * b
            idx[off:off + n] = torch.randperm(n, generator=g)
            valid[off:off + n] = True
        return idx.view(-1, b), valid.view(-1, b)
    need = cfg.local_steps * b
    stream = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])[:need]
    return stream.view(-1, b), torch.ones(cfg.local_steps, b, dtype=torch.bool)


class _Optimizer:
    """SGD or Adam (torch.optim's update, bias-corrected) over stacked per-client tensors; clients whose
    run has ended (``active`` False) keep their parameters and moments."""

    def __init__(self, cfg: ToyConfig, params: list[Tensor]):
        self.kind, self.lr = cfg.optimizer, cfg.lr
        self.t = 0
        if self.kind == "adam":
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]

    def step(self, params: list[Tensor], grads: list[Tensor], active: Tensor) -> None:
        on = active.view(-1, 1, 1)  # (K, 1, 1)
        self.t += 1
        every = bool(active.all())
        if self.kind == "sgd":
            for p, g in zip(params, grads):
                p.sub_(g if every else torch.where(on, g, 0.0), alpha=self.lr)
            return
        b1, b2, eps = 0.9, 0.999, 1e-8
        c1, c2 = 1 - b1 ** self.t, (1 - b2 ** self.t) ** 0.5
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m.copy_(torch.where(on, m * b1 + g * (1 - b1), m))
            v.copy_(torch.where(on, v * b2 + g * g * (1 - b2), v))
            p.sub_(torch.where(on, (self.lr / c1) * m / (v.sqrt() / c2 + eps), 0.0))


def _stack_frozen(toy: Toy, starts: Sequence[GlobalMatrix]) -> Optional[Tensor]:
    """``W_f`` as (h, 784) when every client shares it (one object), else stacked (K, h, 784)."""
    if all(g.base is starts[0].base for g in starts):
        return frozen_weight(toy, starts[0])
    ws = [frozen_weight(toy, g) for g in starts]
    return torch.stack(ws)


def train_batched(tasks: Sequence[ClientTask], toy: Toy, cfg: ToyConfig) -> list[ClientResult]:
    """Train all ``tasks`` (same round, so the same trained factor) at once over a leading client dim."""
    trains = tasks[0].trains
    if any(t.trains != trains for t in tasks):
        raise ValueError("train_batched needs one round's tasks (all training the same factor)")
    K, b = len(tasks), cfg.batch_size
    ids = torch.tensor([t.client for t in tasks])
    sizes = [toy.sizes[t.client] for t in tasks]
    plans = [batch_plan(n, cfg, t.seed) for n, t in zip(sizes, tasks)]
    S = max(p[0].shape[0] for p in plans)
    idx = torch.zeros(K, S, b, dtype=torch.long)
    valid = torch.zeros(K, S, b, dtype=torch.bool)
    for k, (i, v) in enumerate(plans):
        idx[k, :len(i)], valid[k, :len(v)] = i, v
    active = valid.any(-1)  # (K, S): a client with fewer steps sits out the tail
    if ids.tolist() == list(range(toy.X.shape[0])):
        X, y = toy.X, toy.y  # every client: no 200 MB copy per round
    else:
        X, y = toy.X[ids], toy.y[ids]  # (K, N_max, 784), (K, N_max)
    kk = torch.arange(K)[:, None]  # (K, 1) for gathering rows per client
    X_flat = X.view(-1, X.shape[-1])  # (K·N_max, 784): one index_select per step is the cheapest gather
    flat_idx = idx + kk.unsqueeze(-1) * X.shape[1]  # (K, S, b) rows of X_flat

    starts = [t.start[NAME] for t in tasks]
    full = trains == "W"
    if full:
        W = torch.stack([g.W for g in starts]).clone()  # (K, h, 784)
        params = [W]
        Wf = None
    else:
        s = starts[0].lora.scale
        A = torch.stack([g.lora.A for g in starts]).clone()  # (K, r, 784)
        B = torch.stack([g.lora.B for g in starts]).clone()  # (K, h, r)
        params = [p for p, name in ((A, "A"), (B, "B")) if name in trains]
        Wf = _stack_frozen(toy, starts)

    # Frozen-feature cache: x W_fᵀ always, x Aᵀ when A is frozen, computed once for every row of the
    # shard when the run revisits rows (S·b ≥ N_max: epochs); a run that sees each row at most once
    # (a few steps) gains nothing from it, so it computes them per step.
    cache_x = cfg.feature_cache and (Wf is not None or trains == "B") and S * b >= X.shape[1]
    if cache_x:
        F_rows = X @ Wf.transpose(-1, -2) if Wf is not None else None  # (K, N_max, h)
        Z_rows = X @ A.transpose(1, 2) if trains == "B" else None  # (K, N_max, r)
    need_x = full or not (cache_x and trains == "B")  # B-only from the cache never touches x

    opt = _Optimizer(cfg, params)
    loss_sum = torch.zeros(K, dtype=torch.float64)
    for t in range(S):
        it, v = idx[:, t], valid[:, t]  # (K, b)
        yb = y[kk, it]  # (K, b)
        xb = X_flat.index_select(0, flat_idx[:, t].reshape(-1)).view(K, b, -1) if need_x else None  # (K, b, 784)
        if full:
            pre = xb @ W.transpose(1, 2)  # (K, b, h)
        else:
            if cache_x:
                fb = F_rows[kk, it] if F_rows is not None else None  # (K, b, h)
                z = Z_rows[kk, it] if Z_rows is not None else xb @ A.transpose(1, 2)  # (K, b, r)
            else:
                fb = xb @ Wf.transpose(-1, -2) if Wf is not None else None
                z = xb @ A.transpose(1, 2)  # (K, b, r)
            pre = s * (z @ B.transpose(1, 2))  # (K, b, h)
            if fb is not None:
                pre = pre + fb
        if toy.c is not None:
            pre = pre + toy.c
        hid = torch.relu(pre)
        out = hid @ toy.W_out.T  # (K, b, 10)
        shifted = out - out.amax(-1, keepdim=True)
        e = shifted.exp()
        tot = e.sum(-1, keepdim=True)  # (K, b, 1)
        nv = v.sum(1, keepdim=True).clamp(min=1)  # (K, 1)
        w = v.to(out.dtype) / nv  # (K, b) mean over the valid rows
        nll = tot.squeeze(-1).log() - shifted.gather(-1, yb.unsqueeze(-1)).squeeze(-1)  # (K, b) −log softmax_y
        loss_sum += (nll * w).sum(1).double() * active[:, t]
        delta = e / tot  # softmax
        delta.scatter_add_(-1, yb.unsqueeze(-1), torch.full_like(nll, -1.0).unsqueeze(-1))
        delta *= w.unsqueeze(-1)  # (K, b, 10) = ∂ℓ/∂out
        gpre = (delta @ toy.W_out) * (pre > 0)  # (K, b, h)
        if full:
            grads = [gpre.transpose(1, 2) @ xb]  # (K, h, 784)
        else:
            grads = []
            if "A" in trains:
                grads.append(s * ((gpre @ B).transpose(1, 2) @ xb))  # (K, r, 784)
            if "B" in trains:
                grads.append(s * (gpre.transpose(1, 2) @ z))  # (K, h, r)
        opt.step(params, grads, active[:, t])

    steps = active.sum(1).double()
    results = []
    for k, t in enumerate(tasks):
        p = W[k].clone() if full else LoRAFactors(A=A[k].clone(), B=B[k].clone(), scale=s)
        results.append(ClientResult(params={NAME: p}, num_samples=sizes[k],
                                    metrics={"train_loss": float(loss_sum[k] / steps[k])}))
    return results


def train_sequential(task: ClientTask, toy: Toy, cfg: ToyConfig) -> ClientResult:
    """The same hand-written math for one client (K = 1): the baseline that batching is timed against."""
    return train_batched([task], toy, cfg)[0]


def train_reference(task: ClientTask, toy: Toy, cfg: ToyConfig) -> ClientResult:
    """Plain and slow: autograd through ``ReLU(x (W_f + s B A)ᵀ + c) W_outᵀ``, ``torch.optim``, one client."""
    g0 = task.start[NAME]
    n = toy.sizes[task.client]
    X, y = toy.X[task.client, :n], toy.y[task.client, :n]
    idx, valid = batch_plan(n, cfg, task.seed)
    if task.trains == "W":
        W = g0.W.clone().requires_grad_()
        params, weight = [W], (lambda: W)
    else:
        A = g0.lora.A.clone().requires_grad_("A" in task.trains)
        B = g0.lora.B.clone().requires_grad_("B" in task.trains)
        s, Wf = g0.lora.scale, frozen_weight(toy, g0)
        params = [p for p in (A, B) if p.requires_grad]
        weight = lambda: s * B @ A + (Wf if Wf is not None else 0)  # noqa: E731  (h, 784)
    opt = torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.lr)
    losses = []
    for i, v in zip(idx, valid):
        rows = i[v]
        pre = X[rows] @ weight().T + (toy.c if toy.c is not None else 0)
        loss = F.cross_entropy(F.relu(pre) @ toy.W_out.T, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    p = W.detach() if task.trains == "W" else LoRAFactors(A=A.detach(), B=B.detach(), scale=s)
    return ClientResult(params={NAME: p}, num_samples=n, metrics={"train_loss": sum(losses) / len(losses)})
