"""A Flower ``ClientApp`` around a tier's ``local_train(task) -> ClientResult``, unchanged.

A node answers two message types:

- ``query``: its client id, read from the SuperNode's ``node_config["partition-id"]`` (set by the
  simulation, or ``flower-supernode --node-config "partition-id=3 num-partitions=5"``); the
  strategy maps every client id to the node that holds that partition this way.
- ``train``: decodes the task, runs ``local_train``, replies with only the trained tensors. The node
  keeps its last view in ``context.state`` so the server need not resend unchanged tensors. What the
  client keeps to itself (``ClientResult.local``) stays in ``context.state`` too and comes back as
  ``ClientTask.local`` the next time; it is never sent.

A failure in ``local_train`` is answered with a Flower ``Error`` carrying the exception, so the
server drops this client for the round and records why, and the node stays up.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from ..config import ConfigError
from ..loop import ClientResult, ClientTask
from .wire import decode_task, encode_result

__all__ = ["client_app", "partition_id"]

log = logging.getLogger(__name__)

LocalTrain = Callable[[ClientTask], ClientResult]
_LOCAL = "fedlora.local"  # key of the client's own tensors in context.state
_VIEW = "fedlora.view"  # key of the last view the node received
_RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def partition_id(context: Context) -> int:
    """This node's client id (``node_config["partition-id"]``)."""
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ConfigError(f"this SuperNode has node_config partition-id={pid!r}; start it with "
                          "--node-config \"partition-id=K num-partitions=N\" (K its client id, 0 <= K < N)")
    return pid


def client_app(make_local_train: Callable[[Context], LocalTrain], *,
               local_optimizers: Sequence[str] = ("default",)) -> ClientApp:
    """The ``ClientApp`` of a tier. ``make_local_train(context)`` returns the tier's ``local_train``
    for this node (it may read ``context.run_config``; it is called for every message, so cache what
    is costly to build, such as the data). ``local_optimizers`` are those ``local_train`` honours,
    as in ``fedlora.loop.run_federated``."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        try:
            content = RecordDict({"node": ConfigRecord({"partition-id": partition_id(context)})})
        except ConfigError as err:
            return Message(Error(code=_RAISED, reason=str(err)), reply_to=msg)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            held = context.state.array_records.get(_VIEW)
            task, view = decode_task(msg.content, held=held.to_torch_state_dict() if held is not None else None)
            context.state[_VIEW] = ArrayRecord({k: v.contiguous() for k, v in view.items()})
            pid = partition_id(context)
            if task.client != pid:
                raise ConfigError(f"this node holds partition {pid} but was sent client {task.client}'s task; "
                                  "every node needs a distinct partition-id")
            if task.local_optimizer not in local_optimizers:
                raise ConfigError(f"the rule needs the local optimizer {task.local_optimizer!r}; this ClientApp "
                                  f"declares {list(local_optimizers)}: pass local_optimizers=(..., "
                                  f"{task.local_optimizer!r}) once local_train implements it")
            local = context.state.array_records.get(_LOCAL)
            if local is not None:
                task = dataclasses.replace(task, local=local.to_torch_state_dict())
            res = make_local_train(context)(task)
            if res.local:
                context.state[_LOCAL] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in res.local.items()})
            return Message(encode_result(res, task), reply_to=msg)
        except Exception as err:  # noqa: BLE001  (any training failure is reported, not fatal to the node)
            log.exception("local training failed")
            return Message(Error(code=_RAISED, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    return app
