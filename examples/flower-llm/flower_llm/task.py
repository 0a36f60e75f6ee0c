"""The run config as an ``llm_scale`` config, and the two halves of the tier's ``Federation``.

- ``llm_config(run_config)``: a shipped ``llm_scale`` config (or a TOML file) with the run config's
  keys on top, exactly what ``python -m llm_scale --config ... --method ... --set ...`` builds.
- ``NodeFederation(cfg, k)``: node k's client. It draws the partition as the in-process run does (the
  same seeded draw over the same training split), keeps only partition k's rows, and tokenises, caches
  and trains only those; ``local_train`` is ``llm_scale``'s own.
- ``ServerFederation(cfg)``: the model, the initial state and the evaluation on the test split (and the
  validation split when held out); no training rows.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
from functools import lru_cache
from typing import Mapping

import numpy as np

from fedlora.config import ConfigError, FedConfig
from fedlora.flower.runconfig import RunConfigError, check_rule, read_run_config, say_rule
from llm_scale.batches import Encoded
from llm_scale.config import LLMConfig, load_config
from llm_scale.engine import Federation
from llm_scale.run import fed_config
from llm_scale.tasks import Splits, load_splits

# every run-config key and its type (`flwr run -c "rounds='3'"` is refused naming the key)
TYPES = {"config": str, "model": str, "task": str, "data-path": str, "rule": str, "clients": int, "rounds": int,
         "rank": int, "local-steps": int, "lr": float, "seed": int, "train-subset": int, "test-subset": int,
         "set": str, "min-replies": int, "round-timeout": float, "connect-timeout": float, "out": str,
         "checkpoint-dir": str}
_ALWAYS = {"rule": "method", "clients": "clients", "rounds": "rounds", "rank": "rank", "local-steps": "local_steps",
           "lr": "lr", "seed": "seed", "train-subset": "train_subset", "test-subset": "test_subset"}
_IF_SET = {"model": "model", "task": "task", "data-path": "data_path"}  # "" keeps the config file's


def run_config(raw: Mapping) -> dict:
    """The run config, type-checked, its rule one that runs on Flower."""
    rc = read_run_config(raw, TYPES)
    check_rule(rc["rule"])
    return rc


def parse_set(text: str) -> dict:
    """``set = "batch_size=8; layers=[4, 5]"``: more ``LLMConfig`` fields, TOML values, ``;``-separated."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RunConfigError(f"run config: set={text!r}: write KEY=VALUE pairs separated by ';', "
                                 "e.g. set='batch_size=8; layers=[4, 5]'")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()  # a bare string
    return out


def llm_config(raw: Mapping) -> LLMConfig:
    """The tier's config: ``config``, then ``set``, then the run config's own keys."""
    rc = run_config(raw)
    extra = parse_set(rc["set"])
    clash = sorted(set(extra) & (set(_ALWAYS.values()) | set(_IF_SET.values())))
    if clash:
        key = {**{v: k for k, v in _ALWAYS.items()}, **{v: k for k, v in _IF_SET.items()}}[clash[0]]
        raise RunConfigError(f"run config: set names {clash[0]!r}; use the run-config key {key!r} instead")
    overrides = {**extra, **{f: rc[k] for k, f in _ALWAYS.items()}, **{f: rc[k] for k, f in _IF_SET.items() if rc[k]}}
    try:
        cfg = load_config(rc["config"], **overrides)
    except ConfigError as err:
        raise RunConfigError(f"run config: {say_rule(err)}") from None
    if cfg.dp_epsilon is not None:
        raise RunConfigError("run config: dp_epsilon is set; DP-SGD runs in-process only for now "
                             "(python -m llm_scale): its privacy accounting is not carried over Flower yet")
    if cfg.head == "local":
        raise RunConfigError("run config: head='local' keeps a head per client, which the server cannot evaluate; "
                             "use head='federated' or 'frozen' on Flower")
    return cfg


def fed(cfg: LLMConfig) -> FedConfig:
    return fed_config(cfg, cfg.clients)


def _draw_partition(cfg: LLMConfig, splits: Splits) -> list[np.ndarray]:
    """The in-process run's partition, by ``Federation``'s own code on the whole training split."""
    probe = types.SimpleNamespace(cfg=cfg, splits=splits, partition_summary={})
    return Federation._partition(probe)


class NodeFederation(Federation):
    """Client ``client``'s half of a ``Federation``: only its partition's rows are kept."""

    def __init__(self, cfg: LLMConfig, client: int):
        if not 0 <= client < cfg.clients:
            raise ConfigError(f"this node holds partition-id {client} but the run has clients={cfg.clients}; "
                              f"start it with --node-config \"partition-id=K num-partitions={cfg.clients}\", 0 <= K < {cfg.clients}")
        full = load_splits(cfg)
        parts = _draw_partition(cfg, full)
        self._client, self._sizes = client, [len(p) for p in parts]
        mine = full.train.subset(parts[client])  # in the partition's order: the batches index the same rows
        del full, parts
        super().__init__(cfg, splits=Splits(train=mine, test=None, val=None))

    def _partition(self) -> list[np.ndarray]:
        return [np.arange(n) if k == self._client else np.empty(0, np.int64) for k, n in enumerate(self._sizes)]


class ServerFederation(Federation):
    """The server's half: model, initial state, evaluation; no training rows are tokenised."""

    def __init__(self, cfg: LLMConfig):
        full = load_splits(cfg)
        super().__init__(cfg, splits=full)

    def _encode(self, ds):
        if ds is self.splits.train:
            return Encoded(ids=[], labels=np.empty(0, np.int64))
        return super()._encode(ds)

    def _partition(self) -> list[np.ndarray]:
        return [np.empty(0, np.int64)] * self.cfg.clients

    def _build_cache(self, progress: bool) -> None:
        train = self.encoded.pop("train")
        try:
            super()._build_cache(progress)
        finally:
            self.encoded["train"] = train


@lru_cache(maxsize=2)
def node_federation(cfg: LLMConfig, client: int) -> NodeFederation:
    """Built once per ClientApp process (a node's every message reuses it)."""
    return NodeFederation(cfg, client)


def as_dict(cfg: LLMConfig) -> dict:
    return dataclasses.asdict(cfg)
