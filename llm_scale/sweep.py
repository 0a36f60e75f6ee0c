"""The client-scaling sweep on a real transformer: every rule at 3, 20 and 50 clients with the total
budget fixed, tuned the same way, several seeds, resumable, on one or more worker processes.

    python -m llm_scale sweep --preset scaling --out results --jobs 2
    python -m llm_scale sweep --preset quick --out /tmp/q          # minutes: the same code path

The budget is fixed the way the RoLoRA paper fixes it (Chen et al. 2024, arXiv:2409.02346, Table 2:
≈500 / 75 / 30 rounds for 3 / 20 / 50 clients): the same training rows in total (disjoint client
shards of one training set, IID or Dirichlet label skew) and the same client-steps in total
(``total_steps = clients × rounds × local_steps``), so more clients means fewer rounds.

Two phases. **Tune**: for every (rule, rank) the learning rate is chosen on one cell (``tune_cell``:
clients and partition) and seeds never evaluated (``tune_seeds``; by default the one ``tune_seed``),
by mean final accuracy on a validation split held out of training (the test rows are never used to
choose); the grid grows past an edge while the best lr sits there (``lr_extend``, or ``lr_factor``).
The rule is the toy's, in one place: ``fedlora.tuning``. **Eval**: every (rule, clients, partition, rank)
cell at its tuned lr for every seed, scored on the test rows. One JSON per run (``role`` = ``"tune"``
or ``"eval"``); a run whose complete JSON exists is skipped, so an interrupted sweep resumes by
re-running the same command.

A sweep may also have a privacy axis (``epsilons``, the ``dp`` preset): each cell then runs at every
per-client DP target ε (``None`` = no DP), lives in a folder suffixed ``_eps<ε>`` (``_nodp``), and its
learning rate is tuned at that ε. Presets without it keep their cells, folders and file names.

Workers (``--jobs``) are separate processes with one torch thread each; each builds the data split and
the frozen-layer cache once (``split_seed`` fixes the test rows for every seed) and keeps one model
per seed, re-pointed at each run (``Federation.reconfigure``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from fedlora.checkpoint import atomic_write_json
from fedlora.tuning import LrSearch, score, tune_step

from .config import CENTRALISED, LLMConfig, load_config

__all__ = ["Sweep", "PRESETS", "run_sweep", "tune_key", "eval_runs", "tune_grid_runs"]

RANKLESS = ("full", "full-galore")  # train the dense weights: the adapter rank does not apply
Cell = tuple  # (method, clients, partition, rank, dp_epsilon): dp_epsilon None = no DP


@dataclass(frozen=True)
class Sweep:
    name: str
    methods: tuple[str, ...] = ("fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "full")
    clients: tuple[int, ...] = (3, 20, 50)
    partitions: tuple[str, ...] = ("iid", "dirichlet")
    ranks: tuple[int, ...] = (2, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    total_steps: int = 600  # client-steps per run, whatever the number of clients
    local_steps: int = 2  # per client per round; rounds = total_steps / (clients × local_steps)
    lr_grid: tuple[float, ...] = (2e-3, 4e-3, 8e-3)  # AdamW; the start of the grid, the same for every rule
    lr_extend: tuple[float, ...] = (1e-3, 5e-4, 1.6e-2, 3.2e-2)  # tried in turn while the best lr sits at that edge
    tune_seed: int = 100  # never an evaluation seed; the tuning seed when ``tune_seeds`` is empty
    tune_seeds: tuple[int, ...] = ()  # several: the lr with the best mean over them wins (empty = (tune_seed,))
    lr_factor: Optional[float] = None  # instead of lr_extend: grow the grid by this factor while the best is at an edge
    lr_bounds: tuple[float, float] = (1e-5, 1.0)  # lr_factor never goes past these (AdamW)
    tune_cell: tuple[int, str] = (20, "iid")  # (clients, partition) where each (rule, rank) is tuned
    centralised: bool = True  # one client with all the rows and all the steps: the ceiling of every rule
    epsilons: tuple[Optional[float], ...] = (None,)  # per-client DP targets (None = no DP); (None,) = no privacy axis
    config: str = "cpu-minilm-tweets"
    base: dict = dataclasses.field(default_factory=dict)  # LLMConfig fields for every run

    def __post_init__(self) -> None:
        self.lr_search  # a nonsensical grid raises now, not hours into the sweep

    @property
    def lr_search(self) -> LrSearch:
        """The lr search every (rule, rank) of this sweep runs (``fedlora.tuning``)."""
        return LrSearch(self.lr_grid, self.lr_extend, self.lr_factor, self.lr_bounds)

    @property
    def tuning_seeds(self) -> tuple[int, ...]:
        """The seeds the lr is tuned on: ``tune_seeds``, or the one ``tune_seed`` (the committed studies)."""
        return tuple(self.tune_seeds) or (self.tune_seed,)

    def rounds(self, clients: int) -> int:
        per_round = clients * self.local_steps
        if self.total_steps % per_round:
            raise ValueError(f"total_steps={self.total_steps} is not a whole number of rounds of {clients} clients × "
                             f"{self.local_steps} steps; choose a multiple of {per_round}")
        return self.total_steps // per_round

    @property
    def private(self) -> bool:
        """Whether the cells have a privacy axis (their folders and tuning keys then name ε)."""
        return tuple(self.epsilons) != (None,)

    def config_for(self, method: str, clients: int, partition: str, rank: int, *, lr: float, seed: int,
                   role: str, dp_epsilon: Optional[float] = None) -> LLMConfig:
        if method == CENTRALISED:  # one optimiser over all the steps, one evaluation at the end
            sched = dict(clients=1, rounds=1, local_steps=self.total_steps, partition="iid")
        else:
            sched = dict(clients=clients, rounds=self.rounds(clients), local_steps=self.local_steps, partition=partition)
        return load_config(self.config, **{**self.base, **sched, "method": method, "rank": rank, "lr": lr,
                                           "seed": seed, "eval_every": sched["rounds"], "dp_epsilon": dp_epsilon,
                                           "eval_splits": ["val"] if role == "tune" else ["test"]})

    def cells(self) -> Iterable[Cell]:
        """(method, clients, partition, rank, ε) in the order they run: centralised first (the sanity
        check), then rank by rank and partition by partition (IID at the paper's rank 2 first), every
        rule at each number of clients and privacy target. Rank-free rules (``full``) run at the first
        rank only."""
        if self.centralised:
            for rank in self.ranks:
                for eps in self.epsilons:
                    yield CENTRALISED, 1, "iid", rank, eps
        for rank in self.ranks:
            for partition in self.partitions:
                for clients in self.clients:
                    for eps in self.epsilons:
                        for method in self.methods:
                            if method in RANKLESS and rank != self.ranks[0]:
                                continue
                            yield method, clients, partition, rank, eps


# The scaling study's model, data and budget (MiniLM, LoRA on the top block, 4,800 training tweets).
# Every preset pins its dtype (float32, as the committed studies ran): the configs' "auto" would make
# the cells of one study bf16 on one machine and float32 on another. The presets of the committed studies
# also pin data_stream="round" (a fresh permutation per client-round, as they ran): a resumed sweep must
# not mix two readings of the data.
_ROUND = dict(dtype="float32", data_stream="round")
_SCALING_BASE = dict(layers=[5], batch_size=8, train_subset=4800, val_fraction=0.05, test_subset=1000, split_seed=0,
                     **_ROUND)
_EXTEND_FAR = (1e-3, 5e-4, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1, 2.56e-1)  # the scaling grid's, then ×2 up to 0.256

def _paper_regime() -> dict[str, Sweep]:
    """The client-scaling study at the paper's local work (issue 23; README "At the paper's local work").

    RoLoRA's Table 2 (Chen et al. 2024, arXiv:2409.02346): 20 local steps, 500 / 75 / 30 rounds for 3 / 20 /
    50 clients. Here R = 100: 100 / 15 / 6 rounds, the ratio exact (0.15 R and 0.06 R are whole for R a
    multiple of 100, so R = 100 is the smallest), 6,000 client-steps of batch 8 in every run = 48,000 row
    reads of the 4,800 training rows: exactly 10 passes, each client reading its own rows epoch by epoch
    (``data_stream="persistent"``: every row read 10 times). MiniLM, LoRA on query/value of the top 3 blocks
    (blocks 0-2 from the frozen-layer cache), rank 2, float32 (pinned: cells must compute alike). The lr:
    best mean validation accuracy over 2 tuning seeds (100, 101) at 20 IID clients, on a ×2 grid from
    (2e-3, 4e-3, 8e-3) grown until the best is interior (``fedlora.tuning``, the toy's rule).

    Is R = 100 enough (``tools/paper_regime_plateau.py``, results/llm_scale/paper_regime_plateau/)? At lr
    4e-3 the 3-client FedAvg-LoRA run's validation accuracy is 0.720 / 0.738 / 0.751 after 10 / 20 / 30
    rounds and then stays at 0.739-0.764 to round 100: on its plateau from ≈1,800 of the 6,000 client-steps.
    Centralised training at the same lr (one client, 200 steps a round for 30 rounds) wanders at 0.61-0.69
    without a trend: at 4e-3 it is not converging, so its plateau waits on its own tuned lr.

    Budget, measured (the same two runs, one thread each, side by side on this 2-core machine, fp32):
    0.11 s per client-step, ≈11-12 minutes a run, and ≈60 s of data/cache setup once per worker. The main
    preset (10 rules + centralised, 3 / 20 / 50 clients, IID and Dirichlet(0.5), 3 seeds = 183 eval runs,
    ≥ 11 × 3 × 2 = 66 tuning runs) is ≈48 CPU-hours: more than the 10 CPU-hour budget, so it runs in the
    issue's order, each step a preset of its own (each resumable, all from one clean commit):

    1. ``paper-regime-core``: IID, 3 and 50 clients, fedavg / ffa / rolora / fedex / rolora-chain /
       fedavg-chain / head-only + centralised, 3 seeds: 45 eval + ≥ 48 tuning runs ≈ 18 CPU-h (≈ 9 h on
       2 workers);
    2. ``paper-regime`` itself for the rest (every rule, 20 clients, Dirichlet) when there is time;
    3. ``paper-regime-s5`` / ``-s2``: the local-work axis at 50 IID clients, 6,000 client-steps at 5 and 2
       local steps (24 and 60 rounds), the core rules, tuned there;
    4. ``paper-regime-frozen-head``: the head kept at its seeded random init (as the released supplement
       is reported to do), fedavg / ffa / rolora and the three chained rules at 3 and 50 IID clients;
    5. ``paper-regime-sgd``: plain SGD (the supplement's reported default, lr 5e-3 in its config) for
       fedavg and rolora at 50 IID clients, its lr tuned the same way from (2.5e-3, 5e-3, 1e-2).

    ``full-galore`` is left out for the budget: it trains the dense weights, and every client-round builds a
    fresh GaLore optimizer whose first step takes an SVD of each trained weight's gradient (50 clients ×
    1 step cost 1.46× one client × 50 steps in the bench, every other rule ≤ 1.07×). Its optimizer state
    on this cell is 6.4% of full AdamW's and 5.4× a LoRA rule's (README "Optimizer memory").
    """
    base = dict(layers=[3, 4, 5], batch_size=8, train_subset=4800, val_fraction=0.05, test_subset=1000,
                split_seed=0, dtype="float32", data_stream="persistent")
    tuned = dict(lr_grid=(2e-3, 4e-3, 8e-3), lr_extend=(), lr_factor=2.0, tune_seeds=(100, 101),
                 tune_cell=(20, "iid"), ranks=(2,), seeds=(0, 1, 2), total_steps=6000, local_steps=20, base=base)
    every = ("fedavg", "ffa", "rolora", "fedex", "flexlora", "full", "rolora-chain", "fedavg-chain", "ffa-chain",
             "head-only")
    core = ("fedavg", "ffa", "rolora", "fedex", "rolora-chain", "fedavg-chain", "head-only")
    chained = ("fedavg", "ffa", "rolora", "fedavg-chain", "ffa-chain", "rolora-chain")
    axis = dict(tuned, clients=(50,), partitions=("iid",), tune_cell=(50, "iid"), centralised=False)
    return {
        "": Sweep(name="paper_regime", methods=every, **tuned),
        "-core": Sweep(name="paper_regime", methods=core, clients=(3, 50), partitions=("iid",), **tuned),
        "-s5": Sweep(name="paper_regime_s5", methods=core, **{**axis, "local_steps": 5}),
        "-s2": Sweep(name="paper_regime_s2", methods=core, **{**axis, "local_steps": 2}),
        "-frozen-head": Sweep(name="paper_regime_frozen_head", methods=chained, clients=(3, 50), partitions=("iid",),
                              centralised=False, **{**tuned, "base": {**base, "head": "frozen"}}),
        "-sgd": Sweep(name="paper_regime_sgd", methods=("fedavg", "rolora"),
                      **{**axis, "lr_grid": (2.5e-3, 5e-3, 1e-2), "lr_bounds": (1e-5, 10.0),
                         "base": {**base, "optimizer": "sgd"}}),
    }


PRESETS = {
    # The study (issue 8): MiniLM on the tweets, LoRA on query/value of the top block only, so blocks
    # 0-4 come from the frozen-layer cache; 600 client-steps of batch 8 in every run = 4,800 training
    # rows each seen once; 2 local steps, so 100 / 15 / 6 rounds for 3 / 20 / 50 clients (the paper's
    # 500 / 75 / 30 scaled by 1/5 for 3 and 20, and 6 for 50). README: "LLM client-scaling study".
    "scaling": Sweep(name="scaling", base=_SCALING_BASE),
    # The controls of the scaling verdict (issue 20), on the scaling study's own cells, budget and tuning:
    # the released RoLoRA code's chain applied to FedAvg-LoRA and FFA-LoRA (is the chain, not the
    # alternation, what holds up with many clients?) and the head-only baseline (the adapters stay at their
    # init; how much of the accuracy, and of the 3 → 50 drop, is the classifier head's?). Rank 2, 3 seeds;
    # 54 eval + ≈15 tuning runs, ≈65 s each here (≈1.2 h on 2 workers). Pooled with `scaling` in the tables.
    # The grid goes on past `scaling`'s top (3.2e-2), ×2 up to 0.256: training the head alone, the best
    # lr sat at 3.2e-2 (validation 0.626 against 0.598 at 1.6e-2).
    "controls": Sweep(name="scaling_controls", methods=("fedavg-chain", "ffa-chain", "head-only"), ranks=(2,),
                      centralised=False, base=_SCALING_BASE, lr_extend=_EXTEND_FAR),
    # The opposite arm: the classification head frozen at its seeded random init from round 0, so the
    # adapters do all the work -- what the released RoLoRA supplement is reported to do (SPEC). FedAvg-LoRA,
    # FFA-LoRA, RoLoRA and the three chained rules, IID, rank 2, tuned at 20 clients like `scaling`;
    # 54 eval + ≈30 tuning runs (≈1.5 h on 2 workers).
    "frozen-head": Sweep(name="frozen_head", methods=("fedavg", "ffa", "rolora", "fedavg-chain", "ffa-chain",
                                                      "rolora-chain"), partitions=("iid",), ranks=(2,),
                         centralised=False, base={**_SCALING_BASE, "head": "frozen"}, lr_extend=_EXTEND_FAR),
    # The causal path on a real Llama-architecture model, a smaller study: SmolLM2-135M scoring the label
    # words, LoRA on q/v of the top block (blocks 0-28 from the causal cache), IID, rank 2; 240 client-steps
    # of batch 4 = 960 rows each seen once; 40 / 6 rounds for 3 / 20 clients.
    "smollm": Sweep(name="smollm", methods=("fedavg", "ffa", "rolora", "rolora-chain"), clients=(3, 20),
                    partitions=("iid",), ranks=(2,), total_steps=240, local_steps=2, lr_grid=(1e-3, 4e-3),
                    lr_extend=(2.5e-4, 1.6e-2), tune_cell=(20, "iid"), config="cpu-smollm-tweets",
                    base=dict(layers=[29], batch_size=4, train_subset=960, val_fraction=0.05, test_subset=150,
                              split_seed=0, **_ROUND)),
    # Sample-level DP-SGD in each client's local training (issue 11; README "Differential privacy"): MiniLM
    # on the tweets as in `scaling`, 3 IID clients (FFA-LoRA's DP experiments use few), rank 8, per-client
    # ε ∈ {no DP, 8, 3, 1} at δ = 1e-5, C = 1, Poisson batches; lr tuned per (rule, ε). 300 client-steps of
    # (expected) batch 16 = 4,800 rows, one pass over the 4,800 training rows; 2 local steps, 50 rounds:
    # each client takes 100 DP steps at q = 16 / 1,600 (σ ≈ 0.50 / 0.71 / 1.08 for ε = 8 / 3 / 1). A DP
    # step costs ≈1.7× a plain one here (Poisson batches are not length-grouped), so the ≈80 runs (36 eval,
    # ≥36 tuning) of fedavg / ffa / rolora take ≈1 hour on 2 workers; fedex and flexlora add ≈2/3 more.
    # Under DP the best lr sat at 3.2e-2, the default extension's top, in 8 of 9 cells: the grid goes on,
    # ×2, up to 0.256.
    "dp": Sweep(name="dp", methods=("fedavg", "ffa", "rolora", "fedex", "flexlora"), clients=(3,),
                partitions=("iid",), ranks=(8,),
                epsilons=(None, 8.0, 3.0, 1.0), total_steps=300, local_steps=2, tune_cell=(3, "iid"),
                lr_extend=(1e-3, 5e-4, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1, 2.56e-1), centralised=False,
                base=dict(layers=[5], batch_size=16, train_subset=4800, val_fraction=0.05, test_subset=1000,
                          split_seed=0, dp_delta=1e-5, dp_max_grad_norm=1.0, dp_sampling="poisson",
                          **_ROUND)),
    **{f"paper-regime{k}": v for k, v in _paper_regime().items()},
    # Minutes, same code path: two rules, two client counts, two seeds, a tiny budget.
    "quick": Sweep(name="quick", methods=("fedavg", "rolora"), clients=(3, 6), partitions=("iid",), ranks=(2,),
                   seeds=(0, 1), total_steps=36, local_steps=2, lr_grid=(2e-3, 4e-3), lr_extend=(),
                   tune_cell=(3, "iid"),
                   base=dict(layers=[5], batch_size=8, train_subset=288, val_fraction=0.05, test_subset=300,
                             split_seed=0, **_ROUND)),
}


# ---- paths and keys ----------------------------------------------------------------------------------
def _eps_tag(eps: Optional[float]) -> str:
    return "nodp" if eps is None else f"eps{eps:g}"


def _cell_dir(out: Path, sweep: Sweep, method: str, clients: int, partition: str, rank: int,
              eps: Optional[float] = None) -> Path:
    cell = "centralised" if method == CENTRALISED else f"{partition}_c{clients}"
    privacy = f"_{_eps_tag(eps)}" if sweep.private else ""
    return Path(out) / "llm_scale" / sweep.name / f"{cell}_r{rank}{privacy}"


def tune_key(sweep: Sweep, method: str, rank: int, eps: Optional[float] = None) -> Cell:
    """The cell where (method, rank) is tuned, at privacy target ``eps``."""
    if method == CENTRALISED:
        return method, 1, "iid", rank, eps
    clients, partition = sweep.tune_cell
    return method, clients, partition, (sweep.ranks[0] if method in RANKLESS else rank), eps


def _key_label(sweep: Sweep, k: Cell) -> str:
    """``"fedavg r8"`` (``"fedavg r8 eps3"`` with a privacy axis): the tuning table's key."""
    return f"{k[0]} r{k[3]}" + (f" {_eps_tag(k[4])}" if sweep.private else "")


def _run_path(out: Path, sweep: Sweep, cfg: LLMConfig, role: str) -> Path:
    from .run import run_filename

    d = _cell_dir(out, sweep, cfg.method, cfg.clients, cfg.partition, cfg.rank, cfg.dp_epsilon)
    return (d / "tune" if role == "tune" else d) / run_filename(cfg)


def _load(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if rec.get("complete") else None


# ---- the work of one run (in this process or a worker) ------------------------------------------------
_STATE: dict = {}  # per process: data key -> (splits, cache); (data key, seed) -> Federation


def _data_key(cfg: LLMConfig) -> tuple:
    keep = ("model", "kind", "task", "data_path", "text_column", "text_b_column", "label_column", "label_map",
            "commonsense_task", "max_length", "test_fraction", "val_fraction", "train_subset", "test_subset", "layers",
            "targets", "split_seed", "cache_frozen_layers", "head", "lora_alpha", "dtype")  # how the data is read, too
    return tuple(getattr(cfg, k) for k in keep)


def _federation(cfg: LLMConfig):
    from .engine import Federation

    key = _data_key(cfg)
    fed = _STATE.get((key, cfg.seed))
    if fed is not None:
        return fed.reconfigure(cfg)
    shared = _STATE.get(key)
    fed = Federation(cfg, splits=shared[0] if shared else None, cache=shared[1] if shared else None,
                     tiny=_STATE.get("tiny"))
    _STATE[key] = (fed.splits, fed.cache)
    _STATE[(key, cfg.seed)] = fed
    return fed


def record_dtype(rec: dict) -> str:
    """The compute dtype a run record was made with (records from before ``dtype`` existed say
    ``bf16`` in their config)."""
    return rec.get("dtype") or ("bfloat16" if (rec.get("config") or {}).get("bf16") else "float32")


def resolved_dtype(cfg: LLMConfig) -> str:
    from .engine import pick_device
    from .hardware import resolve_dtype

    return resolve_dtype(cfg.dtype, pick_device(cfg.device).type)


def check_dtype(rec: dict, cfg: LLMConfig, path) -> None:
    """A sweep resumes only in the dtype its finished runs used: the cells of one study must compute alike."""
    from fedlora.config import ConfigError

    old, new = record_dtype(rec), resolved_dtype(cfg)
    if old != new:
        raise ConfigError(f"{path} was computed in {old}, this sweep would compute in {new} (dtype={cfg.dtype!r}): "
                          f"resume it with dtype={old!r} or write to another --out")


def check_stream(rec: dict, cfg: LLMConfig, path) -> None:
    """A sweep resumes only with the reading of the data its finished runs used (records from before
    ``data_stream`` existed read a fresh permutation every client-round: ``"round"``)."""
    from fedlora.config import ConfigError

    old = (rec.get("config") or {}).get("data_stream", "round")
    if old != cfg.data_stream:
        raise ConfigError(f"{path} read its rows with data_stream={old!r}, this sweep would use {cfg.data_stream!r}: "
                          f"resume it with data_stream={old!r} or write to another --out")


def _check_existing(sweep: Sweep, out: Path) -> None:
    """Before any work: every finished run of this sweep's folder in the dtype and the data reading this
    sweep resolves to."""
    cell = next(iter(sweep.cells()))
    cfg = sweep.config_for(*cell[:4], lr=sweep.lr_grid[0], seed=sweep.seeds[0], role="eval", dp_epsilon=cell[4])
    for path in sorted((Path(out) / "llm_scale" / sweep.name).rglob("*.json")):
        rec = _load(path)
        if rec is not None and "method" in rec and "config" in rec:
            check_dtype(rec, cfg, path)
            check_stream(rec, cfg, path)


def _work(job: dict) -> dict:
    """Run one config (a dict of LLMConfig fields) unless its complete JSON exists; a short summary back."""
    from .run import run

    path = Path(job["path"])
    rec = _load(path)
    cfg = LLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    if rec is not None:
        check_dtype(rec, cfg, path)
        check_stream(rec, cfg, path)
    else:
        rec = run(cfg, out=path, federation=_federation(cfg), progress=False, extra=job["extra"])
    return {"path": str(path), "val": rec.get("final_val_accuracy"), "test": rec.get("final_test_accuracy"),
            "diverged": rec.get("diverged"), "wall": rec.get("wall_seconds", 0.0)}


def _init_worker(tiny) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(1)
    import transformers

    from .quiet import quiet_known_warnings

    quiet_known_warnings()
    transformers.utils.logging.disable_progress_bar()  # one bar per worker per model load is noise
    _STATE["tiny"] = tiny


class _Pool:
    """Runs jobs in this process (``jobs=1``) or in worker processes, yielding summaries as they finish."""

    def __init__(self, jobs: int, tiny: Optional[dict] = None):
        self.jobs, self.tiny, self.ex = jobs, tiny, None
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.ex = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_init_worker, initargs=(tiny,))
        else:
            _STATE["tiny"] = tiny

    def map(self, jobs: list[dict]):
        if self.ex is None:
            for j in jobs:
                yield _work(j)
            return
        from concurrent.futures import as_completed

        futures = [self.ex.submit(_work, j) for j in jobs]
        for f in as_completed(futures):
            yield f.result()

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()


# ---- the two phases --------------------------------------------------------------------------------------
def _job(out: Path, sweep: Sweep, cell: Cell, *, lr: float, seed: int, role: str, extra: dict) -> dict:
    method, clients, partition, rank, eps = cell
    cfg = sweep.config_for(method, clients, partition, rank, lr=lr, seed=seed, role=role, dp_epsilon=eps)
    return {"path": str(_run_path(out, sweep, cfg, role)), "config": dataclasses.asdict(cfg),
            "extra": {"sweep": sweep.name, "role": role, "total_steps": sweep.total_steps, **extra}}


def _stamp(jobs: list[dict], code: Optional[str]) -> list[dict]:
    for j in jobs:
        j["extra"]["git_commit"] = code
    return jobs


def _tune_keys(sweep: Sweep, methods: Optional[Iterable[str]]) -> list[tuple]:
    keys = []
    for cell in sweep.cells():
        if methods is not None and cell[0] not in methods:
            continue
        k = tune_key(sweep, cell[0], cell[3], cell[4])
        if k not in keys:
            keys.append(k)
    return keys


def tune_grid_runs(sweep: Sweep, out: Path, key: tuple, done: dict[float, float]) -> tuple[list[float], Optional[float]]:
    """The one-seed view of ``fedlora.tuning.tune_step`` (kept for its callers): the lrs still to run
    given ``done`` (lr -> val accuracy, -1 when diverged), and the chosen lr once there are none."""
    if len(sweep.tuning_seeds) != 1:
        raise ValueError(f"tune_grid_runs takes one accuracy per lr, but sweep {sweep.name!r} tunes on seeds "
                         f"{list(sweep.tuning_seeds)}: use fedlora.tuning.tune_step")
    seed = sweep.tuning_seeds[0]
    step = tune_step(sweep.lr_search, (seed,), {lr: {seed: acc} for lr, acc in done.items()})
    return [lr for lr, _ in step.todo], step.chosen


def _seed_fields(sweep: Sweep) -> dict:
    """How records name the tuning seeds: ``tune_seed`` with one (as the committed studies), else ``tune_seeds``."""
    seeds = sweep.tuning_seeds
    return {"tune_seed": seeds[0]} if len(seeds) == 1 else {"tune_seeds": list(seeds)}


def _record_table(sweep: Sweep, table: dict) -> dict:
    """The tuning table as records carry it: ``{lr: val accuracy}`` with one tuning seed (the committed
    studies' format), the toy's ``{lr: {"mean_val_accuracy", "val_accuracy": {seed: acc}}}`` with several."""
    if len(sweep.tuning_seeds) > 1:
        return table
    seed = str(sweep.tuning_seeds[0])
    return {lr: row["val_accuracy"][seed] for lr, row in table.items()}


def _tune_jobs(sweep: Sweep, out: Path, keys: list[tuple], done: dict, chosen: dict) -> tuple[list[dict], dict]:
    """The tuning runs still needed across ``keys`` (every (lr, seed) the search asks for), and which
    (key, lr, seed) each run's path belongs to; keys whose search has ended go into ``chosen``."""
    jobs, owner = [], {}
    for k in keys:
        if k in chosen:
            continue
        step = tune_step(sweep.lr_search, sweep.tuning_seeds, done[k])
        if not step.todo:
            chosen[k] = (step.chosen, _record_table(sweep, step.table))
        for lr, seed in step.todo:
            j = _job(out, sweep, k, lr=lr, seed=seed, role="tune", extra={})
            jobs.append(j)
            owner[j["path"]] = (k, lr, seed)
    return jobs, owner


def _tune(sweep: Sweep, out: Path, pool: _Pool, keys: list[tuple], bar, code: Optional[str]) -> dict[tuple, tuple[float, dict]]:
    """Tune every key at once, so the pool always has every run the searches need next; returns
    key -> (chosen lr, the tuning table as records carry it)."""
    done: dict[tuple, dict[float, dict[int, float]]] = {k: {} for k in keys}
    chosen: dict[tuple, tuple[float, dict]] = {}
    several = len(sweep.tuning_seeds) > 1
    while True:
        jobs, owner = _tune_jobs(sweep, out, keys, done, chosen)
        if not jobs:
            return chosen
        bar.total = (bar.total or 0) + len(jobs)
        bar.refresh()
        for res in pool.map(_stamp(jobs, code)):
            k, lr, seed = owner[res["path"]]
            acc = score(res["val"], diverged=res["diverged"])
            done[k].setdefault(lr, {})[seed] = acc
            bar.update(1)
            bar.set_postfix_str(f"tune {_key_label(sweep, k)} lr={lr:g}{f' seed {seed}' if several else ''}: "
                                f"val {acc:.3f}")


def _grid_fields(sweep: Sweep) -> dict:
    """The lrs the search may try, as eval records name them (``lr_factor`` and ``lr_bounds`` only when set)."""
    if sweep.lr_factor is None:
        return {"lr_grid": sorted(set(sweep.lr_grid) | set(sweep.lr_extend))}
    return {"lr_grid": sorted(sweep.lr_grid), "lr_factor": sweep.lr_factor, "lr_bounds": list(sweep.lr_bounds)}


def write_tuning(sweep: Sweep, out: Path, table: dict) -> Path:
    """Write the sweep's ``tuning.json``: the lr chosen per tuning key, with its table. A run restricted
    by ``--methods`` adds its keys to the file's: the other rules' entries stay, when the file was written
    by the same tuning (same cell and tuning seeds); a file from another tuning is replaced whole."""
    path = Path(out) / "llm_scale" / sweep.name / "tuning.json"
    head = {"sweep": sweep.name, "tuned_at": {"clients": sweep.tune_cell[0], "partition": sweep.tune_cell[1]},
            **_seed_fields(sweep)}
    kept = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if isinstance(old, dict) and {k: old.get(k) for k in head} == head and isinstance(old.get("chosen"), dict):
            kept = old["chosen"]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**head, "chosen": {**kept, **table}})
    return path


def eval_runs(sweep: Sweep, out: Path, chosen: dict, methods: Optional[Iterable[str]] = None,
              seeds: Optional[Iterable[int]] = None) -> list[dict]:
    jobs = []
    for cell in sweep.cells():
        if methods is not None and cell[0] not in methods:
            continue
        k = tune_key(sweep, cell[0], cell[3], cell[4])
        lr, table = chosen[k]
        for seed in seeds or sweep.seeds:
            jobs.append(_job(out, sweep, cell, lr=lr, seed=seed, role="eval",
                             extra={**_grid_fields(sweep), **_seed_fields(sweep), "tune_val_accuracy": table,
                                    "lr_tuned_at": {"clients": k[1], "partition": k[2], "rank": k[3],
                                                    **({"dp_epsilon": k[4]} if sweep.private else {})}}))
    return jobs


def run_sweep(sweep: Sweep, *, out: Path, jobs: int = 1, methods: Optional[Iterable[str]] = None,
              seeds: Optional[Iterable[int]] = None, dry_run: bool = False, tiny: Optional[dict] = None,
              progress: bool = True) -> list[dict]:
    """Tune, then evaluate, every cell; returns one summary row per eval run."""
    from tqdm.auto import tqdm

    methods = tuple(methods) if methods else None
    keys = _tune_keys(sweep, methods)
    if dry_run:
        cells = [c for c in sweep.cells() if methods is None or c[0] in methods]
        n_seeds = len(tuple(seeds or sweep.seeds))
        for c in cells:
            rounds = 1 if c[0] == CENTRALISED else sweep.rounds(c[1])
            privacy = f" {'no DP' if c[4] is None else f'ε={c[4]:g}':>5}" if sweep.private else ""
            print(f"{c[0]:>13} {c[2]:>9} {c[1]:>3} clients r{c[3]}{privacy}: {rounds} rounds × "
                  f"{sweep.total_steps if c[0] == CENTRALISED else sweep.local_steps} steps, {n_seeds} seeds")
        n_tune = len(sweep.tuning_seeds)
        print(f"{len(keys)} tuning cells (≥ {len(sweep.lr_grid)} lrs × {n_tune} tuning seed{'s' * (n_tune > 1)} each), "
              f"{len(cells) * n_seeds} eval runs, "
              f"{sweep.total_steps} client-steps each")
        return []
    from fedlora.provenance import git_commit

    t0 = time.perf_counter()
    # Every record names the code the workers loaded at the start, not whatever HEAD is when it is
    # written (a sweep runs for hours; edits meanwhile do not reach the running workers).
    code = git_commit()
    _check_existing(sweep, out)
    pool = _Pool(jobs, tiny=tiny)
    try:
        bar = tqdm(total=0, desc=f"sweep {sweep.name}", disable=not progress)
        chosen = _tune(sweep, out, pool, keys, bar, code)
        write_tuning(sweep, out, {_key_label(sweep, k): {"lr": lr, "val_accuracy": t} for k, (lr, t) in chosen.items()})
        ejobs = eval_runs(sweep, out, chosen, methods, seeds)
        bar.total += len(ejobs)
        bar.refresh()
        rows = []
        for res in pool.map(_stamp(ejobs, code)):
            rows.append(res)
            bar.update(1)
            bar.set_postfix_str(f"{Path(res['path']).parent.name} {Path(res['path']).name.split('_')[0]}: "
                                f"test {res['test'] if res['test'] is not None else float('nan'):.3f}")
        bar.close()
    finally:
        pool.close()
    print(f"sweep {sweep.name}: {len(rows)} eval runs in {time.perf_counter() - t0:.0f} s -> "
          f"{Path(out) / 'llm_scale' / sweep.name}")
    return rows
