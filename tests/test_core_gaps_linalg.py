"""``compress`` and FedEx's residual as a caller sees them: the rank kept, the product kept, the dtype
kept, and when FedEx re-compresses by default (mutation testing, issue 25)."""
from __future__ import annotations

import pytest
import torch

from fedlora import ClientUpdate
from fedlora.aggregators.fedex import fedex_residual
from fedlora.linalg import compress, factored_svd, merge_into_base
from fedlora.factors import DenseBase, LowRank

F64 = torch.float64


def _rnd(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def test_compress_of_rank_zero_factors_stays_rank_zero():
    L, Rt = compress(torch.zeros(5, 0, dtype=F64), torch.zeros(0, 4, dtype=F64))
    assert L.shape == (5, 0) and Rt.shape == (0, 4)


def test_compress_of_a_zero_product_keeps_one_zero_direction():
    U, V = torch.zeros(8, 4, dtype=F64), torch.zeros(4, 6, dtype=F64)
    L, Rt = compress(U, V)
    assert L.shape == (8, 1) and Rt.shape == (1, 6)
    assert not (L @ Rt).any()


@pytest.mark.parametrize("true_rank", [1, 2, 3])
def test_compress_keeps_the_numerical_rank_and_the_product(true_rank):
    g = torch.Generator().manual_seed(true_rank)
    m, n, q = 9, 7, 5
    U = _rnd(g, m, true_rank) @ _rnd(g, true_rank, q)  # (m, q) of rank true_rank
    V = _rnd(g, q, n)
    L, Rt = compress(U, V)
    assert L.shape == (m, true_rank) and Rt.shape == (true_rank, n)
    assert torch.allclose(L @ Rt, U @ V, atol=1e-10)


def test_compress_of_a_full_rank_product_keeps_every_direction():
    g = torch.Generator().manual_seed(0)
    U, V = _rnd(g, 9, 4), _rnd(g, 4, 7)
    L, Rt = compress(U, V)
    assert L.shape == (9, 4) and torch.allclose(L @ Rt, U @ V, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_compress_returns_the_input_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    U, V = _rnd(g, 6, 3, dtype=dtype), _rnd(g, 3, 5, dtype=dtype)
    L, Rt = compress(U, V)
    assert L.dtype == dtype and Rt.dtype == dtype
    tol = {torch.bfloat16: 0.1, torch.float16: 2e-2, torch.float32: 1e-4, F64: 1e-10}[dtype]
    assert torch.allclose((L @ Rt).double(), U.double() @ V.double(), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("k", [1, 2])
def test_compress_max_rank_is_the_best_rank_k_approximation(k):
    g = torch.Generator().manual_seed(2)
    U, V = _rnd(g, 8, 4), _rnd(g, 4, 6)
    L, Rt = compress(U, V, max_rank=k)
    u, s, vt = torch.linalg.svd(U @ V)
    assert L.shape == (8, k)
    assert torch.allclose(L @ Rt, (u[:, :k] * s[:k]) @ vt[:k], atol=1e-10)


def test_compress_rtol_drops_the_small_directions():
    Q = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=F64))[0]
    U = Q * torch.tensor([10.0, 2.0, 0.5], dtype=F64)  # singular values 10, 2, 0.5
    V = torch.eye(3, 5, dtype=F64)
    assert compress(U, V, rtol=0.1)[0].shape[1] == 2  # keeps σ > 1
    assert compress(U, V, rtol=0.01)[0].shape[1] == 3
    assert compress(U, V, rtol=0.3)[0].shape[1] == 1


def test_factored_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(4)
    U, V = _rnd(g, 7, 3), _rnd(g, 3, 5)
    L, S, Rt = factored_svd(U, V)
    assert torch.allclose((L * S) @ Rt, U @ V, atol=1e-10)
    assert torch.allclose(S, torch.linalg.svdvals(U @ V)[:3], atol=1e-10)
    assert torch.allclose(L.T @ L, torch.eye(3, dtype=F64), atol=1e-10)


# --- FedEx's residual: re-compressed by default when K r <= min(m, n) / 4 --------------------------------------

def _fedex_inputs(m, n, r, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = [ClientUpdate(A=_rnd(g, r, n), B=_rnd(g, m, r), scale=0.5) for _ in range(K)]
    p = torch.rand(K, generator=g, dtype=F64) + 0.1
    p = p / p.sum()
    A = sum(pk * u.A for pk, u in zip(p, ups))
    B = sum(pk * u.B for pk, u in zip(p, ups))
    want = 0.5 * (sum(pk * u.B @ u.A for pk, u in zip(p, ups)) - B @ A)
    return ups, p, A, B, want


@pytest.mark.parametrize("mn,recompressed", [(32, True), (40, True), (31, False), (12, False)])
def test_fedex_residual_is_recompressed_by_default_when_small(mn, recompressed):
    K, r = 2, 4  # K r = 8: re-compressed iff 8 <= min(m, n) // 4; the residual's rank is (K - 1) r = 4
    ups, p, A, B, want = _fedex_inputs(mn, mn, r, K)
    R = fedex_residual(ups, p, 0.5, A, B)
    assert R.U.shape[1] == ((K - 1) * r if recompressed else K * r)
    assert torch.allclose(R.dense(), want, atol=1e-10)


@pytest.mark.parametrize("flag,cols", [(True, 4), (False, 8)])
def test_fedex_residual_honours_an_explicit_recompress(flag, cols):
    ups, p, A, B, want = _fedex_inputs(12, 12, 4, 2)
    R = fedex_residual(ups, p, 0.5, A, B, recompress=flag)
    assert R.U.shape[1] == cols and torch.allclose(R.dense(), want, atol=1e-10)


def test_merge_into_base_goes_dense_once_factors_are_larger():
    g = torch.Generator().manual_seed(5)
    small = LowRank(U=_rnd(g, 10, 2), V=_rnd(g, 2, 10))
    out = merge_into_base(None, small)
    assert isinstance(out, LowRank) and torch.allclose(out.dense(), small.dense(), atol=1e-10)
    big = LowRank(U=_rnd(g, 10, 5), V=_rnd(g, 5, 10))  # 5 (10 + 10) >= 100
    out = merge_into_base(small, big)
    assert isinstance(out, DenseBase) and torch.allclose(out.dense(), small.dense() + big.dense(), atol=1e-10)


def test_merge_into_base_recompresses_by_default():
    g = torch.Generator().manual_seed(6)
    R = LowRank(U=_rnd(g, 12, 2), V=_rnd(g, 2, 10))
    out = merge_into_base(R, R)  # [U U][V; V] has rank 2, not 4
    assert isinstance(out, LowRank) and out.rank == 2
    assert torch.allclose(out.dense(), 2 * R.dense(), atol=1e-10)
    kept = merge_into_base(R, R, recompress=False)
    assert isinstance(kept, LowRank) and kept.rank == 4 and torch.allclose(kept.dense(), 2 * R.dense(), atol=1e-10)


def test_merge_into_base_goes_dense_exactly_when_factors_hold_as_many_numbers():
    g = torch.Generator().manual_seed(7)
    m = n = 8  # q (m + n) >= m n  <=>  q >= 4
    three = merge_into_base(None, LowRank(U=_rnd(g, m, 3), V=_rnd(g, 3, n)))
    four = merge_into_base(None, LowRank(U=_rnd(g, m, 4), V=_rnd(g, 4, n)))
    assert isinstance(three, LowRank) and isinstance(four, DenseBase)
    dense = DenseBase(M=_rnd(g, m, n))
    assert merge_into_base(dense, three).dense().allclose(dense.dense() + three.dense())


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.float32), (F64, F64)])
def test_svds_compute_in_float32_or_float64(dtype, compute):
    from fedlora.linalg import dense_svd
    g = torch.Generator().manual_seed(8)
    U, V = _rnd(g, 7, 3, dtype=dtype), _rnd(g, 3, 5, dtype=dtype)
    L, S, Rt = factored_svd(U, V)
    assert L.dtype == S.dtype == Rt.dtype == compute
    u, s, vt = dense_svd(U @ V)
    assert u.dtype == s.dtype == vt.dtype == compute
    assert u.shape == (7, 5) and s.shape == (5,) and vt.shape == (5, 5)  # thin SVD
    ref = (U @ V).to(compute)
    assert torch.allclose((u * s) @ vt, ref, atol=1e-4 * float(ref.abs().max()))


# --- the factored Frobenius norm ----------------------------------------------------------------------------

def _norm_cases():
    g = torch.Generator().manual_seed(9)
    m, n = 12, 10
    lr = [(_rnd(g, m, 2), _rnd(g, 2, n)), (_rnd(g, m, 1, dtype=torch.float32), _rnd(g, 1, n, dtype=torch.float32))]
    big = [(_rnd(g, m, 6), _rnd(g, 6, n))]  # 6 (12 + 10) >= 120: the sum is formed
    dense = [_rnd(g, m, n, dtype=torch.float32)]
    return {"factored": (lr, ()), "single": (lr[:1], ()), "wide": (big, ()), "mixed": (lr, dense),
            "dense-only": ([], dense), "cancel": ([lr[0], (-lr[0][0], lr[0][1])], ()),
            "float32": ([(_rnd(g, m, 3, dtype=torch.float32), _rnd(g, 3, n, dtype=torch.float32))], ())}, (m, n)


@pytest.mark.parametrize("which", ["factored", "single", "wide", "mixed", "dense-only", "cancel", "float32"])
def test_frobenius_norm_is_the_norm_of_the_sum(which):
    from fedlora.linalg import frobenius_norm
    cases, shape = _norm_cases()
    lowrank, dense = cases[which]
    total = torch.zeros(shape, dtype=F64)
    for U, V in lowrank:
        total += U.double() @ V.double()
    for D in dense:
        total += D.double()
    got = frobenius_norm(lowrank, dense, shape=shape)
    assert isinstance(got, float)
    want = float(torch.linalg.matrix_norm(total))
    assert got == pytest.approx(want, rel=1e-11, abs=1e-6 if which == "cancel" else 0)


def test_frobenius_norm_of_nothing_is_zero():
    from fedlora.linalg import frobenius_norm
    assert frobenius_norm([], shape=(3, 4)) == 0.0
    assert frobenius_norm([], [torch.zeros(3, 4)], shape=(3, 4)) == 0.0
