"""The node: the toy's own ``train_sequential``, wrapped by ``fedlora.flower.client_app``."""
from __future__ import annotations

from fedlora.flower import client_app
from mnist_toy.engine import train_sequential

from .task import toy, toy_config


def _local_train(context):
    cfg = toy_config(context.run_config)
    data = toy(cfg)
    return lambda task: train_sequential(task, data, cfg)


app = client_app(_local_train)
