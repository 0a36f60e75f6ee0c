"""The linear test tier on Flower: its ClientApp, scenario configs and their in-process references.

Faults are keyed by the run's seed: with ``FAULT_SEED`` client ``RAISES`` raises and client ``NAN``
returns NaN factors in round ``FAULT_ROUND``; with any other seed every client is honest. The
in-process reference of such a run returns NaN for both, so the loop (``on_bad_update="drop"``) drops them.
"""
from __future__ import annotations

import torch

from fedlora.config import FedConfig
from fedlora.factors import LoRAFactors
from fedlora.flower import client_app
from fedlora.loop import ClientResult, run_federated
from fedlora.seeding import derive_seed

from linear_tier import init_state, make_clients, make_evaluate, make_local_train

NODES = 4
DATA = make_clients(NODES)
SEED, FAULT_SEED = 3, 7
FAULT_ROUND, RAISES, NAN = 1, 1, 3  # round 2 (0-based 1): client 1 raises, client 3 sends NaN factors


def _nan(res: ClientResult) -> ClientResult:
    f = res.params["w"]
    return ClientResult(params={"w": LoRAFactors(A=f.A * float("nan"), B=f.B, scale=f.scale)},
                        num_samples=res.num_samples, metrics=res.metrics)


def _is(task, client: int) -> bool:
    return task.seed == derive_seed(FAULT_SEED, "client", FAULT_ROUND, client)


def node_local_train(task):
    """What each node runs: the honest tier, with the two faults of a FAULT_SEED run."""
    if _is(task, RAISES):
        raise RuntimeError("disk full")
    res = make_local_train(DATA)(task)
    return _nan(res) if _is(task, NAN) else res


def reference_local_train(task):
    """In-process stand-in for a faulty run: both faulty clients send NaN, so the loop drops both."""
    res = make_local_train(DATA)(task)
    return _nan(res) if _is(task, RAISES) or _is(task, NAN) else res


def make_app():
    return client_app(lambda context: node_local_train)


def cfg(rule: str, *, rounds: int = 3, seed: int = SEED, cpr: float = 0.75) -> FedConfig:
    return FedConfig(rule=rule, rounds=rounds, num_clients=NODES, clients_per_round=cpr, seed=seed)


def ranks(rule: str) -> dict:
    return dict(client_ranks=[2, 1, 2, 1], client_scales=[1.0] * NODES) if rule in ("flexlora", "flora") else {}


def in_process(c: FedConfig, **kw):
    return run_federated(c, init=init_state(c.rule), local_train=reference_local_train, evaluate=make_evaluate(DATA),
                         on_bad_update="drop", progress=False, **ranks(c.rule), **kw)


def strategy_kwargs(c: FedConfig) -> dict:
    return dict(cfg=c, init=init_state(c.rule), evaluate=make_evaluate(DATA), round_timeout=120.0,
                connect_timeout=120.0, **ranks(c.rule))


def assert_same_state(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].effective_delta(), b[name].effective_delta(), rtol=1e-10, atol=1e-12)
        if a[name].lora is not None:
            torch.testing.assert_close(a[name].lora.A, b[name].lora.A, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a[name].lora.B, b[name].lora.B, rtol=1e-10, atol=1e-12)


# --- an in-process grid: a Flower app's ServerApp and ClientApp in one process, without Ray ---------------
class LocalGrid:
    """A ``Grid`` that hands each message to a ClientApp in this process, one ``Context`` per node (its
    ``node_config`` partition-id and the run config), as Flower's runtimes do; message ids are set on
    push and replies answer them (``reply_to_message_id``). ``partitions`` maps node id -> partition-id
    (``None``: a node started without --node-config). ``on_send(msgs)`` may replace replies: it returns
    ``{message_id: reply}`` for the messages it answers itself (a fault), or ``None``."""

    def __init__(self, client_app, partitions: dict, run_config: dict, *, on_send=None):
        from flwr.app import Context, RecordDict

        self.app, self.on_send, self.sent = client_app, on_send, []
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=dict(run_config),
                                    node_config={} if k is None else {"partition-id": k, "num-partitions": len(partitions)})
                         for n, k in partitions.items()}
        self._ids = 0

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            self._ids += 1
            m.metadata.__dict__["_message_id"] = f"m{self._ids}"
        self.sent += messages
        faults = (self.on_send(messages) if self.on_send else None) or {}
        out = []
        for m in messages:
            if m.metadata.message_id in faults:
                if faults[m.metadata.message_id] is not None:
                    out.append(faults[m.metadata.message_id])
                continue
            out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
        return out


def set_task_identity() -> None:
    """Messages built outside a Flower runtime need a run id (Flower reads it from ``TaskIdentity``)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def app_run_config(app_dir, overrides: dict) -> dict:
    """The run config Flower gives an app: its pyproject's defaults with ``overrides``."""
    from flwr.common.config import get_fused_config_from_dir

    return get_fused_config_from_dir(app_dir, overrides)


def node_unavailable(msg):
    """The reply the SuperLink itself sends when ``msg``'s node stopped its heartbeat: Flower's own code."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


def simulate_app(app_dir, overrides: dict, num_supernodes: int) -> None:
    """Run a Flower app as ``flwr run <app_dir> -c ...`` runs it in a simulation (Flower's simulation
    runtime: the app's components loaded from ``app_dir``, the run config fused from its pyproject and
    ``overrides``, every virtual node a Ray worker), without a SuperLink process. Raises what the
    ServerApp raised."""
    import os
    from pathlib import Path

    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run = Run.create_empty(run_id=4242)
    run.primary_task_id, run.federation_id, run.override_config = 1, NOOP_FEDERATION_ID, dict(overrides)
    set_task_identity()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run.run_id
    ctx = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                  run_config=app_run_config(Path(app_dir), overrides))
    import tomllib

    parts = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
                    server_app_attr=parts["serverapp"], client_app_attr=parts["clientapp"], app_dir=str(app_dir), run=run, server_app_context=ctx, is_app=True,
                    backend_config={"client_resources": {"num_cpus": 1},
                                    "init_args": {"num_cpus": 1, "include_dashboard": False}})
