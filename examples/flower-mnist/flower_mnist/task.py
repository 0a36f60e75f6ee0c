"""The run config (``[tool.flwr.app.config]``) as the toy's and the federation's configs, and the toy.

Every node builds the same toy (data split and partition are seeded by ``seed``) and trains only its
own partition, so the numbers equal ``python -m mnist_toy`` with the sequential engine.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import torch

from fedlora.config import FedConfig
from mnist_toy.config import ToyConfig
from mnist_toy.data import load_mnist
from mnist_toy.model import Toy, build_toy
from mnist_toy.run import fed_config

_TOY_KEYS = {"rule": "method", "clients": "clients", "rounds": "rounds", "rank": "rank", "seed": "seed", "lr": "lr",
             "local-steps": "local_steps", "hidden": "hidden", "partition": "partition",
             "labels-per-client": "labels_per_client", "train-subset": "train_subset", "val-size": "val_size",
             "test-subset": "test_subset"}


def toy_config(run_config: Mapping) -> ToyConfig:
    """The toy's config from the run config; the sequential engine, one torch thread."""
    return ToyConfig(**{field: run_config[key] for key, field in _TOY_KEYS.items() if key in run_config},
                     engine="sequential", threads=1)


def fed(cfg: ToyConfig) -> FedConfig:
    return fed_config(cfg)


@lru_cache(maxsize=2)
def toy(cfg: ToyConfig) -> Toy:
    """Built once per process (a node's every message reuses it)."""
    torch.set_num_threads(cfg.threads)
    return build_toy(cfg, load_mnist())
