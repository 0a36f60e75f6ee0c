"""The run config (``[tool.flwr.app.config]``) as the toy's and the federation's configs, and the toy.

Every node builds the same toy (data split and partition are seeded by ``seed``) and trains only its
own partition, so the numbers equal ``python -m mnist_toy`` with the sequential engine.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import torch

from fedlora.config import ConfigError, FedConfig
from fedlora.flower.runconfig import RunConfigError, check_rule, read_run_config, say_rule
from mnist_toy.config import ToyConfig
from mnist_toy.data import load_mnist
from mnist_toy.model import Toy, build_toy
from mnist_toy.run import fed_config

_TOY_KEYS = {"rule": "method", "clients": "clients", "rounds": "rounds", "rank": "rank", "seed": "seed", "lr": "lr",
             "local-steps": "local_steps", "hidden": "hidden", "partition": "partition",
             "labels-per-client": "labels_per_client", "train-subset": "train_subset", "val-size": "val_size",
             "test-subset": "test_subset"}
# every run-config key and its type (`flwr run -c "rounds='3'"` is refused naming the key)
TYPES = {"rule": str, "clients": int, "rounds": int, "rank": int, "seed": int, "lr": float, "local-steps": int,
         "hidden": int, "partition": str, "labels-per-client": int, "train-subset": int, "val-size": int,
         "test-subset": int, "min-replies": int, "round-timeout": float, "connect-timeout": float, "out": str,
         "checkpoint-dir": str}


def run_config(raw: Mapping) -> dict:
    """The run config, type-checked, its rule one that runs on Flower."""
    rc = read_run_config(raw, TYPES)
    check_rule(rc["rule"])
    return rc


def toy_config(raw: Mapping) -> ToyConfig:
    """The toy's config from the run config; the sequential engine, one torch thread."""
    rc = run_config(raw)
    try:
        return ToyConfig(**{field: rc[key] for key, field in _TOY_KEYS.items()}, engine="sequential", threads=1)
    except ConfigError as err:
        raise RunConfigError(f"run config: {say_rule(err)}") from None


def fed(cfg: ToyConfig) -> FedConfig:
    return fed_config(cfg)


@lru_cache(maxsize=2)
def toy(cfg: ToyConfig) -> Toy:
    """Built once per process (a node's every message reuses it)."""
    torch.set_num_threads(cfg.threads)
    return build_toy(cfg, load_mnist())
