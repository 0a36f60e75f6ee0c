"""The toy network and its data, as plain tensors.

The RoLoRA paper's toy is ``f(x) = ReLU(x A_toy B_toy) W_out`` with only ``A_toy``, ``B_toy``
trainable. In SPEC notation (weights are out × in) that is one adapted ``hidden`` matrix of shape
``h × 784`` whose effective weight is ``W0 + s · B A`` (W0 = 0 in the paper), so

    f(x) = W_out · ReLU((W0 + s B A) x + c),        W_out: 10 × h, fixed; c: h, zero or frozen random.

With ``W0 = 0`` and ``c = 0`` at rank 1, ``ReLU(s (a·x) b)`` is ``(a·x)·ReLU(b)`` or ``|a·x|·ReLU(−b)``:
the logits are one of two fixed directions scaled by ``|a·x|``, so only two classes can ever be
predicted (≈22% accuracy at best). ``bias="frozen"`` adds a fixed random ``c`` that lifts the cap.

Because ``W0 = 0`` makes ``B = 0`` a dead start (``ReLU'(0) = 0`` kills every gradient), the paper's
toy starts with both factors random; the pretrained variant uses the standard LoRA init (B = 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora import GlobalMatrix, LoRAFactors, LowRank, init_lora
from fedlora.partition import Partition, dirichlet, iid, k_labels
from fedlora.seeding import derive_seed, generator

from .config import CENTRALISED, ToyConfig
from .data import Mnist

__all__ = ["Toy", "build_toy", "init_state", "frozen_weight", "evaluate", "NAME"]

NAME = "hidden"  # the one adapted matrix
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (of x / 255)


@dataclass
class Toy:
    """Everything fixed during a run: the frozen parts of the network and the client data."""

    W_out: Tensor  # (10, h) fixed output layer
    c: Optional[Tensor]  # (h,) frozen hidden bias, or None
    W0: Optional[Tensor]  # (h, 784) frozen pretrained base, or None (the paper's toy: W0 = 0)
    X: Tensor  # (K, N_max, 784) client data, zero-padded to the largest client
    y: Tensor  # (K, N_max) labels (padding rows: 0, never drawn)
    sizes: list[int]  # n_k
    X_val: Tensor  # (V, 784)
    y_val: Tensor
    X_test: Tensor  # (T, 784)
    y_test: Tensor
    partition: dict  # the partition summary (samples and label histogram per client)
    dp: Optional[list] = None  # one fedlora.dp.DPPlan per client when cfg.dp_epsilon is set


def dp_plans(cfg: ToyConfig, sizes: list[int]) -> Optional[list]:
    """Each client's DP-SGD plan for the whole run: every client trains every round, so it takes
    ``rounds × local_steps`` steps (centralised: ``clients ×`` as many per round)."""
    if not cfg.dp:
        return None
    from fedlora.dp import plan

    per_round = cfg.local_steps * (cfg.clients if cfg.method == CENTRALISED else 1)
    try:
        return [plan(epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, max_grad_norm=cfg.dp_max_grad_norm,
                     batch_size=cfg.batch_size, samples=n, steps=cfg.rounds * per_round) for n in sizes]
    except ValueError as err:
        from fedlora.config import ConfigError

        raise ConfigError(f"DP: {err}") from None


def _normalise(x: np.ndarray, dtype: torch.dtype) -> Tensor:
    return (torch.from_numpy(x).to(dtype) / 255.0 - MEAN) / STD


def _partition(cfg: ToyConfig, labels: np.ndarray) -> Partition:
    seed = derive_seed(cfg.seed, "partition")
    if cfg.method == CENTRALISED:
        return iid(labels, 1, seed=seed)
    if cfg.partition == "labels":
        return k_labels(labels, cfg.clients, labels_per_client=cfg.labels_per_client, seed=seed)
    if cfg.partition == "dirichlet":
        return dirichlet(labels, cfg.clients, alpha=cfg.dirichlet_alpha, seed=seed)
    return iid(labels, cfg.clients, seed=seed)


def build_toy(cfg: ToyConfig, data: Mnist) -> Toy:
    """Split train into validation / (pretraining) / client pool, partition the pool, draw the fixed layers."""
    dt = getattr(torch, cfg.dtype)
    x_tr, y_tr = data.x_train, data.y_train.astype(np.int64)
    rng = np.random.default_rng(derive_seed(cfg.seed, "split"))
    order = rng.permutation(len(y_tr))
    if cfg.train_subset:
        order = order[:cfg.train_subset]
    n_pre = cfg.pretrain_size if cfg.base == "pretrained" else 0
    if cfg.val_size + n_pre >= len(order):
        raise ValueError(f"val_size={cfg.val_size} + pretrain_size={n_pre} leave no training data "
                         f"out of {len(order)} samples; lower them")
    val, pre, pool = order[:cfg.val_size], order[cfg.val_size:cfg.val_size + n_pre], order[cfg.val_size + n_pre:]
    part = _partition(cfg, y_tr[pool])
    sizes = [len(i) for i in part.indices]
    X = torch.zeros(len(sizes), max(sizes), 784, dtype=dt)  # (K, N_max, 784)
    y = torch.zeros(len(sizes), max(sizes), dtype=torch.long)
    for k, idx in enumerate(part.indices):
        rows = pool[idx]
        X[k, :len(rows)] = _normalise(x_tr[rows], dt)
        y[k, :len(rows)] = torch.from_numpy(y_tr[rows])
    n_test = cfg.test_subset or len(data.y_test)
    h = cfg.hidden
    g = generator(cfg.seed, "fixed-layers")
    W_out = (torch.rand(10, h, generator=g, dtype=torch.float64) * 2 - 1).div_(h ** 0.5).to(dt)  # (10, h)
    c = (torch.rand(h, generator=g, dtype=torch.float64) - 0.5).to(dt) if cfg.bias == "frozen" else None  # (h,)
    W0 = None
    if cfg.base == "pretrained":
        W0, W_out, c = _pretrain(cfg, _normalise(x_tr[pre], dt), torch.from_numpy(y_tr[pre]), W_out, c)
    return Toy(W_out=W_out, c=c, W0=W0, X=X, y=y, sizes=sizes,
               X_val=_normalise(x_tr[val], dt), y_val=torch.from_numpy(y_tr[val]),
               X_test=_normalise(data.x_test[:n_test], dt), y_test=torch.from_numpy(data.y_test[:n_test].astype(np.int64)),
               partition=part.summary, dp=dp_plans(cfg, sizes))


def _pretrain(cfg: ToyConfig, X: Tensor, y: Tensor, W_out: Tensor, c: Optional[Tensor]):
    """The 'pretrained model' of the second variant: W0, W_out (and c) trained centrally with Adam on a
    small held-out set, then frozen. Federated LoRA adapts W0 on the clients' (skewed) data."""
    g = generator(cfg.seed, "pretrain")
    bound = 1.0 / 784 ** 0.5
    W0 = ((torch.rand(cfg.hidden, 784, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(X.dtype)
    params = [W0.requires_grad_(), W_out.clone().requires_grad_()] + ([c.clone().requires_grad_()] if c is not None else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(cfg.pretrain_epochs):
        for rows in torch.randperm(len(y), generator=g).split(cfg.batch_size):
            pre = X[rows] @ params[0].T + (params[2] if c is not None else 0)
            loss = F.cross_entropy(F.relu(pre) @ params[1].T, y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = [p.detach() for p in params]
    return out[0], out[1], (out[2] if c is not None else None)


def init_state(cfg: ToyConfig, toy: Toy) -> dict[str, GlobalMatrix]:
    """The common start of every method: the same effective weight ``W0 + s B0 A0`` for all rules."""
    g = generator(cfg.seed, "init")
    h, r, s = cfg.hidden, cfg.rank, cfg.scale
    dt = toy.X.dtype
    lora = init_lora(h, 784, r, scale=s, generator=g, dtype=dt)  # A0 ~ U(±1/√784), B0 = 0
    if cfg.base == "zero":  # W0 = 0: B0 = 0 would be a dead start, so B0 is random too
        B0 = ((torch.rand(h, r, generator=g, dtype=torch.float64) * 2 - 1) / r ** 0.5).to(dt)  # (h, r)
        lora = LoRAFactors(A=lora.A, B=B0, scale=s)
    if cfg.method == "full":  # the full-weight rule trains the whole hidden weight from the same function
        return {NAME: GlobalMatrix(W=(toy.W0 if toy.W0 is not None else 0) + lora.delta())}
    if cfg.method == "flora":  # FLoRA merges every adapter into the frozen weight, so start merged
        return {NAME: GlobalMatrix(base=LowRank(U=lora.B * s, V=lora.A))}
    return {NAME: GlobalMatrix(lora=lora)}


def frozen_weight(toy: Toy, g: GlobalMatrix) -> Optional[Tensor]:
    """The frozen part of the hidden weight a LoRA client trains on: ``W0 + base.U base.V`` (h × 784)."""
    parts = [p for p in (toy.W0, g.base.dense() if g.base is not None else None) if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def hidden_weight(toy: Toy, g: GlobalMatrix) -> Tensor:
    """The effective hidden weight: ``W`` for the full rule, else ``W0 + base + s B A`` (h × 784)."""
    if g.W is not None:
        return g.W
    return g.effective_delta() + (toy.W0 if toy.W0 is not None else 0)


def logits(toy: Toy, W: Tensor, X: Tensor) -> Tensor:
    pre = X @ W.T  # (N, h)
    if toy.c is not None:
        pre = pre + toy.c
    return F.relu(pre) @ toy.W_out.T  # (N, 10)


def evaluate(toy: Toy, state: Mapping[str, GlobalMatrix]) -> dict[str, float]:
    W = hidden_weight(toy, state[NAME])
    out = {}
    for split, X, y in (("val", toy.X_val, toy.y_val), ("test", toy.X_test, toy.y_test)):
        if len(y) == 0:
            continue
        z = logits(toy, W, X)
        out[f"{split}_accuracy"] = float((z.argmax(1) == y).double().mean())
        out[f"{split}_loss"] = float(F.cross_entropy(z.double(), y))
    return out
