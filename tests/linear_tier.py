"""A tiny real tier for loop tests: clients fit Y = X (W0 + s B A)ᵀ by a few seeded SGD steps."""
from __future__ import annotations

import torch

from fedlora import GlobalMatrix, LoRAFactors, init_lora
from fedlora.loop import ClientResult, ClientTask

M, N, R = 6, 5, 2


def make_clients(num_clients: int, seed: int = 0, samples: int = 40):
    g = torch.Generator().manual_seed(seed)
    data = []
    for k in range(num_clients):
        W_star = torch.randn(M, N, generator=g, dtype=torch.float64)
        X = torch.randn(samples + 3 * k, N, generator=g, dtype=torch.float64)
        data.append((X, X @ W_star.T))
    return data


def init_state(rule: str, seed: int = 0, rank: int = R):
    g = torch.Generator().manual_seed(seed)
    if rule.startswith("full"):
        return {"w": GlobalMatrix(W=torch.zeros(M, N, dtype=torch.float64))}
    lora = init_lora(M, N, rank, scale=1.0, generator=g, dtype=torch.float64)
    return {"w": GlobalMatrix(lora=lora)}


def make_local_train(data, steps: int = 3, lr: float = 0.05, batch: int = 8):
    def local_train(task: ClientTask) -> ClientResult:
        X, Y = data[task.client]
        g = torch.Generator().manual_seed(task.seed)
        start = task.start["w"]
        base = start.base.dense() if start.base is not None else 0.0
        if task.trains == "W":
            W = start.W.clone().requires_grad_(True)
            params = [W]
        else:
            A = start.lora.A.clone().requires_grad_("A" in task.trains)
            B = start.lora.B.clone().requires_grad_("B" in task.trains)
            params = [p for p in (A, B) if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr) if params else None  # head-only: nothing here to train
        loss = torch.tensor(0.0)
        for _ in range(steps if opt is not None else 0):
            idx = torch.randint(0, X.shape[0], (batch,), generator=g)
            Weff = W if task.trains == "W" else base + start.lora.scale * B @ A  # (M, N)
            loss = 0.5 * ((X[idx] @ Weff.T - Y[idx]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params_out = W.detach() if task.trains == "W" else LoRAFactors(A=A.detach(), B=B.detach(), scale=start.lora.scale)
        return ClientResult(params={"w": params_out}, num_samples=X.shape[0], metrics={"train_loss": loss.item()})

    return local_train


def make_evaluate(data):
    def evaluate(round_, state):
        d = state["w"].effective_delta()
        return {"loss": float(sum(0.5 * ((X @ d.T - Y) ** 2).sum(1).mean() for X, Y in data) / len(data))}

    return evaluate
