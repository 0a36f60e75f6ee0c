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
from fedlora.seeding import derive_seed

from .config import ToyConfig
from .model import NAME, Toy, frozen_weight

__all__ = ["batch_plan", "dp_batch_plan", "train_batched", "train_sequential", "train_reference"]


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


def dp_batch_plan(n: int, cfg: ToyConfig, seed: int) -> tuple[Tensor, Tensor]:
    """Under DP: ``local_steps`` Poisson batches (each of the n samples joins with probability
    batch / n), zero-padded to the largest one with a validity mask; ``dp_sampling="shuffle"`` keeps
    the non-DP plan. Every engine draws them here, so they see the same data."""
    if cfg.dp_sampling == "shuffle":
        return batch_plan(n, cfg, seed)
    from fedlora.dp import poisson_batches

    rows = poisson_batches(n, min(1.0, cfg.batch_size / n), cfg.local_steps, derive_seed(seed, "dp-batches"))
    width = max(1, max(len(r) for r in rows))
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for t, r in enumerate(rows):
        idx[t, :len(r)], valid[t, :len(r)] = torch.from_numpy(r), True
    return idx, valid


def _dp_noise(plans, tasks) -> Optional[list]:
    """Per client a seeded generator and the noise std on the summed clipped gradient (None: no noise)."""
    out = []
    for t in tasks:
        std = plans[t.client].noise_std
        out.append((torch.Generator().manual_seed(derive_seed(t.seed, "dp-noise")), std) if std > 0 else None)
    return out if any(out) else None


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
    K = len(tasks)
    ids = torch.tensor([t.client for t in tasks])
    sizes = [toy.sizes[t.client] for t in tasks]
    dp = toy.dp is not None
    plans = [(dp_batch_plan if dp else batch_plan)(n, cfg, t.seed) for n, t in zip(sizes, tasks)]
    S = max(p[0].shape[0] for p in plans)
    b = max(p[0].shape[1] for p in plans)  # the batch size; under Poisson sampling the largest batch drawn
    idx = torch.zeros(K, S, b, dtype=torch.long)
    valid = torch.zeros(K, S, b, dtype=torch.bool)
    for k, (i, v) in enumerate(plans):
        idx[k, :len(i), :i.shape[1]], valid[k, :len(v), :v.shape[1]] = i, v
    active = valid.any(-1)  # (K, S): a client with fewer steps sits out the tail
    if dp:  # every DP step counts, an empty Poisson batch too (a noise-only step)
        active = torch.arange(S)[None, :] < torch.tensor([len(p[0]) for p in plans])[:, None]
    lo = int(ids[0])
    if ids.tolist() == list(range(lo, lo + K)):  # consecutive clients (all of them, or one of a chain)
        X, y = toy.X[lo:lo + K], toy.y[lo:lo + K]  # a view: no copy of the shards (200 MB per round)
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
    if dp:
        clip = toy.dp[tasks[0].client].max_grad_norm
        noise = _dp_noise(toy.dp, tasks)
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
        if dp:  # per-sample gradients, clipped: each row's weight is min(1, C/‖g_i‖) / (q n)
            gpre = (delta @ toy.W_out) * (pre > 0)  # (K, b, h): ∂ℓ_i/∂pre_i, one sample's own loss
            gpre = gpre * _dp_weights(gpre, xb, z if not full else None, B if not full else None,
                                      s if not full else 1.0, trains, v, clip, cfg.batch_size).unsqueeze(-1)
        else:
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
        if dp and noise is not None:
            _add_noise(grads, noise, cfg.batch_size)
        opt.step(params, grads, active[:, t])

    steps = active.sum(1).double()
    results = []
    for k, t in enumerate(tasks):
        p = W[k].clone() if full else LoRAFactors(A=A[k].clone(), B=B[k].clone(), scale=s)
        results.append(ClientResult(params={NAME: p}, num_samples=sizes[k],
                                    metrics={"train_loss": float(loss_sum[k] / steps[k])}))
    return results


def _dp_weights(gpre: Tensor, xb: Optional[Tensor], z: Optional[Tensor], B: Optional[Tensor], s: float,
                trains: str, valid: Tensor, clip: float, batch: int) -> Tensor:
    """(K, b) weights ``min(1, C / (‖g_i‖ + 1e-6)) / batch`` (0 on padding) from per-sample norms,
    never forming the per-sample gradients: each is an outer product, so its norm is a product of norms.

        W (full):  g_i = gpre_i x_iᵀ            ‖g_i‖ = ‖gpre_i‖ ‖x_i‖
        A:         g_i = s (Bᵀ gpre_i) x_iᵀ      ‖g_i‖ = s ‖Bᵀ gpre_i‖ ‖x_i‖
        B:         g_i = s gpre_i z_iᵀ, z = A x  ‖g_i‖ = s ‖gpre_i‖ ‖z_i‖
    and the norm over every trained parameter is the root of the summed squares (Opacus's ``flat`` clipping).
    """
    from fedlora.dp import clip_factors

    sq = torch.zeros_like(gpre[..., 0])
    if trains == "W":
        sq = gpre.pow(2).sum(-1) * xb.pow(2).sum(-1)
    if "A" in trains:
        sq = sq + s * s * (gpre @ B).pow(2).sum(-1) * xb.pow(2).sum(-1)
    if "B" in trains:
        sq = sq + s * s * gpre.pow(2).sum(-1) * z.pow(2).sum(-1)
    return clip_factors(sq.sqrt(), clip) * valid.to(gpre.dtype) / batch


def _add_noise(grads: list[Tensor], noise: list, batch: int) -> None:
    """Add N(0, std²) to each client's summed gradient, divided by the expected batch size like the rest
    (Opacus's order: parameter by parameter, A before B, from the client's own generator)."""
    for k, nk in enumerate(noise):
        if nk is None:
            continue
        gen, std = nk
        for g in grads:
            g[k] += torch.normal(0.0, std, size=g.shape[1:], generator=gen, dtype=g.dtype) / batch


def train_sequential(task: ClientTask, toy: Toy, cfg: ToyConfig) -> ClientResult:
    """The same hand-written math for one client (K = 1): the baseline that batching is timed against."""
    return train_batched([task], toy, cfg)[0]


def train_reference(task: ClientTask, toy: Toy, cfg: ToyConfig) -> ClientResult:
    """Plain and slow: autograd through ``ReLU(x (W_f + s B A)ᵀ + c) W_outᵀ``, ``torch.optim``, one client.
    Under DP: Opacus on the same network as modules (``_ToyNet``)."""
    if toy.dp is not None:
        return _train_reference_dp(task, toy, cfg)
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
    return ClientResult(params={NAME: p}, num_samples=n, metrics={"train_loss": sum(losses) / max(len(losses), 1)})


class _ToyNet(torch.nn.Module):
    """The toy as modules Opacus can take per-sample gradients of: ``x → A → B`` (``lora_A``, ``lora_B``,
    nn.Linear without bias) plus the frozen ``x W_fᵀ + c``, then ReLU and the fixed ``W_out``; or one
    trainable ``nn.Linear`` holding W (``full``)."""

    def __init__(self, toy: Toy, g0: GlobalMatrix, trains: str):
        super().__init__()
        self.W_out, self.c = toy.W_out, toy.c
        if trains == "W":
            self.dense = torch.nn.Linear(784, g0.W.shape[0], bias=False, dtype=g0.W.dtype)
            self.dense.weight.data.copy_(g0.W)
            self.Wf = None
        else:
            A, B = g0.lora.A, g0.lora.B
            self.lora_A = torch.nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=A.dtype)
            self.lora_B = torch.nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=B.dtype)
            self.lora_A.weight.data.copy_(A)
            self.lora_B.weight.data.copy_(B)
            self.lora_A.weight.requires_grad_("A" in trains)
            self.lora_B.weight.requires_grad_("B" in trains)
            self.s, self.Wf = g0.lora.scale, frozen_weight(toy, g0)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "dense"):
            pre = self.dense(x)
        else:
            pre = self.s * self.lora_B(self.lora_A(x)) + (x @ self.Wf.T if self.Wf is not None else 0)
        if self.c is not None:
            pre = pre + self.c
        return torch.relu(pre) @ self.W_out.T


def _train_reference_dp(task: ClientTask, toy: Toy, cfg: ToyConfig) -> ClientResult:
    """DP-SGD through Opacus (``GradSampleModule`` per-sample gradients, ``DPOptimizer`` clipping and
    noise) on the same Poisson batches and noise seed as the batched engine: the check it is held to."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    import warnings

    g0, n, plan = task.start[NAME], toy.sizes[task.client], toy.dp[task.client]
    X, y = toy.X[task.client, :n], toy.y[task.client, :n]
    net = _ToyNet(toy, g0, task.trains)
    params = [p for p in net.parameters() if p.requires_grad]
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    base = torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.lr)
    clip = plan.max_grad_norm if plan.max_grad_norm != float("inf") else 1e30
    opt = DPOptimizer(base, noise_multiplier=plan.noise_multiplier if plan.noise_std else 0.0, max_grad_norm=clip,
                      expected_batch_size=cfg.batch_size, loss_reduction="mean",
                      generator=torch.Generator().manual_seed(derive_seed(task.seed, "dp-noise")))
    idx, valid = dp_batch_plan(n, cfg, task.seed)
    losses = []
    for i, v in zip(idx, valid):
        rows = i[v]
        opt.zero_grad()
        if len(rows) == 0:  # an empty Poisson batch: a noise-only step
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            loss = F.cross_entropy(gsm(X[rows]), y[rows])  # mean over the batch: Opacus rescales by its size
            with warnings.catch_warnings():  # the hooked modules' inputs need no grad: expected here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            losses.append(float(loss.detach()))
        opt.step()
    gsm._close()
    if task.trains == "W":
        p = net.dense.weight.detach().clone()
    else:
        p = LoRAFactors(A=net.lora_A.weight.detach().clone(), B=net.lora_B.weight.detach().clone(), scale=net.s)
    return ClientResult(params={NAME: p}, num_samples=n, metrics={"train_loss": sum(losses) / max(len(losses), 1)})
