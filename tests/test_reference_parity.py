"""The factored fast paths against the dense references, on random inputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedlora import aggregate, ClientUpdate, GlobalMatrix, LoRAFactors, RoundContext
from fedlora.aggregators.fedex import fedex_residual
from fedlora.aggregators.reference import REFERENCES
from fedlora.linalg import compress, dense_svd, factored_svd

from rule_cases import make_case


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / max(torch.linalg.norm(b), 1e-30))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), r=st.integers(1, 5), K=st.integers(1, 8), seed=st.integers(0, 9999),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_flexlora_factored_equals_dense_svd(m, n, r, K, seed, dtype):
    case = make_case("flexlora", m=m, n=n, r=r, K=K, seed=seed, dtype=dtype, with_base=False)
    p = case.weights / case.weights.sum()
    fast = aggregate("flexlora", case.state, case.updates, case.weights, ctx=case.ctx)
    ref = REFERENCES["flexlora"](case.state, case.updates, p, case.ctx)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert _rel(fast.state.lora.delta(), ref.state.lora.delta()) < tol
    # same singular values, and every client's rank-r_k truncation is the same best approximation
    S_fast = torch.linalg.norm(fast.state.lora.B, dim=0)
    S_ref = torch.linalg.norm(ref.state.lora.B, dim=0)
    q = min(S_fast.numel(), S_ref.numel())
    assert torch.allclose(S_fast[:q].double(), S_ref[:q].double(), rtol=1e-4, atol=1e-4 * float(S_ref.max()))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), r=st.integers(1, 5), K=st.integers(1, 8), seed=st.integers(0, 9999))
def test_fedex_factored_equals_dense_residual(m, n, r, K, seed):
    case = make_case("fedex", m=m, n=n, r=r, K=K, seed=seed)
    p = case.weights / case.weights.sum()
    fast = aggregate("fedex", case.state, case.updates, case.weights)
    ref = REFERENCES["fedex"](case.state, case.updates, p, RoundContext())
    assert _rel(fast.state.effective_delta(), ref.state.effective_delta()) < 1e-10
    R_fast = fast.broadcast["residual_U"] @ fast.broadcast["residual_V"]
    assert R_fast.shape == (m, n)  # never transposed: (m, n) like nn.Linear.weight
    assert _rel(R_fast, ref.broadcast["residual"]) < 1e-9 or float(ref.broadcast["residual"].abs().max()) < 1e-12
    q = fast.broadcast["residual_U"].shape[1]
    assert q <= K * r  # rank <= K r, by the cross-covariance form
    if K * r <= min(m, n) // 4:  # recompressed: at most the numerical rank
        assert q <= min(K * r, m, n)


def _residual_inputs(m, n, r, K):
    case = make_case("fedex", m=m, n=n, r=r, K=K, seed=0)
    p = case.weights / case.weights.sum()
    A = sum(float(pk) * u.A for u, pk in zip(case.updates, p))
    B = sum(float(pk) * u.B for u, pk in zip(case.updates, p))
    return case.updates, p, case.state.lora.scale, A, B


def test_fedex_residual_can_be_materialised_densely():
    ups, p, s, A, B = _residual_inputs(8, 3, 2, 3)
    R = fedex_residual(ups, p, s, A, B, recompress=False)
    assert R.rank == 3 * 2
    assert fedex_residual(ups, p, s, A, B, recompress=True).rank == 3  # = min(m, n)
    expected = s * (sum(float(pk) * (u.B @ u.A) for u, pk in zip(ups, p)) - B @ A)
    assert _rel(R.dense(), expected) < 1e-12


def test_fedex_residual_rank_is_at_most_k_minus_one_times_r():
    # Σ p_k (A_k − Ā) = 0, so the K deviation blocks are dependent: rank ≤ (K − 1) r, and recompression finds it
    ups, p, s, A, B = _residual_inputs(20, 15, 2, 3)
    raw = fedex_residual(ups, p, s, A, B, recompress=False)
    small = fedex_residual(ups, p, s, A, B, recompress=True)
    assert raw.rank == 6 and small.rank == 4
    assert _rel(small.dense(), raw.dense()) < 1e-12


def test_factored_svd_matches_dense_svd_on_a_tall_product():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(300, 12, generator=g, dtype=torch.float64), torch.randn(12, 70, generator=g, dtype=torch.float64)
    L, S, Rt = factored_svd(U, V)
    _, S_ref, _ = dense_svd(U @ V)
    assert torch.allclose(S, S_ref[:12], rtol=1e-10)
    assert _rel((L * S) @ Rt, U @ V) < 1e-12


def test_compress_keeps_the_product_and_drops_zero_directions():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(20, 3, generator=g, dtype=torch.float64)
    U = torch.cat([U, U @ torch.randn(3, 4, generator=g, dtype=torch.float64)], dim=1)  # rank 3 in 7 columns
    V = torch.randn(7, 15, generator=g, dtype=torch.float64)
    L, R = compress(U, V)
    assert L.shape[1] == 3 and _rel(L @ R, U @ V) < 1e-12
    L2, R2 = compress(U, V, max_rank=2)
    _, S, _ = torch.linalg.svd(U @ V)
    assert abs(float(torch.linalg.norm(U @ V - L2 @ R2)) - float(S[2])) < 1e-9  # Eckart–Young


def test_half_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype():
    case = make_case("flexlora", m=16, n=10, r=3, K=4, seed=7, dtype=torch.bfloat16, with_base=False)
    agg = aggregate("flexlora", case.state, case.updates, case.weights, ctx=case.ctx)
    assert agg.state.lora.A.dtype == torch.bfloat16 and agg.state.lora.B.dtype == torch.bfloat16
