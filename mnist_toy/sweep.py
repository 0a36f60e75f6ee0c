"""Sweeps: a learning-rate grid tuned the same way for every method, then the evaluation seeds.

For every (local work, client setting, method) cell: run each lr of the grid on every tuning seed
(never an evaluation seed), keep the lr with the best *mean* final validation accuracy over them (held
out of the training set; the test set is never used to choose), growing the grid past an edge while
the best lr sits there, then run every evaluation seed at that lr. One JSON per run; a run whose JSON
exists is skipped, so an interrupted sweep resumes by re-running the same command.

Settings are ``Setting(clients, partition, labels_per_client)``; a plain ``(clients, labels)`` pair
means the label partition. With ``total_client_steps`` the budget is fixed across settings: every
run gets ``total_client_steps / (clients × local_steps)`` rounds (the RoLoRA paper's 500 / 75 / 30
rounds for 3 / 20 / 50 clients), so more clients means fewer rounds.
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
from fedlora.tuning import LrSearch, score, tune_step

from .config import CENTRALISED, ToyConfig
from .data import Mnist
from .run import run, run_filename

__all__ = ["Sweep", "Setting", "Work", "PRESETS", "run_sweep", "MAIN_METHODS", "SCALING_METHODS"]

MAIN_METHODS = ("fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "flora", "full")
SCALING_METHODS = ("fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "full")
# every rule the toy runs, and the released RoLoRA code's chain applied to each rule it runs (issue 20)
PAPER_SCALING_METHODS = ("fedavg", "ffa", "rolora", "fedex", "flexlora", "flora", "full",
                         "fedavg-chain", "ffa-chain", "rolora-chain")


@dataclass(frozen=True)
class Setting:
    """How the training pool is split: ``clients`` clients, by ``partition`` ("labels": whole classes,
    ``labels_per_client`` each; "dirichlet": Dirichlet(0.5) label skew; "iid": equal random shards);
    and the clients' DP target ``dp_epsilon`` (None: no DP)."""

    clients: int
    partition: str = "labels"
    labels_per_client: int = 1
    dp_epsilon: Optional[float] = None

    @staticmethod
    def of(x) -> "Setting":
        return x if isinstance(x, Setting) else Setting(clients=x[0], labels_per_client=x[1])

    def dir_name(self) -> str:
        if self.partition == "labels":  # the main table's folders: 10x1_labels, 5x2_labels
            name = f"{self.clients}x{self.labels_per_client}_labels"
        else:
            name = f"{self.partition}_c{self.clients}"
        return name if self.dp_epsilon is None else f"{name}_eps{self.dp_epsilon:g}"


@dataclass(frozen=True)
class Work:
    """Local work per round and the rounds it is given (heavier local work gets fewer rounds)."""

    local_steps: int = 20
    local_epochs: int = 0
    rounds: int = 100  # ignored when the sweep fixes ``total_client_steps``


@dataclass(frozen=True)
class Sweep:
    name: str
    methods: tuple[str, ...] = MAIN_METHODS
    settings: tuple = ((10, 1), (5, 2))  # Setting(...)s, or (clients, labels per client) pairs
    works: tuple[Work, ...] = (Work(20, 0, 100), Work(0, 1, 50), Work(0, 5, 20))
    ranks: tuple[int, ...] = (8,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3)  # the start of the grid, the same for every method
    lr_extend: tuple[float, ...] = (0.01, 1.0)  # tried (once each) when the best lr sits at that edge of the grid
    lr_factor: Optional[float] = None  # instead of lr_extend: grow the grid by this factor while the best is at an edge
    lr_bounds: tuple[float, float] = (1e-4, 10.0)  # lr_factor never goes past these
    tune_seeds: tuple[int, ...] = (100,)  # never evaluation seeds; the lr with the best mean over them wins
    tune_setting_only: Optional[tuple[int, int]] = (10, 1)  # tune here, reuse the lr for the other settings
    tune_partition: Optional[str] = None  # tune at the same clients under this partition, reuse for the others
    total_client_steps: Optional[int] = None  # fixed budget: rounds = this / (clients × local_steps)
    evals_per_run: Optional[int] = None  # evaluate every max(1, rounds // this) rounds (None: every round)
    centralised: bool = True
    centralised_clients: int = 10  # centralised does the work of this many clients per round
    centralised_partition: str = "labels"  # how that budget's clients are counted (labels needs 10 | clients)
    axis_clients: Optional[int] = None  # set: works after the first run only at this many clients (an axis)
    base: dict = dataclasses.field(default_factory=dict)  # extra ToyConfig fields for every run

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(Setting.of(x) for x in self.settings))
        self.lr_search  # a nonsensical grid raises now, not hours into the sweep
        if self.total_client_steps is not None:
            for w in self.works:
                for st in list(self.settings) + [Setting(self.centralised_clients)]:
                    self.rounds(w, st.clients)  # raises now, not hours into the sweep

    def rounds(self, work: Work, clients: int) -> int:
        if self.total_client_steps is None:
            return work.rounds
        per_round = clients * work.local_steps
        if work.local_epochs or self.total_client_steps % per_round:
            raise ValueError(f"total_client_steps={self.total_client_steps} is not a whole number of rounds of "
                             f"{clients} clients × {work.local_steps} local steps (epochs cannot be budgeted)")
        return self.total_client_steps // per_round

    @property
    def lr_search(self) -> LrSearch:
        """The lr search every cell of this sweep runs (``fedlora.tuning``)."""
        return LrSearch(self.lr_grid, self.lr_extend, self.lr_factor, self.lr_bounds)

    def tune_setting(self, setting: Optional[Setting]) -> Optional[Setting]:
        """Where the lr used for ``setting`` is tuned (None: centralised, tuned on itself)."""
        if setting is None:
            return None
        if self.tune_partition is not None:
            return dataclasses.replace(setting, partition=self.tune_partition)
        if self.tune_setting_only is not None:
            return Setting.of(self.tune_setting_only)
        return setting

    def cells(self):
        """(work, setting or None for centralised, method, rank) in the order they run: the first
        setting (10 × 1 label, the paper's headline) for every local work, then centralised, then the rest."""
        settings = list(self.settings[:1]) + ([None] if self.centralised else []) + list(self.settings[1:])
        for rank in self.ranks:
            for setting in settings:
                for work in self.works:
                    if self.axis_clients is not None and work != self.works[0] and \
                            (setting is None or setting.clients != self.axis_clients):
                        continue
                    for method in (self.methods if setting is not None else (CENTRALISED,)):
                        yield work, setting, method, rank


# The tuning procedure of the main, rank, scaling and dp presets: a ×2 grid around 0.1, grown one step
# past whichever edge holds the best until the best is interior; the best = mean final validation
# accuracy over 3 tuning seeds (never evaluation seeds). One tuning seed picked by noise (issue 13).
_TUNED = dict(lr_grid=(0.05, 0.1, 0.2), lr_extend=(), lr_factor=2.0, tune_seeds=(100, 101, 102))

PRESETS = {
    # The main table: 3 local-work settings × 8 rules × 2 label-skew settings (+ centralised), 5 seeds.
    # The lr is tuned per (rule, local work) at 10 × 1 label by mean validation accuracy over 3 tuning
    # seeds, on a ×2 grid grown past an edge until the best is interior, and reused for 5 × 2 labels.
    "main": Sweep(name="main", **_TUNED),
    # Accuracy vs rank at the cheapest local work, 10 × 1 label only, 3 seeds. It starts at rank 2:
    # at rank 1 the bias-free toy can only predict two classes (see model.py).
    # Rank 8 comes from the main sweep (same setting and schedule); figures pool them.
    "rank": Sweep(name="rank", methods=("fedavg", "ffa", "rolora"), settings=((10, 1),),
                  works=(Work(20, 0, 100),), ranks=(2, 4, 16), seeds=(0, 1, 2), centralised=False, **_TUNED),
    # The published re-implementation's schedule (rank 16, 100 rounds × 5 local epochs, SGD lr 0.02, no
    # tuning) for the three methods it reports, to check the claim in its own setting.
    "paper": Sweep(name="paper", methods=("fedavg", "ffa", "rolora"), settings=((10, 1),), works=(Work(0, 5, 100),),
                   ranks=(16,), lr_grid=(0.02,), lr_extend=(), centralised=False),
    # `make reproduce`: minutes, not hours. Same code path, fewer rounds/seeds/methods, smaller grid.
    "quick": Sweep(name="quick", methods=("fedavg", "ffa", "rolora", "fedex", "flora", "full"), settings=((10, 1),),
                   works=(Work(20, 0, 30),), ranks=(8,), seeds=(0, 1), lr_grid=(0.1, 0.3), lr_extend=()),
    # The client-scaling claim with the budget fixed: 55,000 training images split over 5 … 100 clients
    # (IID shards or Dirichlet(0.5) label skew), 10,000 client-steps of batch 64 in total (≈ 11.6
    # passes), 10 local steps: 200 / 100 / 50 / 20 / 10 rounds. The lr is tuned per (rule, clients) on
    # the Dirichlet split, by mean validation accuracy over 3 tuning seeds on a ×2 grid grown past an
    # edge until the best is interior, and reused for IID (re-tuned there if it diverges). 20
    # evaluations per run (every round at 10 rounds, every 10th at 200) keep evaluation from dominating.
    "scaling": Sweep(name="scaling", methods=SCALING_METHODS,
                     settings=tuple(Setting(k, p) for p in ("dirichlet", "iid") for k in (5, 10, 20, 50, 100)),
                     works=(Work(10, 0, 0),), total_client_steps=10_000, ranks=(8,), seeds=(0, 1, 2, 3, 4),
                     **_TUNED, tune_setting_only=None, tune_partition="dirichlet", evals_per_run=20),
    # RoLoRA's Table 2 schedule on the toy (issue 20): 3 / 20 / 50 clients × 20 local steps × 500 / 75 / 30
    # rounds = 30,000 client-steps of batch 64 in every run (≈ 35 passes over the 55,000 training images),
    # IID shards and Dirichlet(0.5) label skew, rank 8, every rule and the chained control of each rule
    # the released code runs (fedavg-chain, ffa-chain, rolora-chain), centralised with the same steps
    # (3 clients' work a round). A local-work axis at 50 clients, the budget fixed: 2 / 5 / 20 local
    # steps (300 / 120 / 30 rounds). Tuned as `scaling`: per (rule, clients, local work) on the Dirichlet
    # split, mean validation accuracy over 3 tuning seeds, ×2 grid grown to an interior best; reused for IID.
    # Cost here (one thread): ≈10 s a run for the batched rules, ≈15–20 s for the chained ones (clients one
    # after another); 10 rules × 10 (clients, work) cells × (5 eval + ≈12 tuning runs) ≈ 5 CPU-hours.
    "paper-scaling": Sweep(name="paper_scaling", methods=PAPER_SCALING_METHODS,
                           settings=tuple(Setting(k, p) for p in ("dirichlet", "iid") for k in (3, 20, 50)),
                           works=(Work(20, 0, 0), Work(5, 0, 0), Work(2, 0, 0)), axis_clients=50,
                           total_client_steps=30_000, ranks=(8,), seeds=(0, 1, 2, 3, 4), centralised_clients=3,
                           centralised_partition="iid",
                           **_TUNED, tune_setting_only=None, tune_partition="dirichlet", evals_per_run=20),
    # DP-SGD per client (fedlora.dp) at the main setting (10 × 1 label, 20 steps × 100 rounds, rank 8):
    # ε ∈ {∞ (no DP), 8, 3, 1} at δ = 1e-5 over each client's 2,000 steps, clipping norm C = 1, Poisson
    # batches of 64 on average; the lr tuned per (rule, ε) on 3 tuning seeds, ×2 grid grown past its edges.
    "dp": Sweep(name="dp", methods=("fedavg", "ffa", "rolora", "fedex", "flexlora"),
                settings=tuple(Setting(10, "labels", 1, e) for e in (None, 8.0, 3.0, 1.0)),
                works=(Work(20, 0, 100),), ranks=(8,), seeds=(0, 1, 2), **_TUNED, tune_setting_only=None, centralised=False,
                base=dict(dp_max_grad_norm=1.0, dp_delta=1e-5)),
}


def _cfg(sweep: Sweep, work: Work, setting: Optional[Setting], method: str, rank: int, *, lr: float,
         seed: int) -> ToyConfig:
    st = setting if setting is not None else Setting(sweep.centralised_clients, sweep.centralised_partition)
    rounds = sweep.rounds(work, st.clients)
    every = {"eval_every": max(1, rounds // sweep.evals_per_run)} if sweep.evals_per_run else {}
    return ToyConfig(method=method, partition=st.partition, clients=st.clients, labels_per_client=st.labels_per_client,
                     rank=rank, rounds=rounds, local_steps=work.local_steps, local_epochs=work.local_epochs,
                     lr=lr, seed=seed, dp_epsilon=st.dp_epsilon, **every, **sweep.base)


def _cell_dir(out: Path, sweep: Sweep, setting: Optional[Setting], cfg: ToyConfig) -> Path:
    name = "centralised" if setting is None else setting.dir_name()
    return out / "mnist_toy" / sweep.name / name / cfg.local_work.replace(" ", "")


def _run_or_load(cfg: ToyConfig, path: Path, data: Mnist, extra: dict) -> dict:
    if path.exists():
        with open(path) as f:
            rec = json.load(f)
        if rec.get("complete"):
            return rec
    return run(cfg, data=data, out=path, progress=False, extra=extra)


def _tune(sweep: Sweep, probe: ToyConfig, where: Path, data: Mnist) -> tuple[float, dict]:
    """The lr with the best mean final validation accuracy over ``tune_seeds``, by the one rule of
    ``fedlora.tuning`` (a diverged run scores -1; the grid grows past an edge by ``lr_factor`` or
    ``lr_extend``; ties go to the smaller lr). Returns the lr and the whole tuning table."""
    done: dict[float, dict[int, float]] = {}
    while True:
        step = tune_step(sweep.lr_search, sweep.tune_seeds, done)
        if not step.todo:
            return step.chosen, step.table
        for lr, seed in step.todo:
            # Only the final validation accuracy picks the lr: evaluate at the last round only
            # (evaluation does not touch training, so the number is the same; ≈ half the time).
            cfg = dataclasses.replace(probe, lr=lr, seed=seed, eval_every=probe.rounds)
            rec = _run_or_load(cfg, where / run_filename(cfg), data, {"sweep": sweep.name, "role": "tune"})
            done.setdefault(lr, {})[seed] = score(rec["final_val_accuracy"])


def _eval_seeds(sweep: Sweep, probe: ToyConfig, cell: Path, seeds, lr: float, tuned: dict, data: Mnist, *,
                setting: Optional[Setting], source: Optional[Setting]) -> list[float]:
    accs = []
    where = "this setting" if source is None or source == setting else source.dir_name()
    grid = {"lr_grid": list(sweep.lr_grid), "lr_extend": list(sweep.lr_extend), "lr_factor": sweep.lr_factor}
    for seed in seeds:
        cfg = dataclasses.replace(probe, lr=lr, seed=seed)
        rec = _run_or_load(cfg, cell / run_filename(cfg), data,
                           {"sweep": sweep.name, "role": "eval", **grid, "tune_seeds": list(sweep.tune_seeds),
                            "tune_val_accuracy": tuned, "lr_tuned_on": where})
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
        probe = _cfg(sweep, work, setting, method, rank, lr=sweep.lr_grid[0], seed=sweep.tune_seeds[0])
        cell = _cell_dir(out, sweep, setting, probe)
        bar.set_postfix_str(f"{probe.setting} {probe.local_work} {method} r{rank}")
        if dry_run:
            print(f"{cell / method}  ({probe.rounds} rounds × {probe.local_work})")
            continue
        source = sweep.tune_setting(setting)
        tune_key = (work, source, method, rank)
        if tune_key not in best_lr:
            tcfg = _cfg(sweep, work, source, method, rank, lr=sweep.lr_grid[0], seed=sweep.tune_seeds[0])
            best_lr[tune_key] = _tune(sweep, tcfg, _cell_dir(out, sweep, source, tcfg) / "tune", data)
        best, tuned = best_lr[tune_key]
        accs = _eval_seeds(sweep, probe, cell, seeds, best, tuned, data, setting=setting, source=source)
        if len(accs) < len(seeds) and source != setting:
            # The lr tuned on another setting diverged on some seed here: tune this cell on its own
            # setting (same rule), and mark the runs at the transferred lr as superseded.
            _supersede(cell, probe, seeds, best)
            best, tuned = _tune(sweep, probe, cell / "tune", data)
            accs = _eval_seeds(sweep, probe, cell, seeds, best, tuned, data, setting=setting, source=setting)
        summary.append({"setting": probe.setting, "local_work": probe.local_work, "method": method, "rank": rank,
                        "lr": best, "final_test_accuracy": accs})
        tqdm.write(f"{probe.setting:>14} {probe.local_work:>9} r{rank:<2} {method:>12} lr={best:<5g} "
                   f"test acc {sum(accs) / max(len(accs), 1):.4f} ({len(accs)}/{len(seeds)} seeds)  [{time.perf_counter() - t0:.0f}s]")
    return summary
