"""Run every registered rule on the Flower engine (``flwr`` 1.41, Message API), with the round
loop's own sampling, views, validation, aggregation, byte accounting, history and checkpoints.

- ``FedLoraStrategy``: the ServerApp side; ``strategy.run(grid)`` returns a ``fedlora.loop.RunResult``.
- ``client_app(make_local_train)``: the ClientApp side, around a tier's unchanged ``local_train``.

Nodes are clients by their ``partition-id`` (``node_config``). See README_SECTION.md in this folder.
"""
from .client import client_app, partition_id
from .strategy import FedLoraStrategy, state_record

__all__ = ["FedLoraStrategy", "client_app", "partition_id", "state_record"]
