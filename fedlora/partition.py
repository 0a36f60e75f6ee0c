"""Split a dataset's indices among clients, with an explicit seed.

Every partitioner returns a ``Partition``: one sorted index array per client (disjoint; complete
unless a sample budget is asked for) and a summary with the samples and label histogram per client.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["Partition", "iid", "dirichlet", "k_labels", "shards", "quantity_skew", "make_partition"]


@dataclass(frozen=True)
class Partition:
    indices: list[np.ndarray]  # client k's sample indices, sorted
    summary: dict  # scheme, parameters, samples per client, label histogram per client


def _finish(labels: np.ndarray, parts: Sequence[np.ndarray], scheme: str, **params) -> Partition:
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1 if labels.size else 0
    idx = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    hist = [np.bincount(labels[i], minlength=classes).tolist() for i in idx]
    summary = {"scheme": scheme, **params, "num_clients": len(idx), "samples": [int(i.size) for i in idx],
               "label_histogram": hist}
    return Partition(indices=idx, summary=summary)


def _check(labels, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"labels must be a 1-D array of non-negative integers; got shape {labels.shape}, dtype {labels.dtype}")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients}; need at least 1")
    if labels.size < num_clients:
        raise ValueError(f"{labels.size} samples cannot fill {num_clients} clients; use fewer clients")
    return labels


def iid(labels, num_clients: int, *, seed: int) -> Partition:
    """A uniformly random split into near-equal parts."""
    labels = _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(labels.size)
    return _finish(labels, np.array_split(perm, num_clients), "iid", seed=seed)


def dirichlet(labels, num_clients: int, *, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100) -> Partition:
    """Label skew: for each class, client shares ~ Dirichlet(α·1) (Hsu et al., 2019). Small α: skewed.

    Redraws (from the same seeded generator) until every client has ``min_size`` samples.
    """
    labels = _check(labels, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha={alpha}; the Dirichlet concentration must be > 0 (e.g. 0.1 skewed, 100 near IID)")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        out = [np.concatenate(p) for p in parts]
        if min(o.size for o in out) >= min_size:
            return _finish(labels, out, "dirichlet", alpha=alpha, seed=seed)
    raise ValueError(f"Dirichlet(alpha={alpha}) left a client with < {min_size} samples after {max_tries} draws; "
                     "raise alpha or lower min_size")


def k_labels(labels, num_clients: int, *, labels_per_client: int, seed: int) -> Partition:
    """Pathological label skew (McMahan et al., 2017): each client holds exactly ``labels_per_client`` classes.

    Each class is cut into equal shards; client k takes shards k, k+K, k+2K, … of the class-ordered
    shard list, so its classes are distinct whenever K ≥ shards per class. 10 clients × 1 label gives
    every client one whole class; 5 × 2 gives every client two whole classes.
    """
    labels = _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    total = num_clients * labels_per_client
    if labels_per_client < 1 or labels_per_client > classes.size:
        raise ValueError(f"labels_per_client={labels_per_client}; choose 1..{classes.size}")
    if total % classes.size:
        raise ValueError(f"{num_clients} clients × {labels_per_client} labels = {total} shards cannot be shared "
                         f"equally by {classes.size} classes; make it a multiple of {classes.size}")
    per_class = total // classes.size
    if per_class > num_clients:
        raise ValueError(f"{per_class} shards per class exceed {num_clients} clients: a client would get a class "
                         "twice; use more clients or fewer labels per client")
    shard_list = []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        shard_list.extend(np.array_split(idx, per_class))
    parts = [np.concatenate(shard_list[k::num_clients]) for k in range(num_clients)]
    return _finish(labels, parts, "k_labels", labels_per_client=labels_per_client, seed=seed)


def shards(labels, num_clients: int, *, total: Optional[int], seed: int) -> Partition:
    """Disjoint IID shards drawing ``total`` samples in all, whatever the number of clients (the
    RoLoRA paper's fixed sample budget: 3, 20 or 50 clients share the same data)."""
    labels = _check(labels, num_clients)
    total = labels.size if total is None else int(total)
    if not num_clients <= total <= labels.size:
        raise ValueError(f"total={total}; need num_clients <= total <= {labels.size} samples")
    pick = np.random.default_rng(seed).permutation(labels.size)[:total]
    return _finish(labels, np.array_split(pick, num_clients), "shards", total=total, seed=seed)


def quantity_skew(labels, num_clients: int, *, alpha: float, seed: int, min_size: int = 1) -> Partition:
    """IID labels, client sizes ∝ Dirichlet(α·1): small α gives a few large and many small clients."""
    labels = _check(labels, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha={alpha}; must be > 0")
    if min_size * num_clients > labels.size:
        raise ValueError(f"min_size={min_size} × {num_clients} clients exceeds {labels.size} samples")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.size)
    free = labels.size - min_size * num_clients
    sizes = min_size + np.floor(rng.dirichlet(np.full(num_clients, alpha)) * free).astype(int)
    sizes[-1] += labels.size - sizes.sum()
    return _finish(labels, np.split(perm, np.cumsum(sizes)[:-1]), "quantity_skew", alpha=alpha, seed=seed)


def make_partition(scheme: str, labels, num_clients: int, *, seed: int, alpha: float = 0.5,
                   labels_per_client: int = 1, total: Optional[int] = None) -> Partition:
    """Dispatch by name: ``iid``, ``dirichlet``, ``k_labels``, ``shards``, ``quantity_skew``."""
    if scheme == "iid":
        return iid(labels, num_clients, seed=seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, seed=seed)
    if scheme == "k_labels":
        return k_labels(labels, num_clients, labels_per_client=labels_per_client, seed=seed)
    if scheme == "shards":
        return shards(labels, num_clients, total=total, seed=seed)
    if scheme == "quantity_skew":
        return quantity_skew(labels, num_clients, alpha=alpha, seed=seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; use iid, dirichlet, k_labels, shards or quantity_skew")
