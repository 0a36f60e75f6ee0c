"""Partitioners: disjoint, complete (or on budget), label histograms as asked, seeded."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedlora.partition import dirichlet, iid, k_labels, make_partition, quantity_skew, shards


def _labels(n=2000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _disjoint_complete(p, n):
    allidx = np.concatenate(p.indices)
    assert len(np.unique(allidx)) == allidx.size  # disjoint
    return allidx.size == n and set(allidx.tolist()) == set(range(n))


@settings(max_examples=20, deadline=None)
@given(K=st.integers(1, 30), seed=st.integers(0, 999), alpha=st.floats(0.05, 50))
def test_iid_dirichlet_quantity_are_disjoint_and_complete(K, seed, alpha):
    y = _labels()
    for p in (iid(y, K, seed=seed), dirichlet(y, K, alpha=alpha, seed=seed), quantity_skew(y, K, alpha=alpha, seed=seed)):
        assert _disjoint_complete(p, y.size)
        assert len(p.indices) == K and min(p.summary["samples"]) >= 1
        assert np.array_equal(np.sum(p.summary["label_histogram"], axis=0), np.bincount(y, minlength=10))


@pytest.mark.parametrize("K,L", [(10, 1), (5, 2), (20, 2), (100, 2)])
def test_k_labels_gives_each_client_exactly_its_labels(K, L):
    y = _labels(6000)
    p = k_labels(y, K, labels_per_client=L, seed=1)
    assert _disjoint_complete(p, y.size)
    for h in p.summary["label_histogram"]:
        assert sum(1 for v in h if v) == L
    if K * L == 10:  # one whole class per shard
        for idx in p.indices:
            for c in np.unique(y[idx]):
                assert (y[idx] == c).sum() == (y == c).sum()


def test_k_labels_refuses_impossible_requests():
    with pytest.raises(ValueError, match="multiple of 10"):
        k_labels(_labels(), 7, labels_per_client=1, seed=0)


def test_shards_keep_the_total_budget_fixed():
    y = _labels()
    sizes = [sum(shards(y, K, total=600, seed=0).summary["samples"]) for K in (3, 20, 50)]
    assert sizes == [600, 600, 600]


def test_dirichlet_alpha_controls_skew_and_seed_controls_draws():
    y = _labels(5000)
    def skew(alpha):
        h = np.array(dirichlet(y, 10, alpha=alpha, seed=0).summary["label_histogram"], dtype=float)
        return float(np.mean((h / h.sum(1, keepdims=True)).max(1)))
    assert skew(0.05) > skew(1.0) > skew(100.0)
    a, b = dirichlet(y, 10, alpha=0.5, seed=3), dirichlet(y, 10, alpha=0.5, seed=3)
    assert all(np.array_equal(i, j) for i, j in zip(a.indices, b.indices))


def test_make_partition_names_the_valid_schemes():
    with pytest.raises(ValueError, match="use iid, dirichlet"):
        make_partition("pathological", _labels(), 5, seed=0)
