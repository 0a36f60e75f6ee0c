"""Resume never mixes settings (issue 21): a checkpoint carries a fingerprint of everything that shapes
the run, and a resume with any of it changed is refused with the keys named, in the core and both tiers."""
from __future__ import annotations

import dataclasses

import pytest

from fedlora.checkpoint import fingerprint_diff
from fedlora.config import ConfigError, FedConfig
from fedlora.loop import run_federated
from linear_tier import init_state, make_clients, make_local_train

DATA = make_clients(3)


def test_fingerprint_diff_names_every_changed_key_nested_and_added():
    old = {"config": {"lr": 0.001, "layers": [5]}, "data": {"sha256": "aa"}}
    new = {"config": {"lr": 0.01, "layers": (5,)}, "data": {"sha256": "bb"}, "model": "m"}
    assert fingerprint_diff(old, new) == ["config.lr: 0.001 -> 0.01", "data.sha256: 'aa' -> 'bb'",
                                          "model: '(absent)' -> 'm'"]
    assert fingerprint_diff(old, old) == []


def test_the_core_refuses_a_resume_with_another_fingerprint(tmp_path):
    cfg = FedConfig(rule="fedavg", rounds=3, num_clients=3, seed=0)
    kw = dict(init=init_state("fedavg"), local_train=make_local_train(DATA), progress=False, checkpoint_dir=tmp_path)
    run_federated(cfg, **kw, stop_after=1, fingerprint={"lr": 0.1})
    with pytest.raises(ConfigError, match=r"lr: 0.1 -> 0.2.*start fresh"):
        run_federated(cfg, **kw, resume=True, fingerprint={"lr": 0.2})
    done = run_federated(cfg, **kw, resume=True, fingerprint={"lr": 0.1})
    assert len(done.history) == 3


def test_toy_resume_with_a_changed_lr_is_refused_and_threads_may_change(tmp_path):
    from mnist_toy.config import ToyConfig
    from mnist_toy.run import run
    from test_mnist_toy import SMALL, mnist  # noqa: F401

    data = pytest.importorskip("mnist_toy.data").load_mnist(cache_dir=tmp_path / "cache")
    cfg = ToyConfig(method="rolora", **{**SMALL, "rounds": 3})
    ck = tmp_path / "ck"
    run(cfg, data=data, progress=False, checkpoint_dir=ck, stop_after=1)
    with pytest.raises(ConfigError, match=r"config.lr: 0.1 -> 0.2"):
        run(dataclasses.replace(cfg, lr=0.2), data=data, progress=False, checkpoint_dir=ck, resume=True)
    with pytest.raises(ConfigError, match=r"config.hidden: 16 -> 32"):
        run(dataclasses.replace(cfg, hidden=32), data=data, progress=False, checkpoint_dir=ck, resume=True)
    rec = run(dataclasses.replace(cfg, eval_every=2), data=data, progress=False, checkpoint_dir=ck, resume=True)
    assert rec["complete"]


def test_llm_resume_refuses_another_lr_and_another_csv_with_the_same_columns(tmp_path):
    from llm_scale.run import run
    from test_llm_scale import _cfg, word_table

    table = word_table(tmp_path / "a.csv")
    other = word_table(tmp_path / "b.csv", labels=("pos", "neg"))  # same columns and size, other content
    cfg = _cfg(table, "tiny-roberta", "fedavg", rounds=3)
    ck = tmp_path / "ck"
    run(cfg, checkpoint_dir=ck, stop_after=1, progress=False)
    with pytest.raises(ConfigError, match=r"config.lr: 0.005 -> 0.01"):
        run(dataclasses.replace(cfg, lr=1e-2), checkpoint_dir=ck, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"data.sha256"):
        run(dataclasses.replace(cfg, data_path=str(other)), checkpoint_dir=ck, resume=True, progress=False)
    rec = run(dataclasses.replace(cfg, threads=1, eval_every=3), checkpoint_dir=ck, resume=True, progress=False)
    assert rec["complete"] and rec["rounds_done"] == 3


def test_the_flower_strategy_refuses_a_resume_with_another_fingerprint(tmp_path):
    """Both Flower apps pass their tier's fingerprint (the toy's: mnist_toy.run.run_fingerprint; the LLM
    app's: llm_scale.run.run_fingerprint); the strategy resumes through the core's check."""
    from fedlora.flower import FedLoraStrategy
    from fedlora.loop import save_round

    cfg = FedConfig(rule="fedavg", rounds=3, num_clients=3, seed=0)
    save_round(tmp_path, cfg, state=init_state("fedavg"), round_done=0, history=[{}], client_state={},
               run_info={"fingerprint": {"config": {"hidden": 16}}})
    with pytest.raises(ConfigError, match=r"config.hidden: 16 -> 32"):
        FedLoraStrategy(cfg=cfg, init=init_state("fedavg"), checkpoint_dir=tmp_path, resume=True,
                        fingerprint={"config": {"hidden": 32}})
    ok = FedLoraStrategy(cfg=cfg, init=init_state("fedavg"), checkpoint_dir=tmp_path, resume=True,
                         fingerprint={"config": {"hidden": 16}})
    assert ok.resumed_from == 1


def test_both_flower_apps_pass_their_tiers_fingerprint():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    for app in ("flower-mnist/flower_mnist/server_app.py", "flower-llm/flower_llm/server_app.py"):
        assert "fingerprint=run_fingerprint(" in (root / app).read_text(), app
