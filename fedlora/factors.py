"""LoRA factor types for one adapted matrix, and the server's view of it.

Notation (SPEC): the frozen weight ``W0`` is ``m × n`` (out × in, as ``nn.Linear.weight``);
a LoRA adapter adds ``ΔW = s · B @ A`` with ``B`` ``m × r`` (zero at init) and ``A`` ``r × n``.
Nothing here knows about modules, state-dict keys or devices: these are plain tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["LoRAFactors", "LowRank", "DenseBase", "ClientUpdate", "GlobalMatrix", "stack_clients", "nbytes", "ModelState"]


def nbytes(t: Optional[Tensor]) -> int:
    """Bytes a tensor occupies on the wire (raw, uncompressed); 0 for ``None``."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class LoRAFactors:
    """One adapted matrix: ``ΔW = scale · B @ A`` (Hu et al., 2021, eq. 3)."""

    A: Tensor  # (r, n) down-projection
    B: Tensor  # (m, r) up-projection
    scale: float = 1.0  # s = alpha / r

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoRA factors need B (m×r) and A (r×n) with the same r; got B {tuple(self.B.shape)}"
                f" and A {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> Tensor:
        return self.scale * (self.B @ self.A)  # (m, n)

    def nbytes(self) -> int:
        return nbytes(self.A) + nbytes(self.B)

    def clone(self) -> "LoRAFactors":
        return LoRAFactors(A=self.A.clone(), B=self.B.clone(), scale=self.scale)


@dataclass(frozen=True)
class LowRank:
    """A matrix kept as a product ``U @ V`` with ``U`` ``m × q`` and ``V`` ``q × n``."""

    U: Tensor  # (m, q)
    V: Tensor  # (q, n)

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != self.V.shape[0]:
            raise ValueError(f"LowRank needs U (m×q) and V (q×n); got {tuple(self.U.shape)}, {tuple(self.V.shape)}")

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def dense(self) -> Tensor:
        return self.U @ self.V  # (m, n)

    def nbytes(self) -> int:
        return nbytes(self.U) + nbytes(self.V)

    def __add__(self, other: "LowRank | DenseBase") -> "LowRank | DenseBase":
        if isinstance(other, DenseBase):
            return other + self
        # U1 V1 + U2 V2 = [U1 U2] [V1; V2]: concatenation is exact; recompress separately.
        return LowRank(U=torch.cat([self.U, other.U], dim=1), V=torch.cat([self.V, other.V], dim=0))


@dataclass(frozen=True)
class DenseBase:
    """A frozen-weight correction held as the ``m × n`` matrix itself.

    FedEx-LoRA's residuals and FLoRA's stacks gain rank every round; once ``q (m + n) ≥ m n`` the
    factored form is the larger and slower one, and ``fedlora.linalg.merge_into_base`` switches to this.
    Same interface as ``LowRank`` (``shape``, ``dense``, ``nbytes``, ``+``).
    """

    M: Tensor  # (m, n)

    def __post_init__(self) -> None:
        if self.M.ndim != 2:
            raise ValueError(f"DenseBase needs an m × n matrix; got shape {tuple(self.M.shape)}")

    @property
    def rank(self) -> int:
        return min(self.M.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.M.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.M.dtype

    def dense(self) -> Tensor:
        return self.M

    def nbytes(self) -> int:
        return nbytes(self.M)

    def __add__(self, other: "LowRank | DenseBase") -> "DenseBase":
        return DenseBase(M=self.M + other.dense())


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploads for one adapted matrix.

    Only what the client trained is present: a RoLoRA B-round sends ``B`` alone, FFA never sends
    ``A``, the full-weight rules send ``W``. Absent fields are ``None`` and cost no bytes.
    """

    A: Optional[Tensor] = None  # (r_k, n)
    B: Optional[Tensor] = None  # (m, r_k)
    W: Optional[Tensor] = None  # (m, n)
    scale: float = 1.0

    def nbytes(self) -> int:
        return nbytes(self.A) + nbytes(self.B) + nbytes(self.W)

    def fields(self) -> dict[str, Tensor]:
        return {k: v for k, v in (("A", self.A), ("B", self.B), ("W", self.W)) if v is not None}


@dataclass(frozen=True)
class GlobalMatrix:
    """The server's state for one adapted matrix.

    The effective weight is ``W0 + base.U @ base.V + lora.scale · lora.B @ lora.A``, or ``W`` for the
    full-weight rules. ``base`` is the server-side correction folded into the frozen weight (the
    FedEx-LoRA residuals, the merged FLoRA stacks), kept factored.
    """

    lora: Optional[LoRAFactors] = None
    base: Optional[LowRank | DenseBase] = None
    W: Optional[Tensor] = None  # (m, n), full-weight rules only

    @property
    def shape(self) -> tuple[int, int]:
        for part in (self.lora, self.base):
            if part is not None:
                return part.shape
        if self.W is not None:
            return tuple(self.W.shape)  # type: ignore[return-value]
        raise ValueError("empty GlobalMatrix has no shape")

    def effective_delta(self) -> Tensor:
        """``base.U @ base.V + s · B @ A`` (m × n) relative to ``W0``; ``W`` itself for full rules."""
        if self.W is not None:
            return self.W
        out = None
        if self.base is not None:
            out = self.base.dense()
        if self.lora is not None:
            d = self.lora.delta()
            out = d if out is None else out + d
        if out is None:
            raise ValueError("empty GlobalMatrix has no delta")
        return out

    def replace(self, **changes) -> "GlobalMatrix":
        return replace(self, **changes)


def stack_clients(factors: Sequence[LoRAFactors]) -> tuple[Tensor, Tensor]:
    """Stack K same-rank clients: returns ``A`` (K, r, n) and ``B`` (K, m, r)."""
    if not factors:
        raise ValueError("stack_clients needs at least one client")
    ranks = {f.rank for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"stack_clients needs equal ranks, got {sorted(ranks)}; keep ragged ranks as a list")
    return torch.stack([f.A for f in factors]), torch.stack([f.B for f in factors])


# A whole model: adapted-matrix name -> its GlobalMatrix; a plain tensor is a dense parameter (a task
# head, say) that every client trains and the server averages, Σ p_k W_k, whatever the rule.
ModelState = Mapping[str, "GlobalMatrix | Tensor"]


def init_lora(m: int, n: int, r: int, *, scale: float, generator: torch.Generator,
              dtype: torch.dtype = torch.float32) -> LoRAFactors:
    """Standard LoRA init: ``B = 0``, ``A ~ U(−1/√n, 1/√n)`` (peft's kaiming-uniform with a=√5)."""
    bound = 1.0 / n ** 0.5
    A = (torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)  # (r, n)
    return LoRAFactors(A=A, B=torch.zeros(m, r, dtype=dtype), scale=scale)
