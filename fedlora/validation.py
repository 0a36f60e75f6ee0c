"""Reject malformed client updates before any state is touched.

Every error names the client and the problem, and says what to fix.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import Tensor

from .factors import ClientUpdate, GlobalMatrix

__all__ = ["UpdateError", "NonFiniteUpdateError", "normalize_weights", "validate_updates", "validate_dense"]


class UpdateError(ValueError):
    """A client update or weight that the server refuses; the global state is left unchanged.

    ``client`` is the id of the client at fault (``None`` when no single client is), as data: the
    round loop drops that client under ``on_bad_update="drop"`` without reading the message.
    """

    def __init__(self, message: str, *, client=None, position: Optional[int] = None):
        super().__init__(message)
        self.client = client
        self.position = position


class NonFiniteUpdateError(UpdateError):
    """A client sent NaN/Inf: usually its local training diverged (learning rate too large)."""


def _who(k: int, client_ids: Optional[Sequence]) -> str:
    return f"client {client_ids[k]!r} (position {k})" if client_ids is not None else f"client {k}"


@contextmanager
def _blame(k: int, client_ids: Optional[Sequence]):
    """Any ``UpdateError`` raised while checking client ``k`` names that client as data."""
    try:
        yield
    except UpdateError as err:
        err.client, err.position = (client_ids[k] if client_ids is not None else k), k
        raise


def normalize_weights(weights, num_clients: int, *, client_ids: Optional[Sequence] = None) -> Tensor:
    """Validate raw weights (sample counts, or any non-negative numbers) and return ``p`` with Σ p = 1."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != num_clients:
        raise UpdateError(f"got {w.numel()} weights for {num_clients} client updates; pass one weight per client")
    for k in range(num_clients):
        with _blame(k, client_ids):
            if not torch.isfinite(w[k]):
                raise UpdateError(f"{_who(k, client_ids)} has a non-finite weight {float(w[k])}; weights must be finite")
            if w[k] < 0:
                raise UpdateError(f"{_who(k, client_ids)} has a negative weight {float(w[k])}; weights must be >= 0")
    total = float(w.sum())
    if total <= 0:
        raise UpdateError("all client weights are zero; at least one client must carry weight (e.g. its sample count)")
    return w / total


def validate_updates(state: GlobalMatrix, updates: Sequence[ClientUpdate], trains: str, *,
                     per_client_rank: bool = False, client_ids: Optional[Sequence] = None,
                     name: str = "matrix") -> None:
    """Check what each client sent against what the round trains and the global's shapes.

    ``trains`` is ``"AB"``, ``"A"``, ``"B"`` or ``"W"``. Only the trained fields may be present; each
    must be finite, floating point, of the global's (m, n) and rank (unless ranks are per client).
    """
    if len(updates) == 0:
        raise UpdateError(f"{name}: no client updates in this round; sample at least one client")
    g_rank = state.lora.rank if (state.lora is not None and not per_client_rank) else None
    g_scale = state.lora.scale if (state.lora is not None and not per_client_rank) else None
    for k, u in enumerate(updates):
        with _blame(k, client_ids):
            _check_update(u, f"{name}: {_who(k, client_ids)}", state.shape, set(trains), g_rank, g_scale)


def _check_update(u, who: str, shape: tuple[int, int], want: set, g_rank: Optional[int],
                  g_scale: Optional[float]) -> None:
    m, n = shape
    if not isinstance(u, ClientUpdate):
        raise UpdateError(f"{who} sent a {type(u).__name__}, expected fedlora.ClientUpdate")
    sent = set(u.fields())
    if sent != want:
        raise UpdateError(f"{who} sent {sorted(sent) or 'nothing'} but this round trains {sorted(want)}; "
                          f"send exactly the trained factors")
    for field, t in u.fields().items():
        _check_tensor(t, f"{who}: {field}")
    if u.W is not None and tuple(u.W.shape) != (m, n):
        raise UpdateError(f"{who}: W has shape {tuple(u.W.shape)}, expected ({m}, {n})")
    if u.A is not None:
        if u.A.ndim != 2 or u.A.shape[1] != n:
            raise UpdateError(f"{who}: A has shape {tuple(u.A.shape)}, expected (r, {n}) for a {m}×{n} weight")
        if g_rank is not None and u.A.shape[0] != g_rank:
            raise UpdateError(f"{who}: A has rank {u.A.shape[0]}, the global adapter has rank {g_rank}")
    if u.B is not None:
        if u.B.ndim != 2 or u.B.shape[0] != m:
            raise UpdateError(f"{who}: B has shape {tuple(u.B.shape)}, expected ({m}, r) for a {m}×{n} weight")
        if g_rank is not None and u.B.shape[1] != g_rank:
            raise UpdateError(f"{who}: B has rank {u.B.shape[1]}, the global adapter has rank {g_rank}")
    if u.A is not None and u.B is not None and u.A.shape[0] != u.B.shape[1]:
        raise UpdateError(f"{who}: A has rank {u.A.shape[0]} but B has rank {u.B.shape[1]}")
    if g_scale is not None and u.scale != g_scale:
        raise UpdateError(f"{who}: scale {u.scale} differs from the global's {g_scale}; use one alpha/r")


def _check_tensor(t: Tensor, what: str) -> None:
    """Floating point and finite: the checks every uploaded tensor gets."""
    if not torch.is_floating_point(t):
        raise UpdateError(f"{what} has dtype {t.dtype}; send floating-point tensors")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteUpdateError(f"{what} has {bad} NaN/Inf entries; the client diverged, lower its learning rate")


def validate_dense(state: Tensor, updates: Sequence, *, client_ids: Optional[Sequence] = None,
                   name: str = "parameter") -> None:
    """A dense parameter (a task head, say) as sent by each client: a finite floating-point tensor of
    the global's shape."""
    if len(updates) == 0:
        raise UpdateError(f"{name}: no client updates in this round; sample at least one client")
    for k, t in enumerate(updates):
        who = f"{name}: {_who(k, client_ids)}"
        with _blame(k, client_ids):
            if not isinstance(t, Tensor):
                raise UpdateError(f"{who} sent a {type(t).__name__}, expected a torch.Tensor")
            if tuple(t.shape) != tuple(state.shape):
                raise UpdateError(f"{who}: shape {tuple(t.shape)}, expected {tuple(state.shape)}")
            _check_tensor(t, who)
