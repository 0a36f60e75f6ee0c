"""The LLM tier's experiment config: one frozen dataclass; TOML files (``llm_scale/configs/``) and CLI
flags override it, and an unknown key is an error that lists the valid ones."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from fedlora import rule_names
from fedlora.config import ConfigError, from_mapping

__all__ = ["LLMConfig", "CENTRALISED", "METHODS", "CONFIG_DIR", "load_config", "config_names"]

CENTRALISED = "centralised"  # one client holding all the training data: the ceiling of every rule
METHODS = tuple(rule_names()) + (CENTRALISED,)
CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("tweets", "table", "glue-sst2", "glue-qnli", "glue-mnli", "glue-qqp", "glue-rte", "commonsense")


@dataclass(frozen=True)
class LLMConfig:
    """Federated LoRA on a real pretrained transformer (``transformers`` + ``peft``)."""

    # --- model -------------------------------------------------------------------------------
    model: str = "minilm"  # minilm | smollm2 | tiny-roberta | tiny-llama | tiny-gpt2 | a local HF model folder
    kind: str = "classification"  # "classification" (a sequence-classification head) or "causal" (label words scored by log-likelihood)
    targets: tuple[str, ...] = ()  # LoRA target module names; () = the family's default (query/value, q_proj/v_proj, c_attn)
    layers: tuple[int, ...] = ()  # adapted transformer blocks; () = all. The RoBERTa-Large settings adapt only the top ones
    rank: int = 8
    lora_alpha: float = 16.0  # s = lora_alpha / rank (rsLoRA: / √rank)
    rslora: bool = False
    lora_dropout: float = 0.0
    client_ranks: tuple[int, ...] = ()  # flexlora / flora: per-client ranks, cycled over clients; () = rank for all
    head: str = "federated"  # the task head: "federated" (trained, averaged), "local" (kept per client) or "frozen"
    # --- data ----------------------------------------------------------------------------------
    task: str = "tweets"  # tweets | table | glue-sst2 | glue-qnli | glue-mnli | glue-qqp | glue-rte | commonsense
    data_path: str = ""  # table: a CSV/TSV/JSONL file; glue-*: a folder of GLUE TSVs ("" = the `datasets` hub); commonsense: a JSONL file
    commonsense_task: str = ""  # boolq | piqa | siqa | hellaswag | winogrande | arc-e | arc-c | obqa (task = "commonsense")
    text_column: str = "text"
    text_b_column: str = ""
    label_column: str = "label"  # label values are class names, numbers too (star ratings 1..10: 10 classes)
    label_map: str = ""  # table: fewer classes, "1-4:neg,5-6:mid,7-10:pos" (SOURCE:CLASS, SOURCE a value or LO-HI)
    max_length: int = 64  # tokens; 64 covers 99.5% of the tweets
    test_fraction: float = 0.1  # tweets / table: a seeded stratified test split (GLUE: the dev set is the test set)
    val_fraction: float = 0.0  # held out of training for learning-rate tuning; 0 = none
    train_subset: int = 0  # > 0: train on a seeded subset of this many rows (tests, quick runs)
    test_subset: int = 0  # > 0: evaluate on a seeded subset of this many rows
    split_seed: int = -1  # seed of the test / validation / subset draws; -1 = `seed`. A sweep fixes it so that
    #                       every seed is scored on the same test rows and the frozen-layer cache is built once
    # --- federation --------------------------------------------------------------------------------
    method: str = "fedavg"  # a fedlora rule, or "centralised"
    clients: int = 3
    partition: str = "iid"  # iid | dirichlet | shards (disjoint, total_samples in all, whatever the number of clients)
    dirichlet_alpha: float = 0.5
    total_samples: int = 0  # shards: the fixed sample budget shared by the clients; 0 = all training rows
    rounds: int = 10
    clients_per_round: float = 1.0  # a fraction in (0, 1] or a whole count
    local_steps: int = 20  # mini-batch steps per client per round (the papers' 20)
    batch_size: int = 16
    data_stream: str = "persistent"  # "persistent": each client walks its own seeded permutations epoch by epoch,
    #                                   going on where its last round stopped (fedlora/streams.py), so every row
    #                                   is seen ⌊T/n⌋ or ⌈T/n⌉ times; "round": a fresh permutation every
    #                                   client-round (what the committed 2-step studies ran: some rows 2-3 times,
    #                                   a third never)
    optimizer: str = "adamw"  # "sgd" (the RoBERTa settings) or "adamw"; state is fresh every round
    lr: float = 5e-4
    weight_decay: float = 0.0
    galore_rank: int = 16  # full-galore: GaLoreAdamW's projection rank, refresh gap, scale, projector type
    galore_update_proj_gap: int = 50
    galore_scale: float = 0.25
    galore_proj_type: str = "std"
    seed: int = 0
    eval_every: int = 1
    eval_splits: tuple[str, ...] = ()  # what `evaluate` scores: () = test, and val when held out
    # --- differential privacy (sample-level DP-SGD in each client's local training; fedlora/dp.py) ------
    dp_epsilon: Optional[float] = None  # None = no DP; inf = the DP code path with σ = 0; else the per-client target ε
    dp_delta: float = 1e-5  # δ of the per-client guarantee; keep it well below 1 / (a client's samples)
    dp_max_grad_norm: Optional[float] = 1.0  # C, the per-sample clipping norm; None or inf = no clipping (only with dp_epsilon=inf)
    dp_sampling: str = "poisson"  # "poisson": each sample joins a step w.p. batch/samples (what the accountant
    #                               is exact for); "shuffle": the plain run's fixed-size shuffled batches,
    #                               accounted as if Poisson at the same rate (an approximate guarantee)
    # --- compute -----------------------------------------------------------------------------------
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int = 1  # torch threads on CPU: 1 is fastest for these small ops on a shared 2-core machine
    dtype: str = "float32"  # compute: "float32", "bfloat16" (autocast; weights, factors, optimizer stay float32) or
    #                         "auto" = bf16 where the hardware has it natively (CPU flags amx_bf16 / avx512_bf16, a
    #                         bf16 GPU), float32 elsewhere (llm_scale/hardware.py); the record says what it resolved to
    cache_frozen_layers: bool = True  # classification with LoRA only in top layers: cache the frozen layers' output once
    length_grouped: bool = True  # batch rows of similar length together (less padding, same data per step)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.method not in METHODS:
            bad(f"method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.kind not in ("classification", "causal"):
            bad(f"kind={self.kind!r}; use 'classification' or 'causal'")
        if self.task not in TASKS:
            bad(f"task={self.task!r}; choose one of {', '.join(TASKS)}")
        if self.task == "commonsense" and self.kind != "causal":
            bad("task='commonsense' is scored by answer log-likelihood: set kind='causal' and a causal model")
        if self.task in ("table", "commonsense") and not self.data_path:
            bad(f"task={self.task!r} needs data_path (a file); e.g. --data my.csv")
        if self.task == "tweets" and (self.data_path or self.label_map):
            bad(f"task='tweets' reads the shipped corpus, but data_path={self.data_path!r} / label_map="
                f"{self.label_map!r} is set; set task='table' for your own file (--data sets it)")
        if self.label_map:
            self._check_label_map(bad)
        if self.head not in ("federated", "local", "frozen"):
            bad(f"head={self.head!r}; use 'federated', 'local' or 'frozen'")
        if self.method == "head-only" and (self.head == "frozen" or self.kind != "classification"):
            bad("method='head-only' trains only the classification head: it needs kind='classification' and "
                "head='federated' (or 'local'); with a frozen head (or none) nothing would train")
        if self.partition not in ("iid", "dirichlet", "shards"):
            bad(f"partition={self.partition!r}; use iid, dirichlet or shards")
        if self.data_stream not in ("persistent", "round"):
            bad(f"data_stream={self.data_stream!r}; use 'persistent' (each client's rows epoch by epoch across "
                "rounds) or 'round' (a fresh permutation every client-round)")
        if self.optimizer not in ("sgd", "adamw"):
            bad(f"optimizer={self.optimizer!r}; use 'sgd' or 'adamw'")
        if self.device not in ("auto", "cpu", "cuda"):
            bad(f"device={self.device!r}; use auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad(f"dtype={self.dtype!r}; use auto (bf16 where the hardware has it), float32 or bfloat16")
        for name in ("rank", "clients", "rounds", "local_steps", "batch_size", "threads", "max_length", "eval_every"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)}; must be >= 1")
        if any(r < 1 for r in self.client_ranks):
            bad(f"client_ranks={self.client_ranks}; every rank must be >= 1")
        if self.lr <= 0 or self.lora_alpha <= 0:
            bad("lr and lora_alpha must be > 0")
        if any(x not in ("test", "val") for x in self.eval_splits):
            bad(f"eval_splits={self.eval_splits}; use 'test' and/or 'val'")
        if "val" in self.eval_splits and self.val_fraction <= 0:
            bad("eval_splits asks for 'val' but val_fraction is 0: hold a validation split out (e.g. val_fraction=0.05)")
        if not 0 <= self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            bad("test_fraction must be in (0, 1) and val_fraction in [0, 1)")
        if self.dp_epsilon is not None:
            self._check_dp(bad)

    def _check_label_map(self, bad) -> None:
        from .data import parse_label_map

        if self.task != "table":
            bad(f"label_map applies to task='table' (your own file), not task={self.task!r}; drop it")
        try:
            parse_label_map(self.label_map)
        except ValueError as err:
            bad(f"label_map={self.label_map!r}: {err}; write comma-separated SOURCE:CLASS rules, SOURCE a label "
                f"value or an inclusive range LO-HI, e.g. '1-4:neg,5-6:mid,7-10:pos'")

    def _check_dp(self, bad) -> None:
        eps, clip = self.dp_epsilon, self.dp_max_grad_norm
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            bad(f"dp_epsilon={eps!r}; must be a number > 0 (e.g. 8, 3, 1), inf for the DP code path without noise, "
                "or unset for no DP")
        if not isinstance(self.dp_delta, (int, float)) or not 0 < self.dp_delta < 1:
            bad(f"dp_delta={self.dp_delta!r}; must be in (0, 1), well below 1 / a client's samples (1e-5 is usual)")
        if (clip is None or clip == math.inf) and math.isfinite(eps):
            bad(f"dp_max_grad_norm={clip} (no clipping) with dp_epsilon={eps:g}: the noise is calibrated to the clipping "
                "norm; set dp_max_grad_norm (e.g. 1.0), or dp_epsilon=inf to run the DP code path without noise")
        if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0):
            bad(f"dp_max_grad_norm={clip!r}; must be > 0 (the per-sample clipping norm C, e.g. 1.0) or None (no clipping)")
        if self.dp_sampling not in ("poisson", "shuffle"):
            bad(f"dp_sampling={self.dp_sampling!r}; use 'poisson' (the accountant's sampling) or 'shuffle' "
                "(the plain run's batches, an approximate guarantee)")

    def rank_of(self, client: int) -> int:
        return self.client_ranks[client % len(self.client_ranks)] if self.client_ranks else self.rank

    @property
    def data_seed(self) -> int:
        return self.seed if self.split_seed < 0 else self.split_seed

    @property
    def max_rank(self) -> int:
        return max(self.client_ranks) if self.client_ranks else self.rank


def config_names() -> list[str]:
    """The shipped configs (``llm_scale/configs/*.toml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(name_or_path: str | Path | None = None, **overrides) -> LLMConfig:
    """A shipped config by name (``cpu-minilm-tweets``) or a TOML file, then keyword overrides
    (``None`` values are ignored); lists become tuples."""
    data: dict = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix and (CONFIG_DIR / f"{name_or_path}.toml").exists():
            path = CONFIG_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"no config {str(name_or_path)!r}: give a TOML file or one of {', '.join(config_names())}")
        with open(path, "rb") as f:
            data = tomllib.load(f)
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in fields(LLMConfig)}
    data = {k: tuple(v) if isinstance(v, list) and k in valid else v for k, v in data.items()}
    return from_mapping(LLMConfig, {k: _as_text(k, v) for k, v in data.items()})


TEXT_FIELDS = frozenset(f.name for f in fields(LLMConfig) if f.type == "str")


def _as_text(key: str, value):
    """A text field given a number (TOML ``label_column = 1``) is that text: a column may be called "1"."""
    if key in TEXT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def describe(cfg: LLMConfig) -> str:
    work = f"{cfg.rounds} rounds × {cfg.local_steps} steps × batch {cfg.batch_size}"
    return f"{cfg.method} on {cfg.model}/{cfg.task}, {cfg.clients} clients ({cfg.partition}), r={cfg.rank}, {work}"

