"""The one lr tuning rule (fedlora.tuning): best mean validation accuracy over the tuning seeds, a grid
that grows past an edge while the best sits there, ties to the smaller lr, a diverged run scoring -1,
and a pure step function that replays its decisions from the finished runs alone (resume)."""
from __future__ import annotations

import math

import pytest

from fedlora.tuning import DIVERGED, LrSearch, TuneStep, score, tune_step


def _drive(search, seeds, val):
    """Run the search to its end with ``val(lr, seed)`` as the runs; the runs in order and the last step."""
    done, ran = {}, []
    while True:
        step = tune_step(search, seeds, done)
        if not step.todo:
            return ran, step
        assert len(ran) < 100, "the search does not stop"
        for lr, seed in step.todo:
            ran.append((lr, seed))
            done.setdefault(lr, {})[seed] = score(val(lr, seed))


def _peak(at):
    return lambda lr, seed: 1.0 - abs(math.log2(lr / at))


EXTEND = LrSearch(grid=(1.0, 2.0, 4.0), extend=(16.0, 0.5, 8.0, 0.25))


def test_the_grid_grows_up_through_the_extension_until_the_best_is_interior():
    ran, step = _drive(EXTEND, (0,), _peak(8.0))
    assert [lr for lr, _ in ran] == [1.0, 2.0, 4.0, 8.0, 16.0]  # nearest extension first, one at a time
    assert step.chosen == 8.0 and list(step.table) == ["1", "2", "4", "8", "16"]


def test_the_grid_grows_down_by_the_factor_until_the_best_is_interior():
    search = LrSearch(grid=(0.1, 0.2, 0.4), factor=2.0, bounds=(1e-4, 10.0))
    ran, step = _drive(search, (0,), _peak(0.025))
    assert [lr for lr, _ in ran][3:] == [0.05, 0.025, 0.0125]
    assert step.chosen == 0.025 and step.todo == []


def test_an_interior_best_stops_the_search_at_once():
    ran, step = _drive(EXTEND, (0, 1), _peak(2.0))
    assert ran == [(1.0, 0), (1.0, 1), (2.0, 0), (2.0, 1), (4.0, 0), (4.0, 1)]  # lrs ascending, seeds in order
    assert step.chosen == 2.0 and set(step.table) == {"1", "2", "4"}


def test_ties_go_to_the_smaller_lr():
    flat = {0.25: 0.7, 0.5: 0.7, 1.0: 0.7, 2.0: 0.6, 4.0: 0.5}
    ran, step = _drive(EXTEND, (0,), lambda lr, s: flat[lr])
    assert step.chosen == 0.25  # 0.5 ties 1.0, then 0.25 ties 0.5: the smaller wins, at the edge, each time
    interior = {1.0: 0.6, 2.0: 0.8, 4.0: 0.8}  # 2.0 ties 4.0: the smaller, interior, ends the search
    ran, step = _drive(EXTEND, (0,), lambda lr, s: interior.get(lr, 0.0))
    assert step.chosen == 2.0 and len(ran) == 3


def test_the_best_mean_over_seeds_wins_not_one_lucky_seed():
    vals = {(1.0, 0): 0.5, (1.0, 1): 0.5, (2.0, 0): 0.95, (2.0, 1): 0.55, (4.0, 0): 0.8, (4.0, 1): 0.8,
            (8.0, 0): 0.6, (8.0, 1): 0.6}
    _, step = _drive(EXTEND, (0, 1), lambda lr, s: vals[(lr, s)])
    assert step.chosen == 4.0  # seed 0 alone would pick 2.0
    assert step.table["2"] == {"mean_val_accuracy": pytest.approx(0.75), "val_accuracy": {"0": 0.95, "1": 0.55}}
    assert _drive(EXTEND, (0,), lambda lr, s: vals[(lr, s)])[1].chosen == 2.0


def test_a_diverged_run_scores_minus_one_and_loses():
    assert score(None) == score(float("nan")) == score(0.9, diverged=True) == DIVERGED == -1.0
    assert score(0.25) == 0.25
    # 2.0 is best on seed 0 but diverges on seed 1: its mean (0.99 - 1) / 2 loses to a stable 0.3
    vals = {(1.0, 0): 0.3, (1.0, 1): 0.3, (2.0, 0): 0.99, (2.0, 1): None, (4.0, 0): 0.1, (4.0, 1): 0.1,
            (0.5, 0): 0.2, (0.5, 1): 0.2}
    _, step = _drive(EXTEND, (0, 1), lambda lr, s: vals[(lr, s)])
    assert step.chosen == 1.0 and step.table["2"]["val_accuracy"]["1"] == -1.0


def test_the_bounds_stop_the_factor_growth():
    search = LrSearch(grid=(0.1, 0.2), factor=2.0, bounds=(1e-4, 0.5))
    ran, step = _drive(search, (0,), lambda lr, s: lr)  # always better higher: grows until the bound
    assert [lr for lr, _ in ran] == [0.1, 0.2, 0.4] and step.chosen == 0.4  # 0.8 > 0.5 is never run


def test_a_used_up_extension_keeps_the_edge():
    ran, step = _drive(EXTEND, (0,), lambda lr, s: 1.0 / lr)  # better ever lower
    assert [lr for lr, _ in ran] == [1.0, 2.0, 4.0, 0.5, 0.25] and step.chosen == 0.25
    grid_only = LrSearch(grid=(1.0, 2.0))  # no extension, no factor: the grid as given
    assert _drive(grid_only, (0,), lambda lr, s: lr)[1].chosen == 2.0


@pytest.mark.parametrize("search", [EXTEND, LrSearch(grid=(0.1, 0.2, 0.4), factor=2.0)])
def test_a_resumed_search_replays_to_the_same_runs_and_choice(search):
    """Any prefix of the finished runs (a sweep stopped there and reloaded them) gives, from there on,
    exactly the runs and the choice of the uninterrupted search."""
    val = _peak(search.grid[-1] * 4)
    ran, final = _drive(search, (3, 1), val)
    for cut in range(len(ran) + 1):
        done: dict = {}
        for lr, seed in ran[:cut]:
            done.setdefault(lr, {})[seed] = score(val(lr, seed))
        rest, step = _drive_from(search, (3, 1), val, done)
        assert ran[:cut] + rest == ran and step == final, cut


def _drive_from(search, seeds, val, done):
    ran = []
    while True:
        step = tune_step(search, seeds, done)
        if not step.todo:
            return ran, step
        assert len(ran) < 100, "the search does not stop"
        lr, seed = step.todo[0]  # one run at a time: the pending list must be exactly what remains
        ran.append((lr, seed))
        done.setdefault(lr, {})[seed] = score(val(lr, seed))


def test_runs_the_search_never_asked_for_are_ignored():
    extra = {1.0: {0: 0.1}, 2.0: {0: 0.9, 5: 0.0}, 4.0: {0: 0.1}, 64.0: {0: 1.0}}
    step = tune_step(EXTEND, (0,), extra)
    assert step.chosen == 2.0 and set(step.table) == {"1", "2", "4"}
    assert step.table["2"]["val_accuracy"] == {"0": 0.9}


def test_one_lr_with_no_way_to_grow_is_a_fixed_lr():
    assert tune_step(LrSearch(grid=(0.02,)), (100,), {}) == TuneStep([], 0.02, {})
    assert LrSearch(grid=(0.02,)).fixed and not LrSearch(grid=(0.02,), factor=2.0).fixed
    assert tune_step(LrSearch(grid=(0.02,), extend=(0.01,)), (100,), {}).todo == [(0.02, 100)]


def test_a_factor_replaces_the_extension():
    search = LrSearch(grid=(1.0, 2.0), extend=(3.0,), factor=4.0, bounds=(0.1, 100.0))
    ran, _ = _drive(search, (0,), _peak(8.0))
    assert [lr for lr, _ in ran] == [1.0, 2.0, 8.0, 32.0]


@pytest.mark.parametrize("kw, match", [
    (dict(grid=()), "lr grid is empty"),
    (dict(grid=(0.1, 0.0)), "must be a finite number > 0"),
    (dict(grid=(0.1,), extend=(-1e-3,)), "must be a finite number > 0"),
    (dict(grid=(0.1, float("nan"))), "must be a finite number > 0"),
    (dict(grid=(0.1, 0.1)), "repeats a learning rate"),
    (dict(grid=(0.1,), factor=1.0), "give a factor > 1"),
    (dict(grid=(0.1,), factor=0.5), "give a factor > 1"),
    (dict(grid=(0.1,), factor=2.0, bounds=(1.0, 0.1)), "0 < low <= high"),
    (dict(grid=(0.1, 0.4), extend=(0.2,)), "would never be tried"),
])
def test_nonsense_searches_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LrSearch(**kw)


def test_nonsense_seeds_are_refused():
    with pytest.raises(ValueError, match="no tuning seeds"):
        tune_step(EXTEND, (), {})
    with pytest.raises(ValueError, match="repeat a seed"):
        tune_step(EXTEND, (1, 1), {})
