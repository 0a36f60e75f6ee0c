"""One federated (or centralised) run on a real transformer: config in, one JSON record out, the final
global adapter exported with peft's ``save_pretrained``."""
from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Optional

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

__all__ = ["run", "fed_config", "run_filename", "peak_rss_mib", "dp_record"]


def fed_config(cfg: LLMConfig, num_clients: int) -> FedConfig:
    rule = "fedavg" if cfg.method == CENTRALISED else cfg.method
    return FedConfig(rule=rule, rounds=cfg.rounds, num_clients=num_clients, seed=cfg.seed, eval_every=cfg.eval_every,
                     clients_per_round=1.0 if cfg.method == CENTRALISED else cfg.clients_per_round)


def run_filename(cfg: LLMConfig) -> str:
    model = Path(cfg.model).name
    dp = "" if cfg.dp_epsilon is None else f"_eps{cfg.dp_epsilon:g}"
    return (f"{cfg.method}_{model}_{cfg.task}_{cfg.partition}_c{cfg.clients}_r{cfg.rank}_s{cfg.local_steps}"
            f"{dp}_lr{cfg.lr:g}_seed{cfg.seed}.json")


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


def run_fingerprint(cfg: LLMConfig, fed: Federation) -> dict:
    """Everything that shapes a run: the whole config but ``NOT_RESULT_SHAPING``, the data file's content
    hash (or the shipped corpus's name and version), and the model's identity (never a machine path)."""
    from fedlora.checkpoint import file_sha256

    config = {k: portable_path(v) if k in ("model", "data_path") else v
              for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RESULT_SHAPING}
    data = {"sha256": file_sha256(Path(cfg.data_path))} if cfg.data_path else {"source": fed.splits.summary().get("source")}
    return {"tier": "llm_scale", "config": config, "data": data, "model": fed.spec.source}


def run(cfg: LLMConfig, *, out: Optional[Path] = None, checkpoint_dir: Optional[Path] = None, resume: bool = False,
        export_dir: Optional[Path] = None, stop_after: Optional[int] = None, progress: bool = True,
        federation: Optional[Federation] = None, extra: Optional[dict] = None) -> dict:
    """Train ``cfg`` and return (and, with ``out``, write) its record."""
    t0 = time.perf_counter()
    fed = federation if federation is not None else Federation(cfg, progress=progress)
    setup_s = time.perf_counter() - t0
    ranks, scales = fed.client_ranks()
    fcfg = fed_config(cfg, fed.num_clients)
    diverged, hist, state = None, [], None
    t1 = time.perf_counter()
    try:
        res = run_federated(fcfg, init=fed.init_state(), local_train=fed.local_train, evaluate=fed.evaluate,
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
    steps = sum(len(h["clients"]) for h in hist) * (cfg.local_steps * (cfg.clients if cfg.method == CENTRALISED else 1))
    exported = None
    if export_dir is not None and state is not None:
        exported = relative_source(export_global(fed, state, Path(export_dir)))
    record = {
        "method": cfg.method, "model": fed.spec.source, "model_family": fed.spec.family, "task": cfg.task,
        "clients": fed.num_clients, "partition": cfg.partition, "rank": cfg.rank, "seed": cfg.seed, "lr": cfg.lr,
        "rounds_done": len(hist), "complete": len(hist) == cfg.rounds or diverged is not None, "diverged": diverged,
        "final_test_accuracy": last.get("test_accuracy"), "final_val_accuracy": last.get("val_accuracy"),
        "config": {k: portable_path(v) if k in ("model", "data_path") else v for k, v in dataclasses.asdict(cfg).items()},
        "data": fed.splits.summary(),
        "partition_summary": {k: v for k, v in getattr(fed, "partition_summary", {}).items() if k != "label_histogram"},
        "client_samples": [int(len(p)) for p in fed.parts],
        "rounds": [{"round": h["round"], "trains": h["trains"], "clients": h["clients"],
                    "train_loss": h["train"].get("train_loss"), **h.get("eval", {}),
                    "uplink_bytes": h["uplink_bytes"], "downlink_bytes": h["downlink_bytes"],
                    "rejected": h["rejected"], "averaging_error": h.get("averaging_error")} for h in hist],
        "total_uplink_bytes": sum(h["total_uplink_bytes"] for h in hist),
        "total_downlink_bytes": sum(h["total_downlink_bytes"] for h in hist),
        "uplink_bytes": sum(h["total_uplink_bytes"] for h in hist),  # the whole run, all clients
        "downlink_bytes": sum(h["total_downlink_bytes"] for h in hist),
        "client_steps": steps, "client_steps_per_minute": 60 * steps / train_s if train_s > 0 else None,
        "dp_epsilon": cfg.dp_epsilon, "dp": dp_record(cfg, fed, hist),
        "frozen_layer_cache": fed.cache is not None,
        "cache_mib": fed.cache.nbytes() / 2**20 if fed.cache is not None else 0.0,
        "peak_rss_mib": peak_rss_mib(), "setup_seconds": setup_s, "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t0, "exported_adapter": exported,
        "device": str(fed.device), "torch_threads": torch.get_num_threads(),
        **provenance(), **(extra or {}),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, record)
    return record
