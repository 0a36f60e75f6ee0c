"""One federated (or centralised) run on a real transformer: config in, one JSON record out, the final
global adapter exported with peft's ``save_pretrained``."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedlora.checkpoint import atomic_write_json
from fedlora.config import FedConfig
from fedlora.loop import run_federated
from fedlora.provenance import portable_path, provenance
from fedlora.validation import NonFiniteUpdateError

from .config import CENTRALISED, LLMConfig
from .data import relative_source
from .engine import Federation
from .export import export_global
from .hardware import capability

__all__ = ["run", "fed_config", "run_filename", "peak_rss_mib", "dp_record", "data_digest", "labels_record"]


def fed_config(cfg: LLMConfig, num_clients: int) -> FedConfig:
    rule = "fedavg" if cfg.method == CENTRALISED else cfg.method
    return FedConfig(rule=rule, rounds=cfg.rounds, num_clients=num_clients, seed=cfg.seed, eval_every=cfg.eval_every,
                     clients_per_round=1.0 if cfg.method == CENTRALISED else cfg.clients_per_round)


def run_filename(cfg: LLMConfig) -> str:
    """``<method>_<model>_<task>_..._seed<seed>.json``; with a data file also ``_<file stem>-<hash>``, the
    hash (8 hex) over the file's content and how it is read (columns, label map, max_length), so runs on
    two files (or two readings of one) never share a name. The shipped tweets keep the plain name."""
    model = Path(cfg.model).name
    dp = "" if cfg.dp_epsilon is None else f"_eps{cfg.dp_epsilon:g}"
    return (f"{cfg.method}_{model}_{cfg.task}_{cfg.partition}_c{cfg.clients}_r{cfg.rank}_s{cfg.local_steps}"
            f"{dp}_lr{cfg.lr:g}_seed{cfg.seed}{_data_tag(cfg)}.json")


def _data_tag(cfg: LLMConfig) -> str:
    if not cfg.data_path:
        return ""
    path = Path(cfg.data_path).expanduser()
    reading = [data_digest(path), cfg.text_column, cfg.text_b_column, cfg.label_column, cfg.label_map,
               cfg.commonsense_task, str(cfg.max_length)]
    return f"_{path.stem}-{hashlib.sha256(chr(0).join(reading).encode()).hexdigest()[:8]}"


def data_digest(path) -> str:
    """sha256 of a data file's content; of a folder (GLUE TSVs), over its files' relative paths and contents."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _digest(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _digest(path: Path, mtime_ns: int, size: int) -> str:  # keyed on mtime and size: a rewritten file rehashes
    from fedlora.checkpoint import file_sha256

    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def dp_record(cfg: LLMConfig, fed: Federation, history: list[dict]) -> Optional[dict]:
    """The run's privacy: each client's plan and the ε it spent for the DP steps it took (``None``
    without DP). Steps are counted from the history -- every client-round in it, kept or rejected,
    took its local steps as DP steps (empty Poisson batches included), so a resumed run counts the
    rounds before the interruption too -- or from the engine's counter when that is larger (a run that
    diverged has no history, but its clients trained)."""
    if fed.dp_plans is None:
        return None
    rounds = [0] * len(fed.dp_plans)
    for h in history:
        for c in list(h["clients"]) + [r["client"] for r in h["rejected"]]:
            rounds[c] += 1
    clients = []
    for c, plan in enumerate(fed.dp_plans):
        steps = max(rounds[c] * fed._steps(), fed.dp_steps[c])
        clients.append({"client": c, "samples": int(len(fed.parts[c])), "sample_rate": plan.sample_rate,
                        "noise_multiplier": plan.noise_multiplier, "steps": steps,
                        "epsilon_spent": plan.spent(steps)})
    return {"epsilon_target": plan.epsilon, "delta": plan.delta, "max_grad_norm": plan.max_grad_norm,
            "sampling": cfg.dp_sampling, "clients": clients,
            "epsilon_spent_max": max(c["epsilon_spent"] for c in clients)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Settings that cannot change a run's numbers: a resume may change them (fedlora.loop.resume_run).
NOT_RESULT_SHAPING = ("threads", "eval_every", "eval_splits")
# Keys added after fingerprints began, left out at their default: checkpoints written before them still resume.
LATER_KEYS = {"label_map": "", "data_stream": "round"}  # "round": how runs read rows before the key


def run_fingerprint(cfg: LLMConfig, fed: Federation) -> dict:
    """Everything that shapes a run: the whole config but ``NOT_RESULT_SHAPING``, the data file's content
    hash (or the shipped corpus's name and version), and the model's identity (never a machine path)."""
    config = {k: portable_path(v) if k in ("model", "data_path") else v
              for k, v in dataclasses.asdict(cfg).items()
              if k not in NOT_RESULT_SHAPING and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    data = {"sha256": data_digest(cfg.data_path)} if cfg.data_path else {"source": fed.splits.summary().get("source")}
    return {"tier": "llm_scale", "config": config, "data": data, "model": fed.spec.source,
            "dtype": fed.dtype}  # resolved: dtype="auto" is bf16 on one machine and float32 on another


def _class_counts(ds) -> dict:
    counts = np.bincount(ds.labels, minlength=len(ds.label_names))
    return {name: int(n) for name, n in zip(ds.label_names, counts)}


def labels_record(splits) -> Optional[dict]:
    """The classes (index order), their counts per split, and the majority-class baseline: the most
    frequent training class, always predicted, scored on the test split (``None`` for multiple choice)."""
    train = splits.train
    if not hasattr(train, "label_names"):
        return None
    per_split = {name: _class_counts(ds) for name, ds in (("train", train), ("test", splits.test),
                                                          ("val", splits.val)) if ds is not None}
    majority = int(np.argmax(np.bincount(train.labels, minlength=len(train.label_names))))
    test = splits.test.labels
    return {"names": list(train.label_names), "class_counts": per_split,
            "majority_class": train.label_names[majority],
            "majority_class_test_accuracy": float((test == majority).mean()) if test.size else None}


def _truncation(fed: Federation) -> dict:
    """Measured once per Federation (a sweep shares one across runs); warns on stderr when it cuts > 5%."""
    summary = getattr(fed, "truncation", None)
    if summary is None:
        from .truncation import truncation_summary, truncation_warning

        summary = truncation_summary(fed.tokenizer, fed.splits, kind=fed.cfg.kind, max_length=fed.cfg.max_length)
        fed.truncation = summary
        line = truncation_warning(summary)
        if line:
            print(line, file=sys.stderr)
    return summary


def _counting(local_train, rounds_here: set):
    """``local_train`` that notes each round it trains in this process (a resumed run skips the others)."""
    def train(task):
        rounds_here.add(task.round)
        return local_train(task)

    return train


def run(cfg: LLMConfig, *, out: Optional[Path] = None, checkpoint_dir: Optional[Path] = None, resume: bool = False,
        export_dir: Optional[Path] = None, stop_after: Optional[int] = None, progress: bool = True,
        federation: Optional[Federation] = None, extra: Optional[dict] = None) -> dict:
    """Train ``cfg`` and return (and, with ``out``, write) its record."""
    t0 = time.perf_counter()
    fed = federation if federation is not None else Federation(cfg, progress=progress)
    truncation = _truncation(fed)
    setup_s = time.perf_counter() - t0
    rounds_here: set = set()
    ranks, scales = fed.client_ranks()
    fcfg = fed_config(cfg, fed.num_clients)
    diverged, hist, state = None, [], None
    t1 = time.perf_counter()
    try:
        res = run_federated(fcfg, init=fed.init_state(), local_train=_counting(fed.local_train, rounds_here),
                            evaluate=fed.evaluate,
                            client_ranks=ranks, client_scales=scales, on_round_start=fed.on_round_start,
                            checkpoint_dir=checkpoint_dir, resume=resume, stop_after=stop_after, progress=progress,
                            local_optimizers=("default", "galore"),
                            run_info={"llm_config": dataclasses.asdict(cfg)},
                            fingerprint=run_fingerprint(cfg, fed) if checkpoint_dir is not None else None)
        hist, state = res.history, res.state
    except NonFiniteUpdateError as err:  # a client diverged: the lr is too large for this method
        diverged = str(err)
    train_s = time.perf_counter() - t1
    evals = [h for h in hist if "eval" in h]
    last = evals[-1]["eval"] if evals else {}
    per_client = cfg.local_steps * (cfg.clients if cfg.method == CENTRALISED else 1)
    steps = sum(len(h["clients"]) for h in hist) * per_client
    steps_here = sum(len(h["clients"]) for h in hist if h["round"] in rounds_here) * per_client
    labels = labels_record(fed.splits)
    exported = None
    if export_dir is not None and state is not None:
        exported = relative_source(export_global(fed, state, Path(export_dir)))
    record = {
        "method": cfg.method, "model": fed.spec.source, "model_family": fed.spec.family, "task": cfg.task,
        "clients": fed.num_clients, "partition": cfg.partition, "rank": cfg.rank, "seed": cfg.seed, "lr": cfg.lr,
        "rounds_done": len(hist), "complete": len(hist) == cfg.rounds or diverged is not None, "diverged": diverged,
        "final_test_accuracy": last.get("test_accuracy"),
        "majority_class_test_accuracy": labels["majority_class_test_accuracy"] if labels else None,
        "final_val_accuracy": last.get("val_accuracy"), "labels": labels, "truncation": truncation,
        "config": {k: portable_path(v) if k in ("model", "data_path") else v for k, v in dataclasses.asdict(cfg).items()},
        "data": fed.splits.summary(),
        "partition_summary": {k: v for k, v in getattr(fed, "partition_summary", {}).items() if k != "label_histogram"},
        "client_samples": [int(len(p)) for p in fed.parts],
        "rows_seen": fed.rows_seen(hist),  # reads per row, per client and over all (replayed: resume-proof)
        "rounds": [{"round": h["round"], "trains": h["trains"], "clients": h["clients"],
                    "train_loss": h["train"].get("train_loss"), **h.get("eval", {}),
                    "uplink_bytes": h["uplink_bytes"], "downlink_bytes": h["downlink_bytes"],
                    "rejected": h["rejected"], "averaging_error": h.get("averaging_error")} for h in hist],
        "total_uplink_bytes": sum(h["total_uplink_bytes"] for h in hist),
        "total_downlink_bytes": sum(h["total_downlink_bytes"] for h in hist),
        "uplink_bytes": sum(h["total_uplink_bytes"] for h in hist),  # the whole run, all clients
        "downlink_bytes": sum(h["total_downlink_bytes"] for h in hist),
        # the speed counts only the rounds this process trained: a resumed run's earlier rounds ran elsewhere
        "client_steps": steps, "client_steps_this_process": steps_here,
        "client_steps_per_minute": 60 * steps_here / train_s if rounds_here and train_s > 0 else None,
        "dp_epsilon": cfg.dp_epsilon, "dp": dp_record(cfg, fed, hist),
        "frozen_layer_cache": fed.cache is not None,
        "cache_mib": fed.cache.nbytes() / 2**20 if fed.cache is not None else 0.0,
        # the largest one client held in this process (0: no round trained here); GaLore's claim is memory
        **{k: v or None for k, v in fed.optimizer_memory.items()},
        "peak_rss_mib": peak_rss_mib(), "setup_seconds": setup_s, "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t0, "exported_adapter": exported,
        "checkpoint_dir": relative_source(checkpoint_dir) if checkpoint_dir is not None else None,
        "device": str(fed.device), "torch_threads": torch.get_num_threads(),
        "dtype": fed.dtype, "hardware": capability(fed.device.type),
        **provenance(), **(extra or {}),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, record)
    return record
