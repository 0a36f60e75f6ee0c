"""examples/flower-llm, the LLM tier on Flower, gives the in-process run's numbers (``python -m llm_scale``'s
``run``: ``run_federated`` on one ``Federation``) on a tiny random RoBERTa: the same history round by
round (clients, trained factor, loss, evaluation, bytes) and the same final adapter, bit for bit.

One run goes through Flower's simulation runtime exactly as ``flwr run`` does (app loaded from its folder,
run config fused from its pyproject, Ray workers as nodes); the others through ``flower_tier.LocalGrid``
(the app's ServerApp and ClientApp in this process), which also lets the test look at each node's data.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flower_tier as ft  # noqa: E402
from test_llm_scale import word_table  # noqa: E402

torch.set_num_threads(1)
APP = Path(__file__).resolve().parents[1] / "examples" / "flower-llm"
sys.path.insert(0, str(APP))
CLIENTS = 3


def _run_config(table, tmp, rule, **kw) -> dict:
    rc = {"config": "", "model": "tiny-roberta", "task": "table", "data-path": str(table), "rule": rule,
          "clients": CLIENTS, "rounds": 2, "rank": 4, "local-steps": 2, "lr": 5e-3, "seed": 1, "test-subset": 0,
          "set": "batch_size=8; test_fraction=0.25; targets=['query', 'value']", "out": str(tmp / rule),
          "connect-timeout": 180.0}  # the wait ends once every node answered; a loaded machine is slow to start them
    if rule in ("flexlora", "flora"):
        rc["set"] += "; client_ranks=[4, 2, 3]"
    rc.update(kw)
    return rc


def _in_process(cfg):
    """What ``python -m llm_scale`` runs (``llm_scale.run.run``), with the final state kept."""
    from fedlora.loop import run_federated
    from llm_scale.engine import Federation
    from llm_scale.run import fed_config

    fed = Federation(cfg)
    ranks, scales = fed.client_ranks()
    return run_federated(fed_config(cfg, fed.num_clients), init=fed.init_state(), local_train=fed.local_train,
                         evaluate=fed.evaluate, client_ranks=ranks, client_scales=scales,
                         on_round_start=fed.on_round_start, local_optimizers=("default", "galore"), progress=False)


def _result(out: Path):
    from safetensors.torch import load_file

    from fedlora.checkpoint import state_from_tensors
    from llm_scale.config import LLMConfig

    rec = json.loads((out / "history.json").read_text())
    cfg = LLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["llm_config"].items()})
    return cfg, rec, state_from_tensors(load_file(str(out / "state.safetensors")), rec["matrices"])


def _assert_equal(state, ref_state):
    assert state.keys() == ref_state.keys()
    for name, g in ref_state.items():
        if isinstance(g, torch.Tensor):
            assert torch.equal(state[name], g), name
        else:
            assert torch.equal(state[name].effective_delta(), g.effective_delta()), name


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return word_table(tmp_path_factory.mktemp("data") / "toy.csv")


def test_the_llm_app_in_flowers_simulation_gives_the_in_process_run(table, tmp_path, capsys):
    ft.simulate_app(APP, _run_config(table, tmp_path, "rolora"), CLIENTS)
    out = capsys.readouterr().out
    cfg, rec, state = _result(tmp_path / "rolora")
    assert cfg.method == "rolora" and cfg.model == "tiny-roberta" and cfg.rank == 4
    ref = _in_process(cfg)
    assert rec["history"] == ref.history  # clients, factor, train loss, evaluation, bytes; exactly
    assert [h["trains"] for h in rec["history"]] == ["B", "A"]
    _assert_equal(state, ref.state)
    assert [json.loads(line)["round"] for line in out.splitlines() if line.startswith('{"round"')] == [0, 1]
    assert f"results: {tmp_path / 'rolora'}" in out


def _local(table, tmp_path, rule, **kw):
    from flwr.app import Context, RecordDict

    from flower_llm.client_app import app as client
    from flower_llm.server_app import app as server

    ft.set_task_identity()
    rc = ft.app_run_config(APP, _run_config(table, tmp_path, rule, **kw))
    grid = ft.LocalGrid(client, {300 + k: k for k in range(CLIENTS)}, rc)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return _result(tmp_path / rule)


@pytest.mark.parametrize("rule", ["fedex", "flexlora"])  # merged bases on the nodes; a rank per client
def test_the_llm_app_gives_the_in_process_run_for_more_rules(table, tmp_path, rule, capsys):
    cfg, rec, state = _local(table, tmp_path, rule)
    ref = _in_process(cfg)
    assert rec["history"] == ref.history
    _assert_equal(state, ref.state)


def test_each_node_tokenises_only_its_own_partition(table, tmp_path, capsys):
    from flower_llm.task import node_federation
    from llm_scale.engine import Federation

    cfg, _, _ = _local(table, tmp_path, "fedavg", rounds=1)
    whole = Federation(cfg)
    for k in range(CLIENTS):
        node = node_federation(cfg, k)
        assert list(node.encoded) == ["train"]  # no test or validation rows on a node
        assert len(node.encoded["train"]) == len(whole.parts[k]) < len(whole.encoded["train"])
        assert node.encoded["train"].ids == [whole.encoded["train"].ids[i] for i in whole.parts[k]]
