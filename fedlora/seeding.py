"""Every random draw derives from the config seed and where it happens (round, client, purpose).

Deriving instead of carrying generator state means a resumed run makes the same draws as an
uninterrupted one by construction, and each client's randomness is independent of sampling order.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and any labels (ints, strings): stable across runs and platforms."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
