"""One learning-rate tuning rule for every tier: the lr with the best mean final validation accuracy
over several tuning seeds, on a grid that grows past an edge while the best sits at that edge.

The rule (the MNIST toy's since issue 13, the LLM sweep's since issue 23):

* every lr of the grid runs on every tuning seed (never an evaluation seed); a diverged run scores
  ``DIVERGED`` (-1), below any accuracy, so an lr that diverges on one seed loses to a stable one;
* the best lr has the highest *mean* over the tuning seeds; ties go to the smaller lr;
* while the best sits at an edge of the grid, the grid grows one step past that edge: ``lr / factor``
  or ``lr × factor`` within ``bounds`` when a factor is given, else the next value of ``extend`` on
  that side; the search stops when the best is interior or that edge can grow no further;
* a single-lr grid with no extension and no factor is a fixed (e.g. published) lr: chosen at once.

``tune_step`` is pure: it replays the (deterministic) growth of the grid from the finished runs alone,
so a resumed sweep, which reloads its finished runs, reaches the same decision as an uninterrupted one.
A caller loops: run what ``todo`` names, add the scores to ``done``, call again, until ``chosen``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

__all__ = ["DIVERGED", "LrSearch", "TuneStep", "score", "tune_step"]

DIVERGED = -1.0  # the score of a diverged run: below any accuracy


def score(val_accuracy: Optional[float], diverged: bool = False) -> float:
    """A tuning run's score: its final validation accuracy, or ``DIVERGED`` when it diverged (flagged,
    or no accuracy / NaN). One place decides it, so every tier ranks a diverged run alike."""
    if diverged or val_accuracy is None or val_accuracy != val_accuracy:
        return DIVERGED
    return float(val_accuracy)


def _check_lrs(what: str, lrs: Sequence[float]) -> None:
    bad = [x for x in lrs if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"{what} has {bad[0]!r}: every learning rate must be a finite number > 0")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"{what} repeats a learning rate ({sorted(lrs)}): list each lr once")


@dataclass(frozen=True)
class LrSearch:
    """What to search: the start ``grid``; how it grows past an edge, either by ``factor`` (> 1, kept
    within ``bounds``) or, without a factor, through the ``extend`` values (each side in turn, nearest
    first). With a factor, ``extend`` is not used (the tiers' ``lr_factor`` is "instead of lr_extend").
    The grid is stored sorted; nonsense (an empty grid, an lr <= 0, a factor <= 1, bounds out of
    order, an extension inside the start grid that could never be tried) is refused here, before any run."""

    grid: tuple[float, ...]
    extend: tuple[float, ...] = ()
    factor: Optional[float] = None
    bounds: tuple[float, float] = (1e-4, 10.0)

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("the lr grid is empty: give at least one learning rate (one lr with no extension "
                             "and no factor is a fixed lr)")
        _check_lrs("the lr grid", tuple(self.grid))
        _check_lrs("the lr extension", tuple(self.extend))
        object.__setattr__(self, "grid", tuple(sorted(self.grid)))
        object.__setattr__(self, "extend", tuple(self.extend))
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"lr factor {self.factor!r}: the grid grows by lr × factor, so give a factor > 1 "
                             f"(or None to grow through the extension list)")
        lo, hi = self.bounds
        if not (0 < lo <= hi):
            raise ValueError(f"lr bounds {self.bounds!r}: give (low, high) with 0 < low <= high")
        inside = [x for x in self.extend if self.grid[0] <= x <= self.grid[-1]]
        if inside and self.factor is None:
            raise ValueError(f"lr extension {inside[0]!r} lies within the start grid {list(self.grid)}: it would "
                             f"never be tried; put it in the grid or drop it")

    @property
    def fixed(self) -> bool:
        """One lr and no way to grow: a fixed lr, nothing to tune."""
        return len(self.grid) == 1 and not self.extend and not self.factor

    def next_lr(self, grid: Sequence[float], best: float) -> Optional[float]:
        """The lr to add when ``best`` sits at an edge of the sorted ``grid`` (the low edge first); None
        when it is interior or that edge can grow no further (the factor's bounds, or no extension left)."""
        if self.factor:
            lo, hi = self.bounds
            below, above = grid[0] / self.factor, grid[-1] * self.factor
            below, above = (below if below >= lo else None), (above if above <= hi else None)
        else:
            below = max((x for x in self.extend if x < grid[0]), default=None)
            above = min((x for x in self.extend if x > grid[-1]), default=None)
        if best == grid[0] and below is not None:
            return below
        if best == grid[-1] and above is not None:
            return above
        return None


class TuneStep(NamedTuple):
    """What ``tune_step`` decided: the (lr, seed) runs still needed (``todo``), or, once none are,
    the ``chosen`` lr and the whole search as ``table`` (``{}`` while runs remain, and for a fixed lr)."""

    todo: list[tuple[float, int]]
    chosen: Optional[float]
    table: dict


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise ValueError("no tuning seeds: give at least one (never an evaluation seed)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"tuning seeds {list(seeds)} repeat a seed: list each seed once")


def _table(grid: Sequence[float], seeds: Sequence[int], done: Mapping[float, Mapping[int, float]],
           mean: Mapping[float, float]) -> dict:
    """``{"<lr:g>": {"mean_val_accuracy": m, "val_accuracy": {"<seed>": v}}}`` over the grid, lrs and
    seeds ascending (the toy's record format since issue 13)."""
    return {f"{lr:g}": {"mean_val_accuracy": mean[lr], "val_accuracy": {str(s): done[lr][s] for s in sorted(seeds)}}
            for lr in sorted(grid)}


def tune_step(search: LrSearch, seeds: Sequence[int], done: Mapping[float, Mapping[int, float]]) -> TuneStep:
    """Replay the search from ``done`` (lr -> {seed: score}, see ``score``) and say what comes next.

    Returns ``TuneStep(todo, None, {})`` while runs are missing (every seed of the newest grid, lrs
    ascending, seeds in the given order), else ``TuneStep([], lr, table)`` with the chosen lr and the
    whole search. Scores in ``done`` for lrs or seeds the search never asked for are ignored."""
    _check_seeds(seeds)
    grid = list(search.grid)
    if search.fixed:
        return TuneStep([], grid[0], {})
    while True:
        todo = [(lr, s) for lr in grid for s in seeds if s not in done.get(lr, {})]
        if todo:
            return TuneStep(todo, None, {})
        mean = {lr: sum(done[lr][s] for s in seeds) / len(seeds) for lr in grid}
        best = max(grid, key=lambda lr: (mean[lr], -lr))
        nxt = search.next_lr(grid, best)
        if nxt is None:
            return TuneStep([], best, _table(grid, seeds, done, mean))
        grid = sorted(grid + [nxt])
