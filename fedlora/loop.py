"""The round loop, the same for the MNIST toy, the LLMs and Flower.

Each round: sample clients (seeded), give every client an independent view of the global state
(``Rule.client_view``), let the tier's ``local_train`` train what the rule trains that round, keep
only the trained factors as the upload, validate and aggregate every matrix, account the bytes,
evaluate, checkpoint. ``rolora-chain`` instead hands each client the previous client's result.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .aggregators import Aggregated, RoundContext, Rule, aggregate, get_rule
from .checkpoint import load_checkpoint, save_checkpoint
from .comm import RoundComm
from .config import ConfigError, FedConfig
from .factors import ClientUpdate, GlobalMatrix, LoRAFactors
from .seeding import derive_seed, generator
from .validation import UpdateError

__all__ = ["ClientTask", "ClientResult", "RunResult", "run_federated", "sample_clients", "client_view"]

log = logging.getLogger(__name__)

Params = Mapping[str, Union[LoRAFactors, Tensor]]  # per matrix: trained LoRA factors, or a dense W


@dataclass(frozen=True)
class ClientTask:
    """What a client is asked to do in one round."""

    client: int  # client id in [0, num_clients)
    round: int  # 0-based
    start: Mapping[str, GlobalMatrix]  # the state it starts from, per adapted matrix (its own copy)
    trains: str  # "AB", "A", "B" (the other factor frozen) or "W" (dense weight)
    seed: int  # seed for this client-round's draws (batch order, dropout)
    local_optimizer: str = "default"  # "galore" for full-galore


@dataclass(frozen=True)
class ClientResult:
    params: Params  # the trained state per matrix (LoRAFactors, or the dense W for "W" rounds)
    num_samples: int  # n_k, the aggregation weight under weighting="samples"
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. {"train_loss": ...}


@dataclass
class RunResult:
    state: dict[str, GlobalMatrix]
    history: list[dict]


def sample_clients(cfg: FedConfig, round_: int) -> list[int]:
    """The clients of round ``round_``, drawn without replacement from a (seed, round) generator."""
    k = cfg.sampled_per_round()
    if k >= cfg.num_clients:
        return list(range(cfg.num_clients))
    perm = torch.randperm(cfg.num_clients, generator=generator(cfg.seed, "sample", round_))
    return sorted(perm[:k].tolist())


def client_view(rule: Rule, state: Mapping[str, GlobalMatrix], *, client: int, round_: int, seed: int,
                rank: Optional[int], scale: Optional[float]) -> dict[str, GlobalMatrix]:
    """Each client's independent copy of the global (tensors cloned: local training cannot alias it)."""
    out = {}
    for name, g in state.items():
        v = rule.client_view(g, rank=rank, scale=scale, seed=derive_seed(seed, "view", round_, client, name))
        out[name] = GlobalMatrix(
            lora=v.lora.clone() if v.lora is not None else None,
            base=v.base,  # frozen on the client; never trained, so sharing is safe
            W=v.W.clone() if v.W is not None else None)
    return out


def _upload(params: Params, trains: str) -> dict[str, ClientUpdate]:
    """Keep only what was trained: that is what goes on the wire."""
    ups = {}
    for name, p in params.items():
        if trains == "W":
            ups[name] = ClientUpdate(W=p if isinstance(p, Tensor) else p.W)
        else:
            ups[name] = ClientUpdate(A=p.A if "A" in trains else None, B=p.B if "B" in trains else None, scale=p.scale)
    return ups


def _chain_start(view: Mapping[str, GlobalMatrix], prev: Params, trains: str) -> dict[str, GlobalMatrix]:
    """rolora-chain: start from the previous client's trained factor (the released code's behaviour)."""
    out = {}
    for name, g in view.items():
        p = prev[name]
        A = p.A.clone() if "A" in trains else g.lora.A
        B = p.B.clone() if "B" in trains else g.lora.B
        out[name] = g.replace(lora=LoRAFactors(A=A, B=B, scale=g.lora.scale))
    return out


def _weighted_metrics(results: Sequence[ClientResult], p: Tensor) -> dict[str, float]:
    keys = set().union(*(r.metrics for r in results)) if results else set()
    return {k: float(sum(float(pk) * r.metrics[k] for r, pk in zip(results, p) if k in r.metrics)) for k in sorted(keys)}


def run_federated(cfg: FedConfig, *, init: Mapping[str, GlobalMatrix],
                  local_train: Callable[[ClientTask], ClientResult],
                  local_train_batch: Optional[Callable[[Sequence[ClientTask]], Sequence[ClientResult]]] = None,
                  evaluate: Optional[Callable[[int, Mapping[str, GlobalMatrix]], Mapping[str, float]]] = None,
                  client_ranks: Optional[Sequence[int]] = None, client_scales: Optional[Sequence[float]] = None,
                  checkpoint_dir: Optional[Path] = None, resume: bool = False,
                  on_bad_update: str = "raise", stop_after: Optional[int] = None,
                  local_optimizers: Sequence[str] = ("default",),
                  progress: bool = True, run_info: Optional[Mapping] = None) -> RunResult:
    """Run ``cfg.rounds`` rounds of ``cfg.rule`` from ``init``.

    ``local_train_batch``, when given, trains all clients of a round in one call (vectorised tiers);
    it is not used for chained rules. ``on_bad_update="drop"`` rejects a malformed client (recorded
    in the round's history) instead of stopping the run; the global never sees it either way.
    ``stop_after`` ends the run after that many rounds in this call (to simulate an interruption).
    ``local_optimizers`` names the local optimizers ``local_train`` honours (``ClientTask.local_optimizer``):
    a rule that needs another one (``full-galore`` needs ``"galore"``) is refused rather than run with
    plain SGD/AdamW by mistake — the silent failure of a published GaLore baseline.
    """
    if on_bad_update not in ("raise", "drop"):
        raise ConfigError(f"on_bad_update={on_bad_update!r}; use 'raise' or 'drop'")
    rule = get_rule(cfg.rule)
    if rule.local_optimizer not in local_optimizers:
        raise ConfigError(f"rule {rule.name!r} needs the local optimizer {rule.local_optimizer!r}, which this "
                          f"local_train does not declare (it honours {list(local_optimizers)}); implement it and pass "
                          f"local_optimizers=(..., {rule.local_optimizer!r}), or choose another rule")
    if client_ranks is not None and len(client_ranks) != cfg.num_clients:
        raise ConfigError(f"client_ranks has {len(client_ranks)} entries for {cfg.num_clients} clients")
    state, history, start = dict(init), [], 0
    cfg_json = dataclasses.asdict(cfg)
    if checkpoint_dir is not None and resume:
        loaded = load_checkpoint(Path(checkpoint_dir))
        if loaded is not None:
            state, info = loaded
            if info.get("config") != cfg_json:
                raise ConfigError(f"checkpoint in {checkpoint_dir} was written with config {info.get('config')}, "
                                  f"not {cfg_json}; resume with the same config or use a fresh directory")
            history, start = info["history"], info["round_done"] + 1
            log.info("resumed from round %d", start)

    rounds = range(start, cfg.rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"{cfg.rule}", initial=start, total=cfg.rounds, leave=False)
    done_here = 0
    for t in rounds:
        clients = sample_clients(cfg, t)
        trains = rule.trains(t)
        rank_of = (lambda c: client_ranks[c]) if client_ranks is not None else (lambda c: None)
        scale_of = (lambda c: client_scales[c]) if client_scales is not None else (lambda c: None)
        tasks = [ClientTask(client=c, round=t, trains=trains, seed=derive_seed(cfg.seed, "client", t, c),
                            local_optimizer=rule.local_optimizer,
                            start=client_view(rule, state, client=c, round_=t, seed=cfg.seed,
                                              rank=rank_of(c), scale=scale_of(c)))
                 for c in clients]
        if rule.chain:
            results, prev = [], None
            for task in tasks:
                if prev is not None:
                    task = dataclasses.replace(task, start=_chain_start(task.start, prev, trains))
                res = local_train(task)
                results.append(res)
                prev = res.params
        elif local_train_batch is not None:
            results = list(local_train_batch(tasks))
        else:
            results = [local_train(task) for task in tasks]

        uploads = [_upload(r.params, trains) for r in results]
        rejected = []
        state, aggs, kept = _aggregate_model(rule, state, clients, uploads, results, cfg, t, rejected, on_bad_update,
                                             client_ranks, client_scales)
        comm = RoundComm()
        for i in kept:
            c = clients[i]
            comm.uplink[c] = sum(u.nbytes() for u in uploads[i].values())
            r = rank_of(c)
            comm.downlink[c] = sum(rule.client_downlink_bytes(a, r if r is not None else _rank(a)) for a in aggs.values())
        weights = [results[i].num_samples if cfg.weighting == "samples" else 1.0 for i in kept]
        p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        record = {"round": t, "clients": [clients[i] for i in kept], "trains": trains,
                  "train": _weighted_metrics([results[i] for i in kept], p), "rejected": rejected, **comm.as_dict()}
        last = t == cfg.rounds - 1
        if evaluate is not None and ((t + 1) % cfg.eval_every == 0 or last):
            record["eval"] = {k: float(v) for k, v in evaluate(t, state).items()}
        history.append(record)
        if checkpoint_dir is not None and ((t + 1) % cfg.checkpoint_every == 0 or last):
            save_checkpoint(Path(checkpoint_dir), state=state, round_done=t,
                            info={"config": cfg_json, "history": history, "seed": cfg.seed,
                                  "rng": "all draws derive from (seed, round, client, purpose): fedlora.seeding",
                                  **(run_info or {})})
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            break
    return RunResult(state=state, history=history)


def _rank(agg: Aggregated) -> int:
    lora = agg.state.lora
    return lora.rank if lora is not None else 0


def _aggregate_model(rule, state, clients, uploads, results, cfg, t, rejected, on_bad_update,
                     client_ranks, client_scales):
    """Aggregate every matrix; the new state is assembled aside and returned only if all succeed."""
    kept = list(range(len(clients)))
    while True:
        try:
            new, aggs = {}, {}
            weights = [results[i].num_samples if cfg.weighting == "samples" else 1.0 for i in kept]
            ranks = [client_ranks[clients[i]] for i in kept] if client_ranks is not None else None
            scales = [client_scales[clients[i]] for i in kept] if client_scales is not None else None
            ctx = RoundContext(round=t, client_ranks=ranks, client_scales=scales)
            for name, g in state.items():
                missing = [clients[i] for i in kept if name not in uploads[i]]
                if missing:
                    raise UpdateError(f"{name}: client {missing[0]!r} sent no update for this matrix; "
                                      f"local_train must return every adapted matrix")
                agg = aggregate(rule, g, [uploads[i][name] for i in kept], weights, ctx=ctx,
                                client_ids=[clients[i] for i in kept], name=name)
                new[name], aggs[name] = agg.state, agg
            return new, aggs, kept
        except UpdateError as err:
            bad = _culprit(err, [clients[i] for i in kept])
            if on_bad_update == "raise" or bad is None or len(kept) == 1:
                raise
            log.warning("round %d: rejected %s", t, err)
            rejected.append({"client": clients[kept[bad]], "error": str(err)})
            kept.pop(bad)


def _culprit(err: UpdateError, ids: Sequence[int]) -> Optional[int]:
    msg = str(err)
    for pos, c in enumerate(ids):
        if f"client {c!r} (position {pos})" in msg:
            return pos
    return None
