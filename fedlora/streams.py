"""Each client's training rows as one endless stream that persists across rounds.

Client ``c`` walks seeded permutations of its rows epoch by epoch: epoch ``e`` is the permutation drawn
from ``(seed, "stream", c, e)``. A client-round takes the next ``count`` rows, continuing where its
previous round stopped. Where it stopped is not carried state: it is ``count`` times the number of
earlier rounds the client was scheduled in, which the seeded client sampling fixes, so a resumed run
reads exactly the rows an uninterrupted one reads. Over ``T`` rows taken from ``n``, every row is seen
``⌊T/n⌋`` or ``⌈T/n⌉`` times -- the statement a fresh permutation per round cannot make.

``seen_counts`` counts, for any list of client-round row plans (either kind), how often each row was read.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .seeding import derive_seed

__all__ = ["stream_rows", "prior_participations", "seen_counts", "seen_summary"]


def _epoch(rows: np.ndarray, seed: int, client: int, e: int) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(seed, "stream", client, e))
    return rows[rng.permutation(len(rows))]


def stream_rows(rows: np.ndarray, *, seed: int, client: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of client ``client``'s stream over ``rows``."""
    rows = np.asarray(rows)
    n = len(rows)
    if n == 0:
        raise ValueError(f"client {client} has no rows to stream; give every client at least one row")
    if start < 0 or count < 0:
        raise ValueError(f"stream positions must be >= 0, got start={start}, count={count}")
    if count == 0:
        return rows[:0]
    first, last = start // n, (start + count - 1) // n
    stream = np.concatenate([_epoch(rows, seed, client, e) for e in range(first, last + 1)])
    off = start - first * n
    return stream[off:off + count]


def prior_participations(schedule: Sequence[Iterable[int]], client: int, round_: int) -> int:
    """How many rounds before ``round_`` list ``client`` in ``schedule`` (round -> its clients)."""
    return sum(1 for t in range(round_) if client in schedule[t])


def seen_counts(n_rows: int, plans: Iterable[Sequence[np.ndarray]]) -> np.ndarray:
    """Times each of ``n_rows`` rows was read, over client-round plans (each a list of batches of row ids)."""
    counts = np.zeros(n_rows, dtype=np.int64)
    for plan in plans:
        for batch in plan:
            np.add.at(counts, np.asarray(batch, dtype=np.int64), 1)
    return counts


def seen_summary(counts: np.ndarray) -> dict:
    """Rows seen at least once (count and fraction), and the fewest / most reads of a row."""
    n = len(counts)
    seen = int((counts > 0).sum())
    return {"rows": n, "rows_seen": seen, "fraction_seen": seen / n if n else None,
            "min_reads": int(counts.min()) if n else 0, "max_reads": int(counts.max()) if n else 0,
            "reads": int(counts.sum())}
