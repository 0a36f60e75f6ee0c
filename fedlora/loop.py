"""The round loop, the same for the MNIST toy, the LLMs and Flower.

Each round: sample clients (seeded), give every client an independent view of the global state
(``Rule.client_view``) when that client starts, let the tier's ``local_train`` train what the rule
trains that round, keep only the trained factors as the upload, validate and aggregate every matrix,
account the bytes, evaluate, checkpoint. ``rolora-chain`` instead hands each client the previous
client's result.

The state maps a name to a ``GlobalMatrix`` (an adapted matrix) or to a plain tensor: a dense
parameter such as a classifier head, which every client trains and the server averages
(``Σ p_k W_k``) whatever the rule. A client may also keep tensors to itself across rounds
(``ClientResult.local``, handed back as ``ClientTask.local`` the next time it is sampled).

Memory: for a ``linear`` rule (fedavg, ffa, rolora, full) each finished client is validated and
folded into a running weighted sum, so a round holds the global, the sum and one client's result
whatever the number of clients; the other rules keep every client's (low-rank) upload for the round.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .aggregators import Aggregated, RoundContext, Rule, aggregate, get_rule
from .averaging_error import ErrorTracker
from .checkpoint import fingerprint_diff, load_checkpoint, save_checkpoint
from .comm import RoundComm
from .config import ConfigError, FedConfig
from .factors import ClientUpdate, GlobalMatrix, LoRAFactors, nbytes
from .linalg import compute_dtype, weighted_sum
from .seeding import derive_seed, generator
from .validation import UpdateError, normalize_weights, validate_dense, validate_updates

__all__ = ["ClientTask", "ClientResult", "RunResult", "run_federated", "sample_clients", "client_view", "make_task",
           "client_round_seed",
           "RoundServer", "round_record", "save_round", "resume_run"]

log = logging.getLogger(__name__)

Params = Mapping[str, Union[LoRAFactors, Tensor]]  # per name: trained LoRA factors, or a dense tensor
State = Mapping[str, Union[GlobalMatrix, Tensor]]


@dataclass(frozen=True)
class ClientTask:
    """What a client is asked to do in one round."""

    client: int  # client id in [0, num_clients)
    round: int  # 0-based
    start: State  # the state it starts from, per name (its own copy)
    trains: str  # "AB", "A", "B" (the other factor frozen) or "W" (dense weight)
    seed: int  # seed for this client-round's draws (batch order, dropout)
    local_optimizer: str = "default"  # "galore" for full-galore
    local: Mapping[str, Tensor] = field(default_factory=dict)  # what this client kept from its last round


@dataclass(frozen=True)
class ClientResult:
    params: Params  # the trained state per name (LoRAFactors, the dense W for "W" rounds, dense tensors)
    num_samples: int  # n_k, the aggregation weight under weighting="samples"
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. {"train_loss": ...}
    local: Mapping[str, Tensor] = field(default_factory=dict)  # kept on the client, never sent


@dataclass
class RunResult:
    state: dict[str, Union[GlobalMatrix, Tensor]]
    history: list[dict]
    client_state: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def sample_clients(cfg: FedConfig, round_: int) -> list[int]:
    """The clients of round ``round_``, drawn without replacement from a (seed, round) generator."""
    k = cfg.sampled_per_round()
    if k >= cfg.num_clients:
        return list(range(cfg.num_clients))
    perm = torch.randperm(cfg.num_clients, generator=generator(cfg.seed, "sample", round_))
    return sorted(perm[:k].tolist())


def client_view(rule: Rule, state: State, *, client: int, round_: int, seed: int,
                rank: Optional[int], scale: Optional[float]) -> dict[str, Union[GlobalMatrix, Tensor]]:
    """Each client's independent copy of the global (tensors cloned: local training cannot alias it)."""
    out: dict = {}
    for name, g in state.items():
        if isinstance(g, Tensor):
            out[name] = g.clone()
            continue
        v = rule.client_view(g, rank=rank, scale=scale, seed=derive_seed(seed, "view", round_, client, name))
        out[name] = GlobalMatrix(
            lora=v.lora.clone() if v.lora is not None else None,
            base=v.base,  # frozen on the client; never trained, so sharing is safe
            W=v.W.clone() if v.W is not None else None)
    return out


def client_round_seed(seed: int, round_: int, client: int) -> int:
    """The seed of client ``client``'s draws in round ``round_`` (``ClientTask.seed``)."""
    return derive_seed(seed, "client", round_, client)


def make_task(rule: Rule, cfg: FedConfig, state: State, *, client: int, round_: int, rank: Optional[int],
              scale: Optional[float], local: Mapping[str, Tensor]) -> ClientTask:
    """Client ``client``'s task in round ``round_``: its own view of the global and its seeded draws."""
    return ClientTask(client=client, round=round_, trains=rule.trains(round_),
                      seed=client_round_seed(cfg.seed, round_, client),
                      local_optimizer=rule.local_optimizer, local=local,
                      start=client_view(rule, state, client=client, round_=round_, seed=cfg.seed, rank=rank, scale=scale))


def _upload(params: Params, trains: str, state: State, client: int) -> dict[str, Union[ClientUpdate, Tensor]]:
    """Keep only what was trained: that is what goes on the wire."""
    missing = [name for name in state if name not in params]
    extra = [name for name in params if name not in state]
    if missing or extra:
        raise UpdateError(f"client {client!r} sent {'no update for ' + repr(missing) if missing else ''}"
                          f"{' and ' if missing and extra else ''}{'unknown names ' + repr(extra) if extra else ''}; "
                          "local_train must return exactly the names of the global state", client=client)
    ups: dict = {}
    for name, p in params.items():
        if isinstance(state[name], Tensor):
            ups[name] = p  # a dense parameter: the tensor itself
        elif trains == "W":
            ups[name] = ClientUpdate(W=p if isinstance(p, Tensor) else getattr(p, "W", p))
        elif isinstance(p, LoRAFactors):
            ups[name] = ClientUpdate(A=p.A if "A" in trains else None, B=p.B if "B" in trains else None, scale=p.scale)
        else:
            raise UpdateError(f"{name}: client {client!r} sent a {type(p).__name__}, expected LoRAFactors",
                              client=client)
    return ups


def _nbytes(u) -> int:
    return nbytes(u) if isinstance(u, Tensor) else u.nbytes()


def _chain_start(view: State, prev: Params, trains: str) -> dict:
    """rolora-chain: start from the previous client's trained factor (the released code's behaviour)."""
    out = {}
    for name, g in view.items():
        p = prev[name]
        if isinstance(g, Tensor):  # the shared model object carries the head along too
            out[name] = p.clone()
            continue
        A = p.A.clone() if "A" in trains else g.lora.A
        B = p.B.clone() if "B" in trains else g.lora.B
        out[name] = g.replace(lora=LoRAFactors(A=A, B=B, scale=g.lora.scale))
    return out


def _weighted_metrics(metrics: Sequence[Mapping[str, float]], p: Tensor) -> dict[str, float]:
    """Per metric, the weighted mean over the clients that report it (weights renormalised over them)."""
    out = {}
    for k in sorted(set().union(*metrics) if metrics else set()):
        pk = [(float(w), float(m[k])) for m, w in zip(metrics, p) if k in m]
        total = sum(w for w, _ in pk)
        out[k] = sum(w * v for w, v in pk) / total if total > 0 else sum(v for _, v in pk) / len(pk)
    return out


def _weight(res: ClientResult, cfg: FedConfig, client: int) -> float:
    w = float(res.num_samples) if cfg.weighting == "samples" else 1.0
    if not (w >= 0 and w != float("inf")):
        raise UpdateError(f"client {client!r} reported num_samples={res.num_samples}; it must be a finite count >= 0",
                          client=client)
    return w


class RoundServer:
    """The server side of one round: takes finished clients one at a time, then aggregates.

    Under ``on_bad_update="drop"`` a client whose upload fails validation is left out and recorded;
    the global is never touched by it. Linear rules fold each accepted client into a running
    weighted sum (``Σ w_k u_k`` and ``Σ w_k``); the others keep every upload until ``finish``.
    """

    def __init__(self, rule: Rule, state: State, cfg: FedConfig, t: int, on_bad_update: str,
                 client_ranks, client_scales, fold: bool, track_error: bool = True):
        self.rule, self.state, self.cfg, self.t = rule, state, cfg, t
        # the round's averaging error (fedlora.averaging_error), in the history as "averaging_error"
        self.errors: Optional[ErrorTracker] = ErrorTracker() if track_error else None
        self.averaging_error: Optional[dict] = None
        self.trains, self.on_bad, self.fold = rule.trains(t), on_bad_update, fold
        self.client_ranks, self.client_scales = client_ranks, client_scales
        self.kept: list[int] = []  # client ids, in arrival order
        self.weights: list[float] = []
        self.metrics: list[Mapping[str, float]] = []
        self.uplink: dict[int, int] = {}
        self.rejected: list[dict] = []
        self.uploads: list[dict] = []  # non-folding rules only
        self.acc: dict[str, dict[str, Tensor]] = {}  # folding rules: name -> field -> Σ w_k u_k

    def _reject(self, err: UpdateError) -> None:
        if self.on_bad == "raise":
            raise err
        log.warning("round %d: rejected %s", self.t, err)
        self.rejected.append({"client": err.client, "error": str(err)})

    def add(self, client: int, res: ClientResult) -> bool:
        """Validate one client's upload and take it in; returns whether it was accepted."""
        try:
            w = _weight(res, self.cfg, client)
            ups = _upload(res.params, self.trains, self.state, client)
            for name, u in ups.items():
                g = self.state[name]
                if isinstance(g, Tensor):
                    validate_dense(g, [u], client_ids=[client], name=name)
                else:
                    validate_updates(g, [u], self.trains, per_client_rank=self.rule.per_client_rank,
                                     client_ids=[client], name=name)
        except UpdateError as err:
            if err.client is None:
                err.client = client
            self._reject(err)
            return False
        if self.errors is not None:
            self.errors.add(client, w, self.state, ups)
        if self.fold:
            for name, u in ups.items():
                fields = {"dense": u} if isinstance(u, Tensor) else u.fields()
                acc = self.acc.setdefault(name, {})
                for f, x in fields.items():
                    if f in acc:
                        acc[f].add_(x.to(acc[f].dtype), alpha=w)
                    else:
                        acc[f] = x.to(compute_dtype(x.dtype)) * w  # half precision is summed in float32
        else:
            self.uploads.append(ups)
        self.kept.append(client)
        self.weights.append(w)
        self.metrics.append(dict(res.metrics))
        self.uplink[client] = sum(_nbytes(u) for u in ups.values())
        return True

    def finish(self) -> tuple[dict, dict]:
        """The new state and, per name, what is broadcast (``Aggregated``, or the averaged tensor)."""
        if not self.kept:
            raise UpdateError(f"round {self.t}: no client update was accepted "
                              f"({len(self.rejected)} rejected); the global state is unchanged")
        new, aggs = self._finish_folded() if self.fold else self._finish_all()
        if self.errors is not None:
            ranks, scales = self._ctx().client_ranks, self._ctx().client_scales
            self.averaging_error = self.errors.finish(self.rule, self.state, new, self.kept, self.weights,
                                                      ranks=ranks, scales=scales)
        return new, aggs

    def _finish_all(self) -> tuple[dict, dict]:
        while True:
            try:
                return self._aggregate_all()
            except UpdateError as err:
                if self.on_bad == "raise" or err.client is None or err.client not in self.kept or len(self.kept) == 1:
                    raise
                self._reject(err)
                if self.errors is not None:
                    self.errors.drop(err.client)
                i = self.kept.index(err.client)
                for lst in (self.kept, self.weights, self.metrics, self.uploads):
                    lst.pop(i)
                self.uplink.pop(err.client, None)

    def _ctx(self) -> RoundContext:
        ranks = [self.client_ranks[c] for c in self.kept] if self.client_ranks is not None else None
        scales = [self.client_scales[c] for c in self.kept] if self.client_scales is not None else None
        return RoundContext(round=self.t, client_ranks=ranks, client_scales=scales)

    def _aggregate_all(self) -> tuple[dict, dict]:
        new, aggs = {}, {}
        ctx = self._ctx()
        for name, g in self.state.items():
            ups = [u[name] for u in self.uploads]
            if isinstance(g, Tensor):
                validate_dense(g, ups, client_ids=self.kept, name=name)
                p = normalize_weights(self.weights, len(ups), client_ids=self.kept)
                new[name] = aggs[name] = weighted_sum(ups, p).to(g.dtype)
                continue
            agg = aggregate(self.rule, g, ups, self.weights, ctx=ctx, client_ids=self.kept, name=name)
            new[name], aggs[name] = agg.state, agg
        return new, aggs

    def _finish_folded(self) -> tuple[dict, dict]:
        total = sum(self.weights)
        if total <= 0:
            raise UpdateError("all client weights are zero; at least one client must carry weight (e.g. its sample count)")
        new, aggs = {}, {}
        for name, g in self.state.items():
            mean = {f: (x / total) for f, x in self.acc[name].items()}  # Σ p_k u_k
            if isinstance(g, Tensor):
                new[name] = aggs[name] = mean["dense"].to(g.dtype)
                continue
            dt = g.W.dtype if g.W is not None else g.lora.A.dtype
            scale = g.lora.scale if g.lora is not None else 1.0
            u = ClientUpdate(**{f: x.to(dt) for f, x in mean.items()}, scale=scale)
            # a linear rule applied to the one averaged update is the rule applied to all of them
            agg = aggregate(self.rule, g, [u], [1.0], ctx=RoundContext(round=self.t), client_ids=["mean"], name=name)
            new[name], aggs[name] = agg.state, agg
        return new, aggs


def run_federated(cfg: FedConfig, *, init: State,
                  local_train: Callable[[ClientTask], ClientResult],
                  local_train_batch: Optional[Callable[[Sequence[ClientTask]], Sequence[ClientResult]]] = None,
                  evaluate: Optional[Callable[[int, State], Mapping[str, float]]] = None,
                  client_ranks: Optional[Sequence[int]] = None, client_scales: Optional[Sequence[float]] = None,
                  checkpoint_dir: Optional[Path] = None, resume: bool = False,
                  on_bad_update: str = "raise", stop_after: Optional[int] = None,
                  local_optimizers: Sequence[str] = ("default",),
                  progress: bool = True, run_info: Optional[Mapping] = None,
                  on_round_start: Optional[Callable[[int, State], None]] = None,
                  averaging_error: bool = True, fingerprint: Optional[Mapping] = None) -> RunResult:
    """Run ``cfg.rounds`` rounds of ``cfg.rule`` from ``init``.

    ``local_train_batch``, when given, trains all clients of a round in one call (vectorised tiers);
    chained rules call it with one client at a time (each client needs the previous one's result). Otherwise clients run one after another, each view made when
    that client starts. ``on_bad_update="drop"`` rejects a malformed client (recorded in the round's
    history) instead of stopping the run; the global never sees it either way.
    ``stop_after`` ends the run after that many rounds in this call (to simulate an interruption).
    ``local_optimizers`` names the local optimizers ``local_train`` honours (``ClientTask.local_optimizer``):
    a rule that needs another one (``full-galore`` needs ``"galore"``) is refused rather than run with
    plain SGD/AdamW by mistake — the silent failure of a published GaLore baseline.
    ``on_round_start(t, state)`` is called before the round's first client (a tier merges the new
    frozen-weight corrections into its model there, once per round).
    ``averaging_error`` records each round's averaging error (``fedlora.averaging_error``: the server's
    new global against the average of the clients' trained adapters) in the history; it keeps every
    client's low-rank factors of the round (and one float64 m × n sum for the full-weight rules).
    ``fingerprint``: a JSON-able dict of everything else that shapes the run (the tier's whole config,
    the data file's content hash, the model's identity), stored in every checkpoint; ``resume`` refuses a
    checkpoint whose fingerprint differs, naming the keys. Leave out what cannot change the numbers
    (output folders, evaluation frequency, threads).
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
    client_state: dict[int, dict[str, Tensor]] = {}
    if checkpoint_dir is not None and resume:
        loaded = resume_run(Path(checkpoint_dir), cfg, fingerprint=fingerprint)
        if loaded is not None:
            state, history, start, client_state = loaded

    rounds = range(start, cfg.rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"{cfg.rule}", initial=start, total=cfg.rounds, leave=False)
    rank_of = (lambda c: client_ranks[c]) if client_ranks is not None else (lambda c: None)
    scale_of = (lambda c: client_scales[c]) if client_scales is not None else (lambda c: None)
    done_here = 0
    for t in rounds:
        clients = sample_clients(cfg, t)
        trains = rule.trains(t)
        if on_round_start is not None:
            on_round_start(t, state)

        def task_of(c: int) -> ClientTask:  # made when the client starts: one view in memory at a time
            return make_task(rule, cfg, state, client=c, round_=t, rank=rank_of(c), scale=scale_of(c),
                             local=client_state.get(c, {}))

        batched = local_train_batch is not None and not rule.chain
        server = RoundServer(rule, state, cfg, t, on_bad_update, client_ranks, client_scales,
                             fold=rule.linear and not batched, track_error=averaging_error)
        one = (lambda task: local_train_batch([task])[0]) if local_train_batch is not None else local_train
        for c, res in _train(clients, task_of, one if rule.chain else local_train,
                             local_train_batch if batched else None, chain=rule.chain, trains=trains):
            if server.add(c, res) and res.local:
                client_state[c] = dict(res.local)
        state, aggs = server.finish()

        record = round_record(rule, server, aggs, rank_of=rank_of)
        last = t == cfg.rounds - 1
        if evaluate is not None and ((t + 1) % cfg.eval_every == 0 or last):
            record["eval"] = {k: float(v) for k, v in evaluate(t, state).items()}
        history.append(record)
        if checkpoint_dir is not None and ((t + 1) % cfg.checkpoint_every == 0 or last):
            save_round(Path(checkpoint_dir), cfg, state=state, round_done=t, history=history,
                       client_state=client_state, run_info={**(run_info or {}), "fingerprint": fingerprint})
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            break
    return RunResult(state=state, history=history, client_state=client_state)


def round_record(rule: Rule, server: RoundServer, aggs: Mapping, *,
                 rank_of: Callable[[int], Optional[int]]) -> dict:
    """One round's history record: who was kept and rejected, the weighted train metrics, the bytes.

    Downlink: what each kept client receives after aggregation (``Rule.client_downlink_bytes``);
    uplink: the raw bytes of what it trained (``RoundServer.add``)."""
    comm = RoundComm()
    for c in server.kept:
        comm.uplink[c] = server.uplink[c]
        r = rank_of(c)
        comm.downlink[c] = sum(nbytes(a) if isinstance(a, Tensor) else
                               rule.client_downlink_bytes(a, r if r is not None else _rank(a))
                               for a in aggs.values())
    p = torch.tensor(server.weights, dtype=torch.float64)
    p = p / p.sum() if float(p.sum()) > 0 else p
    return {"round": server.t, "clients": list(server.kept), "trains": server.trains,
            "train": _weighted_metrics(server.metrics, p), "rejected": server.rejected,
            "averaging_error": server.averaging_error, **comm.as_dict()}


def save_round(directory: Path, cfg: FedConfig, *, state: State, round_done: int, history: list,
               client_state: Mapping, run_info: Optional[Mapping] = None) -> None:
    """Checkpoint after ``round_done`` with what ``resume_run`` needs (config, history, seed)."""
    save_checkpoint(Path(directory), state=state, round_done=round_done, client_state=client_state,
                    info={"config": dataclasses.asdict(cfg), "history": history, "seed": cfg.seed,
                          "rng": "all draws derive from (seed, round, client, purpose): fedlora.seeding",
                          **(run_info or {})})


def resume_run(directory: Path, cfg: FedConfig, *, fingerprint: Optional[Mapping] = None
               ) -> Optional[tuple[dict, list, int, dict]]:
    """``(state, history, next round, client_state)`` from ``directory``'s checkpoint, or ``None``.

    Refuses (``ConfigError``) a checkpoint written with another core config or, when ``fingerprint`` is
    given, with another fingerprint: resuming would train the remaining rounds, or label the finished
    ones, under settings they were not run with."""
    loaded = load_checkpoint(Path(directory))
    if loaded is None:
        return None
    state, info = loaded
    free = ("eval_every", "checkpoint_every")  # when to evaluate or save never changes the numbers
    core = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
    diff = fingerprint_diff({k: v for k, v in (info.get("config") or {}).items() if k not in free}, core)
    if diff:
        raise ConfigError(f"checkpoint in {directory} was written with another run config ({'; '.join(diff)}); "
                          "resume with the same config, or start fresh in another checkpoint directory")
    if fingerprint is not None:
        old = info.get("fingerprint")
        diff = fingerprint_diff(old, fingerprint) if old is not None else ["(the checkpoint records no fingerprint)"]
        if diff:
            raise ConfigError(f"checkpoint in {directory} was written with other settings ({'; '.join(diff)}); "
                              "resume with the same settings, or start fresh in another checkpoint directory "
                              "(or delete this one)")
    start = info["round_done"] + 1
    log.info("resumed from round %d", start)
    return state, info["history"], start, info.get("client_state", {})


def _train(clients, task_of, local_train, local_train_batch, *, chain: bool,
           trains: str) -> Iterator[tuple[int, ClientResult]]:
    """Yield ``(client, result)`` as clients finish: all at once (batched), chained, or one by one."""
    if local_train_batch is not None:
        yield from zip(clients, local_train_batch([task_of(c) for c in clients]))
        return
    prev = None
    for c in clients:
        task = task_of(c)
        if chain and prev is not None:
            task = dataclasses.replace(task, start=_chain_start(task.start, prev, trains))
        res = local_train(task)
        prev = res.params
        yield c, res


def _rank(agg: Aggregated) -> int:
    lora = agg.state.lora
    return lora.rank if lora is not None else 0
