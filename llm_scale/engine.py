"""Local training and evaluation of real transformers for the round loop.

One base model in memory for every client: ``Federation`` builds it once (peft-wrapped, with the
frozen-layer cache when it applies), and each client's ``local_train`` copies its view into the
adapter (``AdapterBridge.load``), runs ``local_steps`` seeded mini-batch steps, and reads back what it
trained. ``full`` / ``full-galore`` clients train the targeted dense weights of the same model. With
``dp_epsilon`` set, the local steps are DP-SGD steps (``private.dp_sgd``; ``fedlora.dp`` for the math).
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from fedlora import GlobalMatrix, init_lora
from fedlora.config import ConfigError
from fedlora.dp import DPPlan, plan as dp_plan, poisson_batches
from fedlora.factors import nbytes
from fedlora.loop import ClientResult, ClientTask
from fedlora.partition import make_partition
from fedlora.seeding import derive_seed, generator
from fedlora.streams import prior_participations, seen_counts, seen_summary, stream_rows

from .batches import (Encoded, batch_plan, choice_logprob, collate_choices, collate_classification,
                      encode_choices, encode_classification, PROMPT_SUFFIX)
from .bridge import AdapterBridge, lora_scale
from .cache import CausalLayerCache, FrozenLayerCache, cache_eligible
from .commonsense import MultipleChoice
from .config import CENTRALISED, LLMConfig
from .hardware import resolve_dtype
from .models import load_model
from .tasks import Splits, load_splits

__all__ = ["Federation", "pick_device"]

PER_CLIENT_RANK = ("flexlora", "flora")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fedlora.config import ConfigError

        raise ConfigError("device='cuda' but torch sees no GPU; use device='auto' or 'cpu'")
    return torch.device(name)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """The bytes of an optimizer's state: every tensor it keeps per parameter (Adam's two moments and step;
    GaLore's projected moments and the projector's basis, a tensor on an object in the state)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                total += nbytes(value)
            elif hasattr(value, "__dict__"):  # GaLoreProjector: its ortho_matrix
                total += sum(nbytes(v) for v in vars(value).values() if isinstance(v, Tensor))
    return total


class Federation:
    """Everything a run needs, built once: data, tokens, partition, model, bridge, cache."""

    def __init__(self, cfg: LLMConfig, *, splits: Optional[Splits] = None, cache: Optional[FrozenLayerCache] = None,
                 progress: bool = False, tiny: Optional[dict] = None):
        """``splits`` and ``cache`` (from another ``Federation`` of the same model, data and layers) are
        reused rather than rebuilt: a sweep builds them once for all its seeds."""
        from peft import LoraConfig, get_peft_model

        self.cfg, self.tiny = cfg, tiny
        if cfg.threads and not torch.cuda.is_available():
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device.type)  # "float32" | "bfloat16": what autocast runs
        self.splits = splits if splits is not None else load_splits(cfg)
        self.multiple_choice = isinstance(self.splits.train, MultipleChoice)
        num_labels = None if cfg.kind == "causal" else len(self.splits.train.label_names)
        model, self.tokenizer, self.spec = load_model(cfg.model, kind=cfg.kind, num_labels=num_labels,
                                                      seed=derive_seed(cfg.seed, "model"), tiny=tiny)
        targets = list(cfg.targets or self.spec.default_targets)
        self.lora_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                      layers_to_transform=list(cfg.layers) or None, lora_dropout=cfg.lora_dropout,
                                      use_rslora=cfg.rslora, fan_in_fan_out=self.spec.fan_in_fan_out,
                                      modules_to_save=list(self.spec.head_modules) or None)
        self.model = get_peft_model(model, self.lora_config).to(self.device)
        self.bridge = AdapterBridge(self.model, lora_config=self.lora_config, head_mode=cfg.head)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.encoded = {name: self._encode(ds) for name, ds in
                        (("train", self.splits.train), ("test", self.splits.test), ("val", self.splits.val))
                        if ds is not None}
        self.lengths = self.encoded["train"].lengths() if cfg.length_grouped else None
        self.parts = self._partition()
        self._plan_dp()
        self._reset_memory()
        self.local_heads: dict[int, dict[str, Tensor]] = {}
        self.cache: Optional[FrozenLayerCache] = None
        if cfg.cache_frozen_layers and cache_eligible(kind=cfg.kind, layers=cfg.layers, family=self.spec.family):
            if cache is not None:
                if cache.L0 != min(cfg.layers):
                    raise ValueError(f"the cache given was built below block {cache.L0}; this config adapts from "
                                     f"block {min(cfg.layers)}: build a new one")
                self.cache = cache.for_model(self.model.get_base_model())
            if self.cache is None:
                with self._autocast():  # the cached rows are what the uncached forward computes
                    self._build_cache(progress)

    # what a sweep may change between runs on one Federation; anything else (seed, model, data,
    # adapted modules, head) needs a new one
    RECONFIGURABLE = frozenset({"method", "clients", "partition", "dirichlet_alpha", "total_samples", "rounds",
                                "clients_per_round", "local_steps", "batch_size", "lr", "rank", "client_ranks",
                                "eval_every", "eval_splits", "optimizer", "weight_decay", "galore_rank",
                                "galore_update_proj_gap", "galore_scale", "galore_proj_type", "dp_epsilon", "dp_delta",
                                "dp_max_grad_norm", "dp_sampling", "data_stream"})

    def reconfigure(self, cfg: LLMConfig) -> "Federation":
        """Point this Federation at another run of the same seed, model and data (other rule, clients,
        partition, rank, schedule, lr): the partition is redrawn, the model and cache are kept. The run
        then equals one on a fresh ``Federation(cfg)`` (tested)."""
        import dataclasses

        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(self.cfg, f.name)}
        fixed = sorted(changed - self.RECONFIGURABLE)
        if fixed:
            raise ValueError(f"cannot reconfigure {', '.join(fixed)} on a built Federation; build a new one")
        self.cfg = cfg
        self.partition_summary = {}
        self.parts = self._partition()
        self._plan_dp()
        self._reset_memory()
        self.local_heads = {}
        self._schedule = None
        return self

    def _reset_memory(self) -> None:
        """The largest optimizer state and trainable set one client held in this run, in this process
        (bytes): what a rule costs in memory beside the weights (GaLore's claim is about the first)."""
        self.optimizer_memory = {"optimizer_state_bytes": 0, "trainable_bytes": 0}

    # ---- data ------------------------------------------------------------------------------------
    def _encode(self, ds) -> Encoded:
        cfg = self.cfg
        if self.multiple_choice:
            return encode_choices(self.tokenizer, ds.contexts, ds.choices, ds.answers, max_length=cfg.max_length)
        if cfg.kind == "causal":  # label words as choices, scored by log-likelihood
            texts = ds.texts if ds.texts_b is None else [f"{a}\n{b}" for a, b in zip(ds.texts, ds.texts_b)]
            contexts = [t + PROMPT_SUFFIX for t in texts]
            return encode_choices(self.tokenizer, contexts, [ds.label_names] * len(ds), ds.labels,
                                  max_length=cfg.max_length)
        return encode_classification(self.tokenizer, ds.texts, ds.texts_b, ds.labels, max_length=cfg.max_length)

    def _partition(self) -> list[np.ndarray]:
        cfg = self.cfg
        labels = self.splits.labels()
        if cfg.method == CENTRALISED:  # one client holding the whole budget
            n = cfg.total_samples if cfg.partition == "shards" and cfg.total_samples else len(labels)
            rows = np.random.default_rng(derive_seed(cfg.seed, "central") % 2**32).permutation(len(labels))[:n]
            return [np.sort(rows)]
        part = make_partition(cfg.partition, labels, cfg.clients, seed=cfg.seed, alpha=cfg.dirichlet_alpha,
                              total=cfg.total_samples or None)
        self.partition_summary = part.summary
        return part.indices

    def _build_cache(self, progress: bool) -> None:
        base = self.model.get_base_model()
        if self.cfg.kind == "causal":
            self.cache = CausalLayerCache(base, first_adapted=min(self.cfg.layers))
            for split, enc in self.encoded.items():  # training sees the gold choice only; scoring, every choice
                batches = [collate_choices(enc, np.arange(i, min(i + 16, len(enc))), pad_id=self.pad_id,
                                           gold_only=split == "train") for i in range(0, len(enc), 16)]
                self.cache.build(split, batches, progress=progress)
            return
        self.cache = FrozenLayerCache(base, first_adapted=min(self.cfg.layers))
        for split, enc in self.encoded.items():
            order = np.arange(len(enc))
            batches = []
            for i in range(0, len(enc), 64):
                rows = order[i:i + 64]
                b = collate_classification(enc, rows, pad_id=self.pad_id)
                b = {k: v.to(self.device) for k, v in b.items() if k != "labels"}
                b["rows"] = torch.as_tensor(rows)
                batches.append(b)
            self.cache.build(split, batches, progress=progress)

    # ---- differential privacy --------------------------------------------------------------------------
    def _plan_dp(self) -> None:
        """Each client's DP-SGD plan for the whole run (``None`` without DP), and its step counter.

        A client's σ is calibrated for ``steps = local steps × rounds`` at ``q = batch / its samples``:
        every round, even when ``clients_per_round < 1`` makes it skip some -- an upper bound on what
        it takes, so the ε it spends stays ≤ the target.
        """
        cfg = self.cfg
        self.dp_steps = [0] * len(self.parts)  # DP steps each client took in this process (empty ones too)
        self.dp_plans: Optional[list[DPPlan]] = None
        if cfg.dp_epsilon is None:
            return
        plans = []
        for c, rows in enumerate(self.parts):
            try:
                plans.append(dp_plan(epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, max_grad_norm=cfg.dp_max_grad_norm,
                                     batch_size=cfg.batch_size, samples=len(rows), steps=self._steps() * cfg.rounds))
            except ValueError as err:
                raise ConfigError(f"DP for client {c} ({len(rows)} samples, batch {cfg.batch_size}, "
                                  f"{self._steps() * cfg.rounds} steps): {err}") from err
        self.dp_plans = plans

    def _batches(self, task: ClientTask, rows: np.ndarray) -> list[np.ndarray]:
        """The client-round's batches of training rows: Poisson batches under DP with
        ``dp_sampling="poisson"`` (each row in each step w.p. ``q``, from a seed of the task's), else the
        plain run's length-grouped batches, read from the client's persistent stream
        (``data_stream="persistent"``) or from a fresh permutation of its rows (``"round"``)."""
        return self.plan_rows(task.client, task.round, task.seed, rows)

    def plan_rows(self, client: int, round_: int, seed: int, rows: np.ndarray) -> list[np.ndarray]:
        """What ``_batches`` reads for client ``client`` in round ``round_`` (``seed`` = the task's),
        computed from the config alone: a resumed run reads the same rows, and ``rows_seen`` replays it."""
        cfg = self.cfg
        if self.dp_plans is not None and cfg.dp_sampling == "poisson":
            q = self.dp_plans[client].sample_rate
            picks = poisson_batches(len(rows), q, self._steps(), seed=derive_seed(seed, "dp-batches"))
            return [rows[i] for i in picks]
        stream = None
        if cfg.data_stream == "persistent":
            per_round = self._steps() * min(cfg.batch_size, len(rows))
            start = per_round * prior_participations(self.schedule(), client, round_)
            stream = stream_rows(rows, seed=cfg.seed, client=client, start=start, count=per_round)
        return batch_plan(rows, steps=self._steps(), batch_size=cfg.batch_size, seed=seed, lengths=self.lengths,
                          stream=stream)

    def schedule(self) -> list[list[int]]:
        """The clients of every round, as the loop samples them (seeded by the config)."""
        if getattr(self, "_schedule", None) is None:
            from fedlora.loop import sample_clients

            from .run import fed_config

            fcfg = fed_config(self.cfg, self.num_clients)
            self._schedule = [sample_clients(fcfg, t) for t in range(self.cfg.rounds)]
        return self._schedule

    def rows_seen(self, history: list[dict]) -> dict:
        """How often each client read each of its rows over the client-rounds of ``history`` (every
        scheduled client, kept or rejected: a rejected client still trained), replayed from the config,
        so a resumed run counts the rounds before the interruption too. Per client and over all."""
        from fedlora.loop import client_round_seed

        sched = self.schedule()
        per_client, total = [], []
        for c, rows in enumerate(self.parts):
            plans = [self.plan_rows(c, h["round"], client_round_seed(self.cfg.seed, h["round"], c), rows)
                     for h in history if c in sched[h["round"]]]
            pos = {int(r): i for i, r in enumerate(rows)}
            counts = seen_counts(len(rows), ([np.array([pos[int(r)] for r in b], dtype=np.int64) for b in plan]
                                             for plan in plans))
            per_client.append(seen_summary(counts))
            total.append(counts)
        summary = seen_summary(np.concatenate(total)) if total else seen_summary(np.zeros(0, dtype=np.int64))
        return {"stream": self.cfg.data_stream, "all": summary, "per_client": per_client}

    def _private(self, opt, task: ClientTask):
        """The DP-SGD context of one client-round (a no-op without DP)."""
        if self.dp_plans is None:
            return contextlib.nullcontext(opt)
        from .private import dp_sgd

        return dp_sgd(self.model, opt, self.dp_plans[task.client], batch_size=self.cfg.batch_size,
                      seed=derive_seed(task.seed, "dp-noise"))

    # ---- the loop's state ----------------------------------------------------------------------------
    @property
    def rule(self) -> str:
        return "fedavg" if self.cfg.method == CENTRALISED else self.cfg.method

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def init_state(self) -> dict:
        """The common start: for LoRA rules ``A`` from a seeded init per matrix (FFA's frozen A is this
        one shared draw), ``B = 0``; for full rules the pretrained weights; plus the head if federated."""
        cfg, state = self.cfg, {}
        r0 = cfg.max_rank if self.rule == "flexlora" else cfg.rank  # the global holds the largest client rank
        for name in self.bridge.names:
            m, n = self.bridge.shape(name)
            if self.rule.startswith("full"):
                state[name] = GlobalMatrix(W=self.bridge.pristine_weight(name).detach().clone().float())
            else:
                s = lora_scale(cfg.lora_alpha, r0, rslora=cfg.rslora)
                state[name] = GlobalMatrix(lora=init_lora(m, n, r0, scale=s, generator=generator(cfg.seed, "init", name)))
        if self.rule.startswith("full"):
            self.bridge.keep_pristine()
        state.update(self.bridge.init_head())
        return state

    def client_ranks(self) -> tuple[Optional[list[int]], Optional[list[float]]]:
        if self.rule not in PER_CLIENT_RANK:
            return None, None
        ranks = [self.cfg.rank_of(c) for c in range(self.num_clients)]
        return ranks, [lora_scale(self.cfg.lora_alpha, r, rslora=self.cfg.rslora) for r in ranks]

    def on_round_start(self, t: int, state: Mapping) -> None:
        self.bridge.merge_bases(state)

    # ---- one client ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _optimizer(self, params: list, task: ClientTask):
        cfg = self.cfg
        if task.local_optimizer == "galore":
            from galore_torch import GaLoreAdamW

            mats = [p for p in params if p.ndim == 2 and any(p is self._base_weight(n) for n in self.bridge.names)]
            rest = [p for p in params if all(p is not q for q in mats)]
            groups = [{"params": rest}] if rest else []
            # GaLore projects only the groups that carry these keys; without them it is plain AdamW
            groups.append({"params": mats, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
                           "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type})
            return GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, no_deprecation_warning=True)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _base_weight(self, name: str):
        return self.bridge.layers[name].get_base_layer().weight

    def _steps(self) -> int:
        cfg = self.cfg
        return cfg.local_steps * cfg.clients if cfg.method == CENTRALISED else cfg.local_steps

    def local_train(self, task: ClientTask) -> ClientResult:
        params = self.bridge.load(task.start, trains=task.trains, local=task.local)
        torch.manual_seed(derive_seed(task.seed, "dropout"))  # dropout masks: seeded per client-round, after
        # the load (which may create an adapter of a new rank, and its init draws from the global generator)
        rows = self.parts[task.client]
        private = self.dp_plans is not None
        self.model.train()
        losses = []
        base_opt = self._optimizer(params, task)
        with self._private(base_opt, task) as opt:
            for batch_rows in self._batches(task, rows):
                if private:
                    self.dp_steps[task.client] += 1
                    if len(batch_rows) == 0:  # an empty Poisson batch: a step of noise only
                        from .private import noise_only_step

                        noise_only_step(opt, params)
                        continue
                loss = self.loss("train", batch_rows, per_sample=private)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        mem = self.optimizer_memory
        mem["optimizer_state_bytes"] = max(mem["optimizer_state_bytes"], optimizer_state_bytes(base_opt))
        mem["trainable_bytes"] = max(mem["trainable_bytes"], sum(nbytes(p) for p in params))
        for p in params:
            p.requires_grad_(False)
        out = self.bridge.read(task.trains, task.start)
        local = self.bridge.local_head()
        if local:
            self.local_heads[task.client] = local
        train_loss = float(np.mean(losses)) if losses else float("nan")  # nan: only empty Poisson batches
        return ClientResult(params=out, num_samples=len(rows), metrics={"train_loss": train_loss},
                            local=local)

    # ---- forward ---------------------------------------------------------------------------------------
    def _forward(self, split: str, rows: np.ndarray, batch: dict) -> Tensor:
        keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
        kw = {k: v.to(self.device) for k, v in batch.items() if k in keys}
        if "keep" in batch:  # scored choices: logits only at the last `keep` positions (batches.collate_choices)
            kw["logits_to_keep"] = batch["keep"]
        with self._autocast():
            if self.cache is not None and self.cfg.kind == "classification":
                with self.cache.active(split, rows, kw["input_ids"].shape[1], self.device):
                    return self.model(**kw).logits
            if self.cache is not None and self.cache.has(split, batch["owner"]):
                with self.cache.active(split, batch["owner"], kw["input_ids"].shape[1], self.device) as embeds:
                    kw["inputs_embeds"] = embeds
                    del kw["input_ids"]
                    return self.model(**kw, use_cache=False).logits
            return self.model(**kw).logits

    def loss(self, split: str, rows: np.ndarray, *, per_sample: bool = False) -> Tensor:
        """The training loss of a batch: cross-entropy of the class, or of the gold choice's tokens.

        Scored choices: the mean over every target token of the batch; with ``per_sample`` (DP) the mean
        over samples of each sample's mean token loss, ``(1/b) Σ_i (1/|t_i|) Σ_{t ∈ t_i} ℓ_t`` -- DP-SGD
        needs a mean over samples of per-sample losses (Opacus's ``loss_reduction="mean"`` rescales by
        the batch size), and a token mean would weigh a sample by its length. Classification: one
        loss per sample, the same either way.
        """
        F = torch.nn.functional
        enc = self.encoded[split]
        if enc.choices is None:
            b = collate_classification(enc, rows, pad_id=self.pad_id)
            logits = self._forward(split, rows, b)  # (b, C)
            return F.cross_entropy(logits.float(), b["labels"].to(self.device))
        b = collate_choices(enc, rows, pad_id=self.pad_id, gold_only=True)  # one sequence per row
        logits = self._forward(split, rows, b)  # (b, T, V)
        tgt = b["targets"].to(self.device)  # (b, T)
        if not per_sample:
            return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
        tok = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
        mask = (tgt != -100).float()
        return ((tok.view_as(mask) * mask).sum(1) / mask.sum(1)).mean()

    @torch.no_grad()
    def predict(self, split: str, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """Predicted class / choice per row, and the summed loss (cross-entropy of the gold answer)."""
        enc = self.encoded[split]
        if enc.choices is None:
            b = collate_classification(enc, rows, pad_id=self.pad_id)
            logits = self._forward(split, rows, b).float()
            loss = torch.nn.functional.cross_entropy(logits, b["labels"].to(self.device), reduction="sum")
            return logits.argmax(-1).cpu().numpy(), float(loss)
        b = collate_choices(enc, rows, pad_id=self.pad_id, gold_only=False)
        scores = choice_logprob(self._forward(split, rows, b), b["targets"].to(self.device)).cpu()  # (S,)
        pred, loss = [], 0.0
        owner = b["owner"]
        for i in rows:
            mine = owner[:, 0] == int(i)
            s = scores[mine]
            pred.append(int(owner[mine][s.argmax(), 1]))
            loss -= float(torch.log_softmax(s, 0)[int(enc.labels[i])])  # the gold choice among the choices
        return np.asarray(pred), loss

    def accuracy(self, split: str, batch_size: int = 64) -> dict[str, float]:
        enc = self.encoded[split]
        order = np.argsort(enc.lengths(), kind="stable")  # length-sorted: less padding, same result
        self.model.eval()
        correct, loss = 0, 0.0
        bs = batch_size if enc.choices is None else max(1, batch_size // 4)
        for i in range(0, len(order), bs):
            rows = order[i:i + bs]
            pred, l = self.predict(split, rows)
            correct += int((pred == enc.labels[rows]).sum())
            loss += l
        return {f"{split}_accuracy": correct / len(order), f"{split}_loss": loss / len(order)}

    def evaluate(self, t: int, state: Mapping, *, splits=("test",)) -> dict[str, float]:
        """The global model on the test split (and ``val`` when held out). A ``local`` head has no
        global counterpart: each client's own head is scored and the mean reported (personalised)."""
        out: dict[str, float] = {}
        if self.cfg.eval_splits:
            splits = self.cfg.eval_splits
        else:
            splits = tuple(s for s in splits if s in self.encoded) + (("val",) if "val" in self.encoded and "val" not in splits else ())
        heads = list(self.local_heads.values()) if self.cfg.head == "local" and self.local_heads else [None]
        for split in splits:
            accs = []
            for head in heads:
                self.bridge.load(state, trains="", local=head)
                accs.append(self.accuracy(split))
            out.update({k: float(np.mean([a[k] for a in accs])) for k in accs[0]})
        return out
