"""Reject malformed client updates before any state is touched.

Every error names the client and the problem, and says what to fix.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import Tensor

from .factors import ClientUpdate, GlobalMatrix

__all__ = ["UpdateError", "NonFiniteUpdateError", "normalize_weights", "validate_updates", "validate_dense",
           "validate_result", "state_dtype", "magnitude_limit"]


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
    """A client sent NaN/Inf, or factor entries so large that B·A would overflow: its local training
    diverged (learning rate too large). Sweeps score such a run as diverged rather than stopping."""


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
    if weights is None or isinstance(weights, (str, bytes, dict)):
        raise UpdateError(f"weights={weights!r}; pass one number per client update (e.g. their sample counts)")
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # Overflow: an int beyond float64
        raise UpdateError(f"weights of type {type(weights).__name__} are not a sequence of numbers ({err}); "
                          "pass one number per client update (e.g. their sample counts)") from None
    if w.numel() != num_clients:
        raise UpdateError(f"got {w.numel()} weights for {num_clients} client updates; pass one weight per client")
    for k in range(num_clients):
        with _blame(k, client_ids):
            if not torch.isfinite(w[k]):
                raise UpdateError(f"{_who(k, client_ids)} has a non-finite weight {float(w[k])}; weights must be finite")
            if w[k] < 0:
                raise UpdateError(f"{_who(k, client_ids)} has a negative weight {float(w[k])}; weights must be >= 0")
    total = float(w.sum())
    if total == float("inf"):  # finite weights whose sum overflows: scale them down first, p is unchanged
        w = w / w.max()
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
    dtype = state_dtype(state)
    for k, u in enumerate(updates):
        with _blame(k, client_ids):
            _check_update(u, f"{name}: {_who(k, client_ids)}", state.shape, set(trains), g_rank, g_scale, dtype)
            if dtype is None:  # no global tensor yet (FLoRA's first round): the first client sets it
                dtype = next(iter(u.fields().values())).dtype


def state_dtype(state: GlobalMatrix) -> Optional[torch.dtype]:
    """The dtype every upload must have: the global's (its W, adapter or base)."""
    for t in (state.W, state.lora.A if state.lora is not None else None):
        if t is not None:
            return t.dtype
    base = state.base
    if base is not None:
        return (base.M if hasattr(base, "M") else base.U).dtype
    return None


def magnitude_limit(dtype: torch.dtype, size: int) -> float:
    """The largest entry an uploaded factor may hold: a product of two factors sums ``size`` terms, so
    entries up to ``sqrt(max / (4 size))`` keep every product, sum and SVD of the round finite."""
    return (torch.finfo(dtype).max / (4 * max(size, 1))) ** 0.5


def _check_update(u, who: str, shape: tuple[int, int], want: set, g_rank: Optional[int],
                  g_scale: Optional[float], dtype: Optional[torch.dtype] = None) -> None:
    m, n = shape
    if not isinstance(u, ClientUpdate):
        raise UpdateError(f"{who} sent a {type(u).__name__}, expected fedlora.ClientUpdate")
    sent = set(u.fields())
    if sent != want:
        raise UpdateError(f"{who} sent {sorted(sent) or 'nothing'} but this round trains {sorted(want)}; "
                          f"send exactly the trained factors")
    scale = u.scale
    if not _is_scale(scale):
        raise UpdateError(f"{who}: scale {scale!r} is not a finite positive number; send the adapter's alpha/r")
    for field, t in u.fields().items():
        _check_tensor(t, f"{who}: {field}", dtype=dtype)
        if field != "W":
            limit = magnitude_limit(t.dtype, max(m, n))
            big = float(t.abs().max()) if t.numel() else 0.0
            if big > limit:
                raise NonFiniteUpdateError(f"{who}: {field} has an entry of magnitude {big:.3g}, beyond {limit:.3g}, the "
                                  f"most a factor can hold before B·A overflows {t.dtype}; the client diverged: "
                                  "lower its learning rate")
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
    for field, t, axis in (("A", u.A, 0), ("B", u.B, 1)):
        if t is not None and t.ndim == 2 and t.shape[axis] == 0:
            raise UpdateError(f"{who}: {field} has rank 0; a client must train an adapter of rank >= 1")
    if u.A is not None and u.B is not None and u.A.shape[0] != u.B.shape[1]:
        raise UpdateError(f"{who}: A has rank {u.A.shape[0]} but B has rank {u.B.shape[1]}")
    if g_scale is not None and u.scale != g_scale:
        raise UpdateError(f"{who}: scale {u.scale} differs from the global's {g_scale}; use one alpha/r")


def _is_scale(scale) -> bool:
    """A finite positive python number that a float can hold (``bool`` is not a scale)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return False
    try:
        return math.isfinite(scale) and scale > 0
    except OverflowError:  # an int beyond the float range
        return False


def _check_tensor(t, what: str, *, dtype: Optional[torch.dtype] = None) -> None:
    """A floating-point torch tensor of the global's dtype, finite: the checks every uploaded tensor gets."""
    if not isinstance(t, Tensor):
        raise UpdateError(f"{what} is a {type(t).__module__}.{type(t).__name__}, not a torch.Tensor; "
                          "convert it with torch.as_tensor before sending")
    if not torch.is_floating_point(t):
        raise UpdateError(f"{what} has dtype {t.dtype}; send floating-point tensors")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteUpdateError(f"{what} has {bad} NaN/Inf entries; the client diverged, lower its learning rate")
    if dtype is not None and t.dtype != dtype:
        raise UpdateError(f"{what} is {t.dtype} but the global is {dtype}; send tensors in the global's dtype "
                          f"(.to({dtype}))")


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
            _check_tensor(t, who, dtype=state.dtype)


def validate_result(result: GlobalMatrix, *, name: str = "matrix") -> None:
    """The backstop after a rule ran on validated input: its new global must be finite (the input
    checks make this hold; a rule that breaks it is refused, and the old global kept)."""
    tensors = [result.W] + ([result.lora.A, result.lora.B] if result.lora is not None else [])
    base = result.base
    if base is not None:
        tensors += [base.M] if hasattr(base, "M") else [base.U, base.V]
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteUpdateError(f"{name}: the aggregate is not finite although every upload was; the round "
                                       "is refused and the global kept (report this as a bug of the rule)")
