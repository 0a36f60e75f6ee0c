"""Every rule on Flower (in-process simulation, 4 virtual nodes) gives the in-process loop's numbers:
the same global state, the same history (clients, metrics, bytes), the same drops; and resumes.

One simulation runs every scenario (starting Ray costs ~10 s), in a module fixture; the tests read it.
"""
from __future__ import annotations

import logging
import traceback

import pytest
import torch

from fedlora.config import ConfigError
from fedlora.flower import FedLoraStrategy

import flower_tier as ft

torch.set_num_threads(1)

RULES = ["fedavg", "ffa", "rolora", "fedex", "flexlora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    ckpt = tmp_path_factory.mktemp("flower_ckpt")
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            scenarios(grid)
        except BaseException:  # the simulation would only log it
            out["error"] = traceback.format_exc()
            raise

    def scenarios(grid):
        for rule in RULES:
            strategy = FedLoraStrategy(**ft.strategy_kwargs(ft.cfg(rule)))
            out[rule], out[f"wire-{rule}"] = strategy.run(grid), strategy.wire
        for rule in ("fedavg", "flexlora"):  # a folding rule and one that keeps every upload
            c = ft.cfg(rule, seed=ft.FAULT_SEED, cpr=1.0)
            out[f"faults-{rule}"] = FedLoraStrategy(**ft.strategy_kwargs(c), min_replies=2).run(grid)
        c = ft.cfg("fedavg", rounds=2, seed=ft.FAULT_SEED, cpr=1.0)
        out["too-few"] = FedLoraStrategy(**ft.strategy_kwargs(c), min_replies=3).run(grid)
        c = ft.cfg("rolora", rounds=4)
        FedLoraStrategy(**ft.strategy_kwargs(c), checkpoint_dir=ckpt).run(grid, stop_after=2)  # "killed"
        out["resumed"] = FedLoraStrategy(**ft.strategy_kwargs(c), checkpoint_dir=ckpt, resume=True).run(grid)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=server, client_app=ft.make_app(), num_supernodes=ft.NODES,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False}})
    if "resumed" not in out:
        pytest.fail(f"the ServerApp stopped early; finished scenarios: {sorted(out)}\n{out.get('error', '')}")
    return out


@pytest.mark.parametrize("rule", RULES)
def test_flower_gives_the_loops_state_and_history(runs, rule):
    ref = ft.in_process(ft.cfg(rule))
    got = runs[rule]
    ft.assert_same_state(got.state, ref.state)
    assert got.history == ref.history  # clients sampled, metrics, uplink/downlink bytes per client, eval


def test_the_round_loop_really_samples_a_subset(runs):
    """Guard on the equivalence above: 3 of 4 clients a round, not always the same three."""
    draws = [tuple(h["clients"]) for h in runs["fedavg"].history]
    assert all(len(d) == 3 for d in draws) and len(set(draws)) > 1


@pytest.mark.parametrize("rule", ["ffa", "rolora"])
def test_a_node_is_not_resent_what_it_holds(runs, rule):
    """FFA's A never changes; RoLoRA's factor frozen last round did not: a node sampled in consecutive
    rounds receives only the other factor (A: 2 × 5 float64 = 80 bytes less), the views still exact."""
    wire = runs[f"wire-{rule}"]
    full = max(wire[0]["down"].values())  # round 0: every sampled node gets its whole view (same size)
    saved = [full - w["down"][c] for prev, w in zip(wire, wire[1:]) for c in w["down"] if c in prev["down"]]
    assert saved and all(s >= 80 for s in saved)


def test_fedavg_resends_everything_since_everything_changed(runs):
    wire = runs["wire-fedavg"]
    assert len({b for w in wire for b in w["down"].values()}) == 1


def test_a_node_that_lost_its_view_refuses_the_task():
    from fedlora.flower.wire import StaleViewError, decode_task, encode_task
    from fedlora.loop import make_task
    from fedlora import get_rule
    from linear_tier import init_state

    c = ft.cfg("ffa")
    task = make_task(get_rule("ffa"), c, init_state("ffa"), client=0, round_=1, rank=None, scale=None, local={})
    content, digests = encode_task(task, held=None)
    _, view = decode_task(content)
    again, _ = encode_task(task, held=digests)  # the node holds it all: nothing is sent
    assert len(again["start"]) == 0 and decode_task(again, held=view)[1].keys() == view.keys()
    with pytest.raises(StaleViewError, match="does not hold"):
        decode_task(again, held={k: v + 1 for k, v in view.items()})


@pytest.mark.parametrize("rule", ["fedavg", "flexlora"])
def test_a_raising_node_and_a_nan_node_are_dropped_and_recorded(runs, rule):
    got = runs[f"faults-{rule}"]
    ref = ft.in_process(ft.cfg(rule, seed=ft.FAULT_SEED, cpr=1.0))
    ft.assert_same_state(got.state, ref.state)  # the loop's global with both clients dropped
    h = got.history[ft.FAULT_ROUND]
    assert h["clients"] == [0, 2] and ref.history[ft.FAULT_ROUND]["clients"] == [0, 2]
    why = {e["client"]: e for e in h["rejected"]}
    assert sorted(why) == [ft.RAISES, ft.NAN]
    assert "training failed on the node" in why[ft.RAISES]["error"] and "disk full" in why[ft.RAISES]["error"]
    assert "NaN" in why[ft.NAN]["error"]
    assert all(isinstance(e["node"], int) for e in why.values())  # the node's Flower id is logged too
    assert h["uplink_bytes"] == ref.history[ft.FAULT_ROUND]["uplink_bytes"]
    assert h["downlink_bytes"] == ref.history[ft.FAULT_ROUND]["downlink_bytes"]


def test_too_few_replies_keep_the_global_and_say_why(runs):
    got = runs["too-few"]
    h = got.history[ft.FAULT_ROUND]
    assert h["clients"] == [] and "min_replies=3" in h["skipped"] and h["total_uplink_bytes"] == 0
    one_round = ft.in_process(ft.cfg("fedavg", rounds=1, seed=ft.FAULT_SEED, cpr=1.0))
    ft.assert_same_state(got.state, one_round.state)  # round 2 changed nothing


def test_a_restarted_serverapp_resumes_to_the_same_numbers(runs):
    ref = ft.in_process(ft.cfg("rolora", rounds=4))
    ft.assert_same_state(runs["resumed"].state, ref.state)
    assert runs["resumed"].history == ref.history


def test_chained_rules_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="one after another.*run_federated"):
        FedLoraStrategy(**ft.strategy_kwargs(ft.cfg("rolora-chain")))


def test_min_replies_must_be_reachable():
    with pytest.raises(ConfigError, match="min_replies=4"):
        FedLoraStrategy(**ft.strategy_kwargs(ft.cfg("fedavg")), min_replies=4)  # 3 sampled per round


def _reply(client=0, round_=1):
    """A valid reply of client 0 in a RoLoRA A-round, and the view it answers."""
    from fedlora import get_rule
    from fedlora.flower.wire import encode_result
    from fedlora.loop import make_task
    from linear_tier import init_state

    task = make_task(get_rule("rolora"), ft.cfg("rolora"), init_state("rolora"), client=client, round_=round_,
                     rank=None, scale=None, local={})
    return encode_result(ft.node_local_train(task), task), task.start


def _corrupt(content, how):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    if how == "no params":
        del content["params"]
    elif how == "params as config":
        content["params"] = ConfigRecord({"w::A": 1.0})
    elif how == "not JSON":
        content["result"] = ConfigRecord({"json": "{oops"})
    elif how == "JSON list":
        content["result"] = ConfigRecord({"json": "[1, 2]"})
    elif how == "another client":
        content["result"] = ConfigRecord({"json": content["result"]["json"].replace('"client": 0', '"client": 2')})
    elif how == "unknown name":
        content["result"] = ConfigRecord({"json": content["result"]["json"].replace('"w"', '"v"')})
    elif how == "no sample count":
        content["metrics"] = MetricRecord({"train_loss": 1.0})
    elif how == "infinite sample count":
        content["metrics"] = MetricRecord({"num-examples": float("inf")})
    elif how == "A of the wrong rank":
        content["params"] = ArrayRecord({"w::A": torch.zeros(3, 5, dtype=torch.float64)})
    return content


@pytest.mark.parametrize("how", ["no params", "params as config", "not JSON", "JSON list", "another client",
                                 "unknown name", "no sample count", "infinite sample count", "A of the wrong rank"])
def test_a_malformed_reply_is_refused_naming_the_client(how):
    from fedlora.flower.wire import decode_result
    from fedlora.validation import UpdateError

    content, start = _reply()
    assert decode_result(content, client=0, round_=1, start=start).num_samples > 0  # intact, it is accepted
    with pytest.raises(UpdateError, match="client 0") as err:
        decode_result(_corrupt(content, how), client=0, round_=1, start=start)
    assert err.value.client == 0
