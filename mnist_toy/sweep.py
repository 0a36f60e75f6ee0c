"""Sweeps: a learning-rate grid tuned the same way for every method, then the evaluation seeds.

For every (local work, client setting, method) cell: run each lr of the grid once on the tuning seed,
keep the lr with the best final *validation* accuracy (held out of the training set; the test set is
never used to choose), then run every evaluation seed at that lr. One JSON per run; a run whose JSON
exists is skipped, so an interrupted sweep resumes by re-running the same command.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from fedlora.checkpoint import atomic_write_json

from .config import CENTRALISED, ToyConfig
from .data import Mnist
from .run import run, run_filename

__all__ = ["Sweep", "PRESETS", "run_sweep", "MAIN_METHODS"]

MAIN_METHODS = ("fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "flora", "full")


@dataclass(frozen=True)
class Work:
    """Local work per round and the rounds it is given (heavier local work gets fewer rounds)."""

    local_steps: int = 20
    local_epochs: int = 0
    rounds: int = 100


@dataclass(frozen=True)
class Sweep:
    name: str
    methods: tuple[str, ...] = MAIN_METHODS
    settings: tuple[tuple[int, int], ...] = ((10, 1), (5, 2))  # (clients, labels per client)
    works: tuple[Work, ...] = (Work(20, 0, 100), Work(0, 1, 50), Work(0, 5, 20))
    ranks: tuple[int, ...] = (8,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3)  # the start of the grid, the same for every method
    lr_extend: tuple[float, ...] = (0.01, 1.0)  # tried (once each) when the best lr sits at that edge of the grid
    tune_seed: int = 100  # never one of the evaluation seeds
    tune_setting_only: Optional[tuple[int, int]] = (10, 1)  # tune here, reuse the lr for the other settings
    centralised: bool = True
    base: dict = dataclasses.field(default_factory=dict)  # extra ToyConfig fields for every run

    def cells(self):
        """(work, setting or None for centralised, method, rank) in the order they run: the first
        setting (10 × 1 label, the paper's headline) for every local work, then centralised, then the rest."""
        settings = list(self.settings[:1]) + ([None] if self.centralised else []) + list(self.settings[1:])
        for rank in self.ranks:
            for setting in settings:
                for work in self.works:
                    for method in (self.methods if setting is not None else (CENTRALISED,)):
                        yield work, setting, method, rank


PRESETS = {
    # The main table: 3 local-work settings × 8 rules × 2 label-skew settings (+ centralised), 5 seeds.
    "main": Sweep(name="main"),
    # Accuracy vs rank at the cheapest local work, 10 × 1 label only, 3 seeds. It starts at rank 2:
    # at rank 1 the bias-free toy can only predict two classes (see model.py).
    # Rank 8 comes from the main sweep (same setting and schedule); figures pool them.
    "rank": Sweep(name="rank", methods=("fedavg", "ffa", "rolora"), settings=((10, 1),),
                  works=(Work(20, 0, 100),), ranks=(2, 4, 16), seeds=(0, 1, 2), centralised=False),
    # The published re-implementation's schedule (rank 16, 100 rounds × 5 local epochs, SGD lr 0.02, no
    # tuning) for the three methods it reports, to check the claim in its own setting.
    "paper": Sweep(name="paper", methods=("fedavg", "ffa", "rolora"), settings=((10, 1),), works=(Work(0, 5, 100),),
                   ranks=(16,), lr_grid=(0.02,), lr_extend=(), centralised=False),
    # `make reproduce`: minutes, not hours. Same code path, fewer rounds/seeds/methods, smaller grid.
    "quick": Sweep(name="quick", methods=("fedavg", "ffa", "rolora", "fedex", "flora", "full"), settings=((10, 1),),
                   works=(Work(20, 0, 30),), ranks=(8,), seeds=(0, 1), lr_grid=(0.1, 0.3), lr_extend=()),
}


def _cfg(sweep: Sweep, work: Work, setting, method: str, rank: int, *, lr: float, seed: int) -> ToyConfig:
    clients, lpc = setting if setting is not None else (10, 1)  # centralised: budget of 10 clients
    return ToyConfig(method=method, partition="labels", clients=clients, labels_per_client=lpc, rank=rank,
                     rounds=work.rounds, local_steps=work.local_steps, local_epochs=work.local_epochs,
                     lr=lr, seed=seed, **sweep.base)


def _cell_dir(out: Path, sweep: Sweep, cfg: ToyConfig) -> Path:
    setting = cfg.setting.replace(" ", "_")
    return out / "mnist_toy" / sweep.name / setting / cfg.local_work.replace(" ", "")


def _run_or_load(cfg: ToyConfig, path: Path, data: Mnist, extra: dict) -> dict:
    if path.exists():
        with open(path) as f:
            rec = json.load(f)
        if rec.get("complete"):
            return rec
    return run(cfg, data=data, out=path, progress=False, extra=extra)


def _tune(sweep: Sweep, probe: ToyConfig, where: Path, data: Mnist) -> tuple[float, dict]:
    """Best lr by final validation accuracy on the tuning seed; the grid grows past an edge if the best
    lr sits there (one step each way, ``lr_extend``). Ties go to the smaller lr."""
    grid, tuned = sorted(sweep.lr_grid), {}
    if len(grid) == 1 and not sweep.lr_extend:  # a fixed lr (e.g. a published one): nothing to tune
        return grid[0], {}
    lo = sorted(x for x in sweep.lr_extend if x < grid[0])[::-1]
    hi = sorted(x for x in sweep.lr_extend if x > grid[-1])
    while True:
        for lr in grid:
            if lr not in tuned:
                cfg = dataclasses.replace(probe, lr=lr)
                rec = _run_or_load(cfg, where / run_filename(cfg), data, {"sweep": sweep.name, "role": "tune"})
                acc = rec["final_val_accuracy"]
                tuned[lr] = acc if acc is not None and acc == acc else -1.0
        best = max(grid, key=lambda lr: (tuned[lr], -lr))
        if best == grid[0] and lo:
            grid.insert(0, lo.pop(0))
        elif best == grid[-1] and hi:
            grid.append(hi.pop(0))
        else:
            return best, {str(k): v for k, v in sorted(tuned.items())}


def _eval_seeds(sweep: Sweep, probe: ToyConfig, cell: Path, seeds, lr: float, tuned: dict, data: Mnist, *,
                source) -> list[float]:
    accs = []
    where = "this setting" if source is None or source == (probe.clients, probe.labels_per_client) else \
        f"{source[0]}x{source[1]} labels"
    for seed in seeds:
        cfg = dataclasses.replace(probe, lr=lr, seed=seed)
        rec = _run_or_load(cfg, cell / run_filename(cfg), data,
                           {"sweep": sweep.name, "role": "eval", "lr_grid": list(sweep.lr_grid) + list(sweep.lr_extend),
                            "tune_seed": sweep.tune_seed, "tune_val_accuracy": tuned, "lr_tuned_on": where})
        if rec["final_test_accuracy"] is not None:  # a diverged seed is reported, not averaged
            accs.append(rec["final_test_accuracy"])
    return accs


def _supersede(cell: Path, probe: ToyConfig, seeds, lr: float) -> None:
    for seed in seeds:
        path = cell / run_filename(dataclasses.replace(probe, lr=lr, seed=seed))
        if path.exists():
            rec = json.loads(path.read_text())
            rec["role"] = "superseded"
            rec["superseded_because"] = "the lr transferred from another setting diverged on some seed; re-tuned here"
            atomic_write_json(path, rec)


def run_sweep(sweep: Sweep, *, out: Path, data: Mnist, seeds: Optional[tuple[int, ...]] = None,
              methods: Optional[tuple[str, ...]] = None, dry_run: bool = False) -> list[dict]:
    """Tune and run every cell; returns a summary row per cell (best lr, final test accuracies)."""
    seeds = seeds or sweep.seeds
    cells = [c for c in sweep.cells() if methods is None or c[2] in methods]
    summary, best_lr, t0 = [], {}, time.perf_counter()
    bar = tqdm(cells, desc=f"sweep {sweep.name}")
    for work, setting, method, rank in bar:
        probe = _cfg(sweep, work, setting, method, rank, lr=sweep.lr_grid[0], seed=sweep.tune_seed)
        cell = _cell_dir(out, sweep, probe)
        bar.set_postfix_str(f"{probe.setting} {probe.local_work} {method} r{rank}")
        if dry_run:
            print(cell / method)
            continue
        tune_key = (work, sweep.tune_setting_only if sweep.tune_setting_only and setting else setting, method, rank)
        if tune_key not in best_lr:
            tcfg = _cfg(sweep, work, tune_key[1], method, rank, lr=sweep.lr_grid[0], seed=sweep.tune_seed)
            best_lr[tune_key] = _tune(sweep, tcfg, _cell_dir(out, sweep, tcfg) / "tune", data)
        best, tuned = best_lr[tune_key]
        accs = _eval_seeds(sweep, probe, cell, seeds, best, tuned, data, source=tune_key[1])
        if len(accs) < len(seeds) and tune_key[1] != setting:
            # The lr tuned on another setting diverged on some seed here: tune this cell on its own
            # setting (same rule), and mark the runs at the transferred lr as superseded.
            _supersede(cell, probe, seeds, best)
            best, tuned = _tune(sweep, probe, cell / "tune", data)
            accs = _eval_seeds(sweep, probe, cell, seeds, best, tuned, data, source=setting)
        summary.append({"setting": probe.setting, "local_work": probe.local_work, "method": method, "rank": rank,
                        "lr": best, "final_test_accuracy": accs})
        tqdm.write(f"{probe.setting:>14} {probe.local_work:>9} r{rank:<2} {method:>12} lr={best:<5g} "
                   f"test acc {sum(accs) / max(len(accs), 1):.4f} ({len(accs)}/{len(seeds)} seeds)  [{time.perf_counter() - t0:.0f}s]")
    return summary
