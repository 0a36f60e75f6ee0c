"""The node: ``llm_scale``'s own ``local_train`` on this node's partition, wrapped by
``fedlora.flower.client_app``. The node reads its partition-id from ``node_config``."""
from __future__ import annotations

from fedlora.flower import client_app, partition_id

from .task import llm_config, node_federation


def _local_train(context):
    return node_federation(llm_config(context.run_config), partition_id(context)).local_train


app = client_app(_local_train, local_optimizers=("default", "galore"))
