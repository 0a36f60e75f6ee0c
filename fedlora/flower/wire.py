"""What travels between the ServerApp and a node, as Flower records: tensors in an ``ArrayRecord``
(Flower stores each as ``np.save(allow_pickle=False)``), everything else as JSON in a ``ConfigRecord``.

No pickle anywhere: a reply is untrusted, and every way it can be malformed raises ``UpdateError``
naming the client, so the server drops that reply instead of merging it.

A train message (server → node) carries the client's task: its view of the global state
(``fedlora.checkpoint.state_to_tensors``) and the round, factor to train, and seed. A tensor the node
already holds from its last task (same digest) is not sent again, only named with its digest: FFA's
A after the first round, RoLoRA's factor frozen in the previous round. A reply carries only the
trained tensors (a RoLoRA B-round sends ``B`` alone), the sample count and the metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ..checkpoint import state_from_tensors, state_to_tensors
from ..factors import GlobalMatrix, LoRAFactors
from ..loop import ClientResult, ClientTask, State
from ..validation import UpdateError

__all__ = ["encode_task", "decode_task", "encode_result", "decode_result", "digest", "StaleViewError", "TRAIN",
           "QUERY", "payload_bytes"]

TRAIN = "train"  # message types: Flower routes them to @app.train() / @app.query() on the node
QUERY = "query"
_SEP = "::"


class StaleViewError(ValueError):
    """The node does not hold a tensor the server expected it to keep; the server resends the whole view."""


def digest(t: Tensor) -> str:
    """Content hash of a tensor: dtype, shape and raw bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: t.detach().cpu().contiguous() for k, t in tensors.items()})


def _from_record(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors in a message as Flower serialises them (``.npy`` framing included)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def encode_task(task: ClientTask, *, held: Mapping[str, str] | None = None) -> tuple[RecordDict, dict[str, str]]:
    """The node's task and the digests of its whole view. ``held``: digest per tensor of what the node
    kept from its last task; those equal now are named, not sent. ``task.local`` is never sent: a node
    keeps its own local state."""
    tensors, meta = state_to_tensors(task.start)
    digests = {k: digest(t) for k, t in tensors.items()}
    reuse = {k: d for k, d in digests.items() if (held or {}).get(k) == d}
    info = {"client": task.client, "round": task.round, "trains": task.trains, "seed": task.seed,
            "local_optimizer": task.local_optimizer, "matrices": meta, "reuse": reuse}
    send = {k: t for k, t in tensors.items() if k not in reuse}
    return RecordDict({"start": _to_record(send), "task": ConfigRecord({"json": json.dumps(info)})}), digests


def decode_task(content: RecordDict, *, held: Mapping[str, Tensor] | None = None) -> tuple[ClientTask, dict[str, Tensor]]:
    """The task, and the view's tensors (for the node to keep); named tensors come from ``held``."""
    info = json.loads(content["task"]["json"])
    tensors = _from_record(content["start"])
    for k, d in info["reuse"].items():
        t = (held or {}).get(k)
        if t is None or digest(t) != d:
            raise StaleViewError(f"this node does not hold {k!r} as the server expects (a restarted node?); "
                                 "the server sends the whole view next round")
        tensors[k] = t
    start = state_from_tensors(tensors, info["matrices"])
    task = ClientTask(client=info["client"], round=info["round"], start=start, trains=info["trains"],
                      seed=info["seed"], local_optimizer=info["local_optimizer"])
    return task, tensors


def encode_result(res: ClientResult, task: ClientTask) -> RecordDict:
    """Only what the client trained goes up: the frozen factor of a LoRA round stays on the node."""
    tensors, meta = {}, {}
    for name, p in res.params.items():
        if isinstance(p, LoRAFactors):
            for f in task.trains if task.trains in ("A", "B", "AB") else "AB":
                tensors[f"{name}{_SEP}{f}"] = getattr(p, f)
            meta[name] = {"kind": "lora", "scale": p.scale}
        elif isinstance(p, Tensor):
            tensors[f"{name}{_SEP}tensor"] = p
            meta[name] = {"kind": "tensor"}
        else:
            raise TypeError(f"local_train returned a {type(p).__name__} for {name!r}; return LoRAFactors or a tensor")
    metrics = MetricRecord({"num-examples": int(res.num_samples), **{k: float(v) for k, v in res.metrics.items()}})
    info = {"client": task.client, "round": task.round, "params": meta}
    return RecordDict({"params": _to_record(tensors), "metrics": metrics,
                       "result": ConfigRecord({"json": json.dumps(info)})})


def decode_result(content: RecordDict, *, client: int, round_: int, start: State) -> ClientResult:
    """Rebuild a ``ClientResult`` from an untrusted reply; the frozen factor comes from ``start`` (the
    view the server sent this client). Raises ``UpdateError(client=client)`` on anything malformed;
    shapes, dtypes and values are checked afterwards by the core (``RoundServer.add``)."""
    def bad(why: str) -> UpdateError:
        return UpdateError(f"client {client!r}: malformed reply ({why}); the node must run "
                           "fedlora.flower.client_app", client=client)

    try:
        info = json.loads(content["result"]["json"])
        tensors = _from_record(content["params"])
        metric = dict(content["metrics"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise bad(f"{type(err).__name__}: {err}") from None
    if not isinstance(info, dict):
        raise bad("its description is not a JSON object")
    if info.get("client") != client or info.get("round") != round_:
        raise bad(f"it answers client {info.get('client')!r} round {info.get('round')!r}, "
                  f"not client {client} round {round_}")
    n = metric.pop("num-examples", None)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
        raise bad(f"num-examples={n!r} is not a finite number")
    params: dict[str, Union[LoRAFactors, Tensor]] = {}
    meta = info.get("params")
    if not isinstance(meta, dict):
        raise bad("no parameter description")
    for name, m in meta.items():
        if not isinstance(m, dict) or name not in start:
            raise bad(f"unknown parameter {name!r}")
        if m.get("kind") == "tensor":
            t = tensors.get(f"{name}{_SEP}tensor")
            if t is None:
                raise bad(f"{name!r} has no tensor")
            params[name] = t
            continue
        g = start[name]
        scale = m.get("scale")
        if m.get("kind") != "lora" or not isinstance(g, GlobalMatrix) or g.lora is None \
                or isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise bad(f"{name!r} is not a LoRA matrix of this round")
        A = tensors.get(f"{name}{_SEP}A", g.lora.A)  # the untrained factor: as sent
        B = tensors.get(f"{name}{_SEP}B", g.lora.B)
        try:
            params[name] = LoRAFactors(A=A, B=B, scale=float(scale))
        except ValueError as err:
            raise UpdateError(f"{name}: client {client!r} sent {err}", client=client) from None
    return ClientResult(params=params, num_samples=n, metrics={k: float(v) for k, v in metric.items()
                                                               if isinstance(v, (int, float))})
