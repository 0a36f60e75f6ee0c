"""fedlora.checkpoint on its own: the fingerprint diff, atomic JSON, the safetensors round trip of every
state part, client-local state, the global generators, and the file a checkpoint leaves behind.
Fast unit tests (part of the mutation suite of the loop and checkpoint)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fedlora.checkpoint import (atomic_write_json, file_sha256, fingerprint_diff, load_checkpoint, save_checkpoint,
                                state_from_tensors, state_to_tensors)
from fedlora.factors import DenseBase, GlobalMatrix, LoRAFactors, LowRank


def test_fingerprint_diff_names_each_changed_dotted_key_with_old_and_new_values_in_key_order():
    old = {"toy": {"lr": 0.001, "hidden": 64, "sizes": (1, 2)}, "data": "aa", "gone": 1}
    new = {"toy": {"lr": 0.01, "hidden": 64, "sizes": [1, 2]}, "data": "bb", "extra": True}
    assert fingerprint_diff(old, new) == [
        "data: 'aa' -> 'bb'", "extra: '(absent)' -> True", "gone: 1 -> '(absent)'", "toy.lr: 0.001 -> 0.01"]
    assert fingerprint_diff(old, old) == [] and fingerprint_diff({}, {}) == []


def test_fingerprint_diff_sees_nested_and_top_level_changes_alike():
    assert fingerprint_diff({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}) == ["a.b.c: 1 -> 2"]
    assert fingerprint_diff({"a": 1}, {"a": {"b": 1}}) == ["a: 1 -> '(absent)'", "a.b: '(absent)' -> 1"]
    assert fingerprint_diff({"x": None}, {"x": 0}) == ["x: None -> 0"]


def test_atomic_write_json_writes_sorted_readable_json_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    atomic_write_json(p, {"b": 2, "a": [3]})  # replaces
    assert json.loads(p.read_text()) == {"a": [3], "b": 2}
    assert p.read_text().index('"a"') < p.read_text().index('"b"')
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.json"]


def test_file_sha256_is_the_content_hash(tmp_path):
    import hashlib

    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\nhi,1\n" * 1000)
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def _state():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "lora_only": GlobalMatrix(lora=LoRAFactors(A=r(2, 5), B=r(4, 2), scale=0.5)),
        "lowrank_base": GlobalMatrix(lora=LoRAFactors(A=r(3, 5), B=r(4, 3), scale=2.0), base=LowRank(U=r(4, 2), V=r(2, 5))),
        "dense_base": GlobalMatrix(lora=LoRAFactors(A=r(2, 5), B=r(4, 2), scale=1.0), base=DenseBase(M=r(4, 5))),
        "full": GlobalMatrix(W=r(4, 5)),
        "head": r(3, 4).double(),
    }


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and torch.equal(x, y)
            continue
        assert (x.lora is None) == (y.lora is None) and (x.W is None) == (y.W is None)
        assert type(x.base) is type(y.base)
        if x.lora is not None:
            assert torch.equal(x.lora.A, y.lora.A) and torch.equal(x.lora.B, y.lora.B) and x.lora.scale == y.lora.scale
        if isinstance(x.base, LowRank):
            assert torch.equal(x.base.U, y.base.U) and torch.equal(x.base.V, y.base.V)
        if isinstance(x.base, DenseBase):
            assert torch.equal(x.base.M, y.base.M)
        if x.W is not None:
            assert torch.equal(x.W, y.W)


def test_every_state_part_survives_the_tensor_round_trip():
    state = _state()
    tensors, meta = state_to_tensors(state)
    assert meta["head"] == {"dense": True} and meta["lora_only"] == {"scale": 0.5} and meta["full"] == {}
    assert set(tensors) == {"lora_only::lora.A", "lora_only::lora.B", "lowrank_base::lora.A", "lowrank_base::lora.B",
                            "lowrank_base::base.U", "lowrank_base::base.V", "dense_base::lora.A", "dense_base::lora.B",
                            "dense_base::base.M", "full::W", "head::dense"}
    _same(state, state_from_tensors(tensors, meta))


def test_a_matrix_name_with_the_separator_is_refused():
    with pytest.raises(ValueError, match="rename it"):
        state_to_tensors({"a::b": torch.zeros(2)})


def test_save_then_load_gives_the_state_the_info_the_client_state_and_keeps_one_tensor_file(tmp_path):
    state = _state()
    local = {3: {"head": torch.ones(2, 2)}, 11: {"head": torch.zeros(2, 2), "bias": torch.arange(3.0)}}
    assert load_checkpoint(tmp_path) is None  # nothing committed yet
    save_checkpoint(tmp_path, state=state, round_done=0, info={"history": [1]})
    path = save_checkpoint(tmp_path, state=state, round_done=7, info={"history": [1, 2]}, client_state=local)
    assert path == tmp_path / "checkpoint.json"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.json", "state_round000007.safetensors"]
    loaded, info = load_checkpoint(tmp_path)
    _same(state, loaded)
    assert info["round_done"] == 7 and info["history"] == [1, 2] and info["tensors"] == "state_round000007.safetensors"
    assert set(info["client_state"]) == {3, 11}  # ids come back as ints
    assert torch.equal(info["client_state"][11]["bias"], torch.arange(3.0))
    assert torch.equal(info["client_state"][3]["head"], torch.ones(2, 2))
    save_checkpoint(tmp_path, state=state, round_done=8, info={})
    assert "client_state" not in load_checkpoint(tmp_path)[1]  # none saved, none invented


def test_the_global_generators_come_back_only_when_asked(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    save_checkpoint(tmp_path, state=_state(), round_done=0, info={})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    load_checkpoint(tmp_path)  # restores the generators to the save point
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    torch.manual_seed(5)
    after = torch.get_rng_state()
    load_checkpoint(tmp_path, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), after)
    _, info = load_checkpoint(tmp_path, restore_rng=False)
    assert not any(k.startswith("__") for k in info["matrices"])  # generator tensors never reach the state


def test_a_numpy_gaussian_cache_survives_the_round_trip(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached second gaussian in the legacy generator
    save_checkpoint(tmp_path, state=_state(), round_done=0, info={})
    expected = np.random.standard_normal(3)
    load_checkpoint(tmp_path)
    assert np.array_equal(np.random.standard_normal(3), expected)
