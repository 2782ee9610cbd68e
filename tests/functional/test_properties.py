"""Property-based tests (hypothesis) of spectral_monitor.functional on awkward inputs.

Inputs: matrices ``U diag(s) Vᵀ`` built in float64 with planted spectra (all zero, rank 1, constant,
sigma from 1e6 down to 1e-6, geometric decay, arbitrary), of shapes down to 1 x n and n x 1, with leading batch dims
whose members mix those kinds, given as float32/float64/bf16/fp16 and as contiguous, transposed
(column-major) or strided views. Every number is checked against an independent oracle: the numpy
float64 SVD of the values actually passed (after rounding to the input dtype), numpy sums and
entropies, and a direct numpy implementation of the power-law candidate search.

Tolerances are stated relative to sigma_1 (float32 arithmetic resolves a singular value only to
~1e-7 sigma_1, whatever its size), so an all-zero input must give its documented values exactly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from spectral_monitor.functional.powerlaw import fit_power_law
from spectral_monitor.functional.rsvd import lora_svd, randomized_svd, sketch_left_vectors
from spectral_monitor.functional.spectrum import (
    abs_cosine,
    base_alignment,
    effective_rank,
    energy_share,
    frobenius_sq,
    full_singular_values,
    intruder_count,
    sparsity,
    spectral_gap,
    stable_rank,
    subspace_overlap,
)

F64 = torch.float64
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided")
KINDS = ("zero", "rank1", "constant", "range", "decay", "random")
# Absolute error allowed on a singular value, in units of sigma_1, by working dtype: float32 products
# and QRs (bf16/fp16 are upcast) resolve ~1e-7 sigma_1; float64 ~1e-8 sigma_1 through the Gram matrix.
SV_TOL = {torch.float32: 1e-5, torch.float64: 1e-7, torch.bfloat16: 1e-5, torch.float16: 1e-5}

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- strategies


@st.composite
def spectra(draw: st.DrawFn, k: int, top: float = 1e6) -> np.ndarray:
    """``(k,)`` float64 descending non-negative planted singular values of one kind, sigma_1 <= top."""
    kind = draw(st.sampled_from(KINDS))
    r = draw(st.integers(1, k))  # planted rank (the "zero" kind ignores it)
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
    s = np.zeros(k)
    if kind == "rank1":
        s[0] = scale
    elif kind == "constant":
        s[:r] = scale
    elif kind == "range":
        s[:r] = np.geomspace(1e6, 1e-6, r) if r > 1 else 1e6
    elif kind == "decay":  # well separated, moderate condition number
        s[:r] = scale * draw(st.floats(1.1, 4.0)) ** -np.arange(r)
    elif kind == "random":
        s[:r] = sorted(draw(st.lists(st.floats(1e-6, 1e6), min_size=r, max_size=r)), reverse=True)
    if s[0] > top:
        s *= top / s[0]
    return s


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=gen)).Q


def _layout(A: Tensor, layout: str) -> Tensor:
    """The same values in another memory layout: a column-major view or a strided column slice."""
    if layout == "transposed":
        return A.mT.contiguous().mT
    if layout == "strided":
        big = torch.zeros(*A.shape[:-1], 2 * A.shape[-1], dtype=A.dtype)
        big[..., ::2] = A
        return big[..., ::2]
    return A.contiguous()


@st.composite
def matrices(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES,
    batch: bool = True,
    max_side: int = 9,
) -> tuple[Tensor, np.ndarray, int]:
    """``(A, sigma, rank)``: an input ``(*, m, n)`` (any dtype and layout, batch members of mixed
    kinds), the exact float64 singular values of the values it holds ``(*, min(m, n))`` and the
    largest planted rank in the batch."""
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    bshape = draw(st.lists(st.integers(1, 3), max_size=2)) if batch else []
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    k = min(m, n)
    top = 1.0 if dtype == torch.float16 else 1e6  # fp16 overflows at 65504
    mats, rank = [], 0
    for _ in range(math.prod(bshape)):
        s = draw(spectra(k, top))
        rank = max(rank, int((s > 0).sum()))
        mats.append((_orthonormal(m, k, gen) * torch.from_numpy(s)) @ _orthonormal(n, k, gen).mT)
    A = _layout(torch.stack(mats).reshape(*bshape, m, n).to(dtype), draw(st.sampled_from(LAYOUTS)))
    sigma = np.linalg.svd(A.double().numpy(), compute_uv=False)
    return A, sigma, rank


def _np(t: Tensor) -> np.ndarray:
    return t.double().numpy()


def _reconstruct(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    return (U.double() * S.double().unsqueeze(-2)) @ V.double().mT


def _spectral_norm(M: Tensor) -> np.ndarray:
    return _np(torch.linalg.matrix_norm(M.double(), ord=2)) if M.numel() else np.zeros(M.shape[:-2])


def _np_erank(s: np.ndarray) -> float:
    """exp of the entropy of the L1-normalised values (0 ln 0 = 0); 0 for an all-zero vector."""
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _orthonormal_cols(U: Tensor, atol: float) -> None:
    eye = torch.eye(U.shape[-1], dtype=F64).expand(*U.shape[:-2], -1, -1)
    torch.testing.assert_close(U.double().mT @ U.double(), eye, atol=atol, rtol=0)


# --------------------------------------------------------------------------- randomized_svd


@PROPS
@given(
    case=matrices(),
    rank=st.integers(1, 10),
    oversample=st.integers(0, 6),
    niter=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_svd_ritz_values_and_exact_when_the_sketch_covers_the_rank(
    case: tuple[Tensor, np.ndarray, int], rank: int, oversample: int, niter: int, seed: int
) -> None:
    """Ritz values never exceed the exact ones; they are the exact top-r values when the sketch
    width covers the rank; U has orthonormal columns, V where sigma is resolved (>= 1e-2 sigma_1);
    with rank >= the planted rank, U diag(S) Vᵀ reconstructs A; zero matrices give exact zeros."""
    A, sigma, planted = case
    m, n = A.shape[-2:]
    r, width = min(rank, m, n), min(rank + oversample, m, n)
    U, S, V = randomized_svd(A, rank, niter=niter, oversample=oversample, generator=torch.Generator().manual_seed(seed))
    out_dtype = F64 if A.dtype == F64 else torch.float32
    assert U.shape == (*A.shape[:-1], r) and S.shape == (*A.shape[:-2], r) and V.shape == (*A.shape[:-2], n, r)
    assert U.dtype == S.dtype == V.dtype == out_dtype
    assert U.isfinite().all() and S.isfinite().all() and V.isfinite().all()
    s_out, s1 = _np(S), sigma[..., :1]
    tol = SV_TOL[A.dtype] * s1
    assert (s_out >= 0).all() and (np.diff(s_out, axis=-1) <= 0).all()
    assert (s_out <= sigma[..., :r] + tol).all()  # Ritz values: sigma_i(QᵀA) <= sigma_i(A)
    # The sketch spans range(A) when its width covers the planted rank, up to the rounding of the
    # entries; bf16/fp16 rounding leaves a full-rank tail of ~1e-3 sigma_1, covered only by a full sketch.
    covered = width >= planted if A.dtype in (torch.float32, F64) else width == min(m, n)
    if covered:
        assert (np.abs(s_out - sigma[..., :r]) <= tol).all()
    _orthonormal_cols(U, atol=1e-5)
    resolved = (s_out >= 1e-2 * s1) & (s_out > 0)
    for idx in np.ndindex(*S.shape[:-1]):
        cols = np.flatnonzero(resolved[idx])
        _orthonormal_cols(V[idx][:, cols], atol=1e-4)
    if covered and rank >= (planted if A.dtype in (torch.float32, F64) else min(m, n)):
        assert (_spectral_norm(_reconstruct(U, S, V) - A.double()) <= 10 * SV_TOL[A.dtype] * s1[..., 0]).all()
    zero = sigma[..., 0] == 0
    assert (s_out[zero] == 0).all() and (_np(V)[zero] == 0).all()


@PROPS
@given(
    case=matrices(batch=False),
    layout=st.sampled_from(LAYOUTS),
    scales=st.lists(st.sampled_from([0.0, 1e-3, 1.0, 1e3]), min_size=1, max_size=4),
)
def test_randomized_svd_batch_members_and_views_are_independent(
    case: tuple[Tensor, np.ndarray, int], layout: str, scales: list[float]
) -> None:
    """A matrix gives its SVD alone, as a member of a batch of scaled copies (zero included; 4
    members as a 2 x 2 batch) in any memory layout, and its transposed view gives the SVD of the
    transpose. Compared as singular values and as the reconstruction U diag(S) Vᵀ (unique even
    where singular vectors are not) against each member's own float64 SVD."""
    A, sigma, _ = case
    m, n = A.shape
    rank = min(m, n)  # a full sketch: every result below is the exact SVD of what it was given
    tol = SV_TOL[A.dtype]
    members = torch.stack([A * c for c in scales])
    batch = _layout(members.reshape(2, 2, m, n) if len(scales) == 4 else members, layout)
    nb = batch.dim() - 2
    U, S, V = (t.reshape(len(scales), *t.shape[nb:]) for t in randomized_svd(batch, rank))
    for i in range(len(scales)):
        s_ref = np.linalg.svd(_np(members[i]), compute_uv=False)
        assert (np.abs(_np(S[i]) - s_ref) <= tol * s_ref[0]).all()
        assert _spectral_norm(_reconstruct(U[i], S[i], V[i]) - members[i].double()) <= 10 * tol * s_ref[0]
    Ut, St, Vt = randomized_svd(A.mT, rank)  # a view of Aᵀ in the other orientation
    assert Ut.shape == (n, rank) and Vt.shape == (m, rank)
    assert (np.abs(_np(St) - sigma[:rank]) <= tol * sigma[0]).all()
    assert _spectral_norm(_reconstruct(Ut, St, Vt) - A.double().mT) <= 10 * tol * sigma[0]


@PROPS
@given(
    case=matrices(dtypes=(torch.float32, torch.float64, torch.bfloat16)),
    base_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
    rank=st.integers(1, 9),
    block_rows=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_svd_of_a_difference_blocked_or_not(
    case: tuple[Tensor, np.ndarray, int], base_scale: float, rank: int, block_rows: int, seed: int
) -> None:
    """``base`` (one matrix broadcast over the batch) and ``block_rows`` give the SVD of
    ``A - base``: Ritz values below the exact ones, and with a full sketch the exact values and
    the difference itself. The tolerance is relative to sigma_1 of A, of base and of A - base:
    float32 resolves the difference only that well."""
    A, _, _ = case
    m, n = A.shape[-2:]
    base = (base_scale * torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(seed))).to(A.dtype)
    diff = A.double() - base.double()
    sigma = np.linalg.svd(diff.numpy(), compute_uv=False)
    tol = 3 * SV_TOL[A.dtype] * (sigma[..., :1] + _spectral_norm(A)[..., None] + _spectral_norm(base))
    r = min(rank, m, n)
    for kwargs in ({}, {"block_rows": block_rows}):
        U, S, V = randomized_svd(A, rank, base=base, **kwargs)
        assert S.shape == (*A.shape[:-2], r)
        s_out = _np(S)
        assert (s_out <= sigma[..., :r] + tol).all()
        if rank >= min(m, n):
            assert (np.abs(s_out - sigma[..., :r]) <= tol).all()
            assert (_spectral_norm(_reconstruct(U, S, V) - diff) <= 10 * tol[..., 0]).all()


@FEW
@given(case=matrices(dtypes=(torch.float32, torch.float64, torch.bfloat16)), rank=st.integers(1, 9))
def test_randomized_svd_bf16_sketch_stays_near_the_rounded_matrix(
    case: tuple[Tensor, np.ndarray, int], rank: int
) -> None:
    """``sketch_dtype=bf16``: A is rounded once and the products run in bf16 (their outputs rounded
    to 2⁻⁹ relative), so the values are those of bf16(A) to ~2⁻⁸ sigma_1 on these tiny matrices;
    U stays orthonormal to float32 precision (the rounded basis is re-orthonormalised)."""
    A, _, _ = case
    m, n = A.shape[-2:]
    r = min(rank, m, n)
    rounded = np.linalg.svd(_np(A.bfloat16()), compute_uv=False)
    U, S, V = randomized_svd(A, rank, sketch_dtype=torch.bfloat16)
    assert U.dtype == S.dtype == V.dtype == (F64 if A.dtype == F64 else torch.float32)
    assert U.isfinite().all() and S.isfinite().all() and V.isfinite().all()
    tol = 2**-8 * rounded[..., :1]
    assert (_np(S) <= rounded[..., :r] + tol).all()
    if rank >= min(m, n):
        assert (np.abs(_np(S) - rounded[..., :r]) <= tol).all()
    _orthonormal_cols(U, atol=1e-5)


@FEW
@given(case=matrices(dtypes=(torch.float32, torch.float64)), rank=st.integers(1, 9))
def test_randomized_svd_warm_start_from_the_exact_subspace_needs_no_iterations(
    case: tuple[Tensor, np.ndarray, int], rank: int
) -> None:
    """``init`` = exact top-r right singular vectors, q = 0, p = 0: the exact top-r values."""
    A, sigma, _ = case
    m, n = A.shape[-2:]
    r = min(rank, m, n)
    V0 = torch.from_numpy(np.linalg.svd(_np(A))[2]).mT[..., :r].to(A.dtype)
    _, S, _ = randomized_svd(A, rank, niter=0, oversample=0, init=V0)
    assert (np.abs(_np(S) - sigma[..., :r]) <= SV_TOL[A.dtype] * sigma[..., :1]).all()


@FEW
@given(
    case=matrices(dtypes=(torch.float32, torch.float64)),
    rank=st.integers(1, 9),
    oversample=st.integers(0, 6),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_svd_any_warm_start_is_exact_when_the_sketch_covers_the_rank(
    case: tuple[Tensor, np.ndarray, int], rank: int, oversample: int, data: st.DataObject, seed: int
) -> None:
    """An arbitrary ``init`` of any width (cut to the sketch's l columns, the rest filled with the
    Gaussian block) gives the exact values, with q = 0, whenever l covers the planted rank."""
    A, sigma, planted = case
    m, n = A.shape[-2:]
    r, l = min(rank, m, n), min(rank + oversample, m, n)
    assume(l >= planted)
    width = data.draw(st.one_of(st.integers(1, l), st.integers(l, 12)))  # the Gaussian fill or a cut
    init = torch.randn(n, width, dtype=A.dtype, generator=torch.Generator().manual_seed(seed))
    _, S, _ = randomized_svd(A, rank, niter=0, oversample=oversample, init=init)
    assert (np.abs(_np(S) - sigma[..., :r]) <= SV_TOL[A.dtype] * sigma[..., :1]).all()


# --------------------------------------------------------------------------- lora_svd


@st.composite
def lora_factors(draw: st.DrawFn) -> tuple[Tensor, Tensor, float]:
    """``(B, A, scale)``: B ``(*, m, r)`` and A ``(r, n)`` or ``(*, r, n)`` (broadcast), each Gaussian,
    zero, of rank 1, or with column/row norms over 12 decades, in any float dtype; any sign of scale."""
    m, n, r = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    bshape = draw(st.lists(st.integers(1, 3), max_size=2))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    top = 1.0 if dtype == torch.float16 else 1e6
    factors = []
    for shape, dim in (((*bshape, m, r), -1), ((*draw(st.sampled_from([[], bshape])), r, n), -2)):
        F = torch.randn(shape, dtype=F64, generator=gen)
        kind = draw(st.sampled_from(["gauss", "zero", "range", "deficient"]))
        if kind == "zero":
            F.zero_()
        elif kind == "range":  # factor norms along r from top down to 1e-12 top
            scales = torch.from_numpy(np.geomspace(top, top * 1e-12, r))
            F = F * (scales if dim == -1 else scales[:, None])
        elif kind == "deficient":  # rank <= 1 along r
            F = F.narrow(dim, 0, 1).expand(shape).clone()
        factors.append(F.to(dtype))
    return factors[0], factors[1], draw(st.sampled_from([-2.0, 0.0, 1e-3, 1.0, 16.0]))


@PROPS
@given(factors=lora_factors())
def test_lora_svd_is_the_exact_svd_of_the_product(factors: tuple[Tensor, Tensor, float]) -> None:
    """``lora_svd(B, A, s)`` = the float64 SVD of s·B@A (values, reconstruction) with k = min(r, m, n)
    columns, U and V orthonormal even where sigma = 0. Tolerance: float32 QRs of the factors resolve
    the product to ~eps ‖s‖‖B‖‖A‖, not to eps sigma_1 of the product."""
    B, A, scale = factors
    m, r, n = B.shape[-2], B.shape[-1], A.shape[-1]
    k = min(r, m, n)
    dense = scale * B.double() @ A.double()
    sigma = np.linalg.svd(dense.numpy(), compute_uv=False)[..., :k]
    U, S, V = lora_svd(B, A, scale)
    batch = dense.shape[:-2]
    out = F64 if F64 in (B.dtype, A.dtype) else torch.float32
    assert U.shape == (*batch, m, k) and S.shape == (*batch, k) and V.shape == (*batch, n, k)
    assert U.dtype == S.dtype == V.dtype == out
    tol = (1e-7 if out == F64 else 1e-5) * abs(scale) * _spectral_norm(B) * _spectral_norm(A)
    tol = np.broadcast_to(tol, batch)
    assert (_np(S) >= 0).all() and (np.diff(_np(S), axis=-1) <= 0).all()
    assert (np.abs(_np(S) - sigma) <= tol[..., None]).all()
    assert (_spectral_norm(_reconstruct(U, S, V) - dense) <= 3 * tol).all()
    _orthonormal_cols(U, atol=1e-5)
    _orthonormal_cols(V, atol=1e-5)


# --------------------------------------------------------------------------- sketch_left_vectors


@PROPS
@given(
    case=matrices(),
    width=st.integers(1, 9),
    data=st.data(),
    mix_seed=st.integers(0, 2**31 - 1),
    poison=st.booleans(),
)
def test_sketch_left_vectors_from_the_leading_right_subspace(
    case: tuple[Tensor, np.ndarray, int], width: int, data: st.DataObject, mix_seed: int, poison: bool
) -> None:
    """Ω spanning each matrix's top-l right subspace (mixed, not orthonormal) gives its top-k left
    subspace, to (rounding of A and Ω, ~c sigma_1) / gap (Davis-Kahan); the columns are always
    orthonormal, and a non-finite matrix gives finite orthonormal output."""
    A, sigma, _ = case
    m, n = A.shape[-2:]
    mats = list(A.reshape(-1, m, n).unbind(0)) if A.dim() > 2 else [A]
    l = min(width, m, n)
    k = data.draw(st.integers(1, l))
    U0, _, Vh0 = np.linalg.svd(np.stack([_np(M) for M in mats]))
    mix = torch.randn(l, l, dtype=F64, generator=torch.Generator().manual_seed(mix_seed)) + torch.eye(l)
    start = (torch.from_numpy(Vh0).mT[..., :l] @ mix).float()
    if poison:
        mats = [M.clone() for M in mats]
        mats[0][0, 0] = math.nan
        mats[-1][-1, -1] = -math.inf
    U = sketch_left_vectors(mats, start, k)
    assert U.shape == (len(mats), m, k) and U.dtype == torch.float32
    assert U.isfinite().all()
    _orthonormal_cols(U, atol=1e-5)
    if poison:
        return
    s = sigma.reshape(len(mats), -1)
    # ‖E‖ of the rounding: relative to sigma_1, plus fp16's subnormal spacing 2⁻²⁴ per product entry
    # (the products run in the matrix's own dtype, so fp16 entries below ~6e-5 lose bits).
    rel = {torch.float32: 1e-5, F64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[A.dtype]
    floor = 2**-24 * math.sqrt(m * l) if A.dtype == torch.float16 else 0.0
    for i in range(len(mats)):
        gap = s[i, k - 1] - (s[i, k] if k < s.shape[1] else 0.0)
        if gap <= 0:
            continue  # the top-k subspace is not unique
        P = U[i].double() @ U[i].double().mT
        P0 = torch.from_numpy(U0[i, :, :k] @ U0[i, :, :k].T)
        assert _spectral_norm(P - P0) <= (rel * s[i, 0] + floor) / gap


# --------------------------------------------------------------------------- spectrum: norms and summaries


@PROPS
@given(case=matrices(), block=st.integers(1, 10))
def test_frobenius_and_full_singular_values_match_float64(case: tuple[Tensor, np.ndarray, int], block: int) -> None:
    """``frobenius_sq`` = the float64 sum of squares; ``full_singular_values`` (any ``block``) = the
    float64 SVD to ~1e-7 sigma_1 (documented ~1e-6), descending, non-negative, float32 for every
    non-float64 input, and exact zeros for a zero matrix."""
    A, sigma, _ = case
    out = F64 if A.dtype == F64 else torch.float32
    fro = frobenius_sq(A)
    assert fro.dtype == out and fro.shape == A.shape[:-2]
    np.testing.assert_allclose(_np(fro), (_np(A) ** 2).sum((-2, -1)), rtol=1e-5, atol=0)
    S = full_singular_values(A, block=block)
    assert S.dtype == out and S.shape == sigma.shape
    s_out = _np(S)
    assert (s_out >= 0).all() and (np.diff(s_out, axis=-1) <= 0).all()
    assert (np.abs(s_out - sigma) <= 1e-7 * sigma[..., :1] + 1e-6 * sigma).all()
    assert (s_out[sigma[..., 0] == 0] == 0).all()


@PROPS
@given(case=matrices())
def test_summaries_match_numpy_and_their_ranges(case: tuple[Tensor, np.ndarray, int]) -> None:
    """energy_share in [0, 1], monotone in k, 1 for the full spectrum; stable rank in [1, rank];
    effective rank in [1, rank]; gap >= 1 (inf at rank 1); each equal to its numpy float64 formula,
    and to the module table's value where sigma_1 = 0. Computed from the exact spectrum rounded to
    float32 (resolution 0: float32 rounding only) and from ``full_singular_values`` (resolution
    1e-7 sigma_1: values below it are round-off, so the gap is checked only well above it)."""
    A, sigma, _ = case
    flat = sigma.reshape(-1, sigma.shape[-1])
    fro = frobenius_sq(A)
    for S, rtol, floor in ((torch.from_numpy(sigma).float(), 1e-5, 0.0), (full_singular_values(A), 1e-4, 1e-7)):
        shares = np.stack([_np(energy_share(S, fro, k)) for k in range(S.shape[-1] + 2)], -1).reshape(len(flat), -1)
        stab, er, gap = (_np(f).reshape(-1) for f in (stable_rank(S, fro), effective_rank(S), spectral_gap(S)))
        for i, s in enumerate(flat):
            assert (shares[i] >= 0).all() and (shares[i] <= 1).all()
            # monotone up to float32 round-off: each k is a separate float32 sum (3 ulps of 1)
            assert (np.diff(shares[i]) >= -2e-7).all()
            rank = int((s > 0).sum())
            if rank == 0:  # the documented zero-input values
                assert (shares[i] == 0).all() and stab[i] == 0 and er[i] == 0 and gap[i] == 1
                continue
            f = float((s**2).sum())
            np.testing.assert_allclose(shares[i], np.minimum(np.cumsum(np.r_[0, s**2, 0]) / f, 1), rtol=rtol, atol=1e-6)
            assert shares[i, -1] == pytest.approx(1, abs=1e-5)
            assert stab[i] == pytest.approx(f / s[0] ** 2, rel=rtol)
            assert 1 - 1e-5 <= stab[i] <= rank * (1 + 1e-5)
            assert er[i] == pytest.approx(_np_erank(s), rel=rtol)
            assert 1 - 1e-5 <= er[i] <= rank * (1 + 1e-5)
            assert gap[i] >= 1
            if len(s) > 1 and s[1] > 1e3 * floor * s[0]:
                assert gap[i] == pytest.approx(s[0] / s[1], rel=rtol + floor * s[0] / s[1])
            else:  # sigma_2 at or below the resolution: inf when it is exactly 0 (or absent)
                below = 0.0 if len(s) == 1 else s[1] + floor * s[0]
                assert gap[i] >= ((1 - rtol) * s[0] / below if below > 0 else math.inf)


@st.composite
def split_spectra(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """``(s, k)``: a descending spectrum of length ``total`` and how many of its values are kept."""
    total = draw(st.integers(1, 12))
    return draw(spectra(total)), draw(st.integers(1, total))


@PROPS
@given(split=split_spectra(), flat_tail=st.booleans(), junk=st.floats(1e-6, 1e6))
def test_effective_rank_tail_estimate_brackets(split: tuple[np.ndarray, int], flat_tail: bool, junk: float) -> None:
    """With the exact missing energy, the flat-tail estimate is >= the erank of the kept values
    (adding values <= the smallest kept one raises the entropy), >= the exact erank (the module's
    "errs high"), <= total, and exact when the true tail is flat. ``total == k`` ignores the
    residual; a negative residual counts as 0."""
    s, k = split
    total = len(s)
    if flat_tail:  # replace the missing values by their mean-square level: then the estimate is exact
        s = s.copy()
        s[k:] = math.sqrt((s[k:] ** 2).mean()) if k < total else 0.0
    S = torch.from_numpy(s[:k]).float()
    residual = torch.tensor((s[k:] ** 2).sum(), dtype=torch.float32)
    est = effective_rank(S, residual, total).item()
    kept = effective_rank(S).item()
    exact = _np_erank(s)
    assert kept == pytest.approx(_np_erank(s[:k]), rel=1e-5)
    assert est >= kept * (1 - 1e-5)
    assert est >= exact * (1 - 1e-5)
    assert est <= total * (1 + 1e-5)
    if flat_tail:
        assert est == pytest.approx(exact, rel=1e-5)
    assert effective_rank(S, torch.tensor(junk), k).item() == kept
    assert effective_rank(S, torch.tensor(-junk), total).item() == kept


# --------------------------------------------------------------------------- spectrum: alignment


def _vectors(shape: tuple[int, ...]) -> st.SearchStrategy[Tensor]:
    """Float32 vectors of one scale (1e-6 to 1e6) with random, possibly zero, entries."""
    return st.builds(
        lambda seed, scale, zero_share: torch.where(
            torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < zero_share,
            0.0,
            scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)),
        ),
        st.integers(0, 2**30),
        st.sampled_from([1e-6, 1.0, 1e6]),
        st.sampled_from([0.0, 0.5, 1.0]),
    )


@PROPS
@given(data=st.data(), m=st.integers(1, 9), b=st.integers(1, 3), dtype=st.sampled_from(ALL_DTYPES))
def test_abs_cosine_and_base_alignment(data: st.DataObject, m: int, b: int, dtype: torch.dtype) -> None:
    """abs_cosine = |<u, v>| / (|u| |v|) (numpy float64), symmetric, in [0, 1], 0 for a zero vector,
    1 for a vector and its scaled copy; base_alignment = |U0ᵀu|² / |u|² in [0, 1], 1 inside the
    span, 0 orthogonal to it and for u = 0; both broadcast a single vector over a batch."""
    top = 1.0 if dtype == torch.float16 else 1e6
    u = (data.draw(_vectors((b, m))) * top / 1e6).to(dtype)
    v = (data.draw(_vectors((m,))) * top / 1e6).to(dtype)
    u64, v64 = _np(u), _np(v)
    norms = np.linalg.norm(u64, axis=-1) * np.linalg.norm(v64)
    expected = np.where(norms > 0, np.abs(u64 @ v64) / np.where(norms > 0, norms, 1), 0)
    cos = abs_cosine(u, v)
    assert cos.shape == (b,) and torch.equal(cos, abs_cosine(v, u))
    np.testing.assert_allclose(_np(cos), expected, rtol=1e-5, atol=1e-6)
    assert ((cos >= 0) & (cos <= 1)).all()
    assert np.allclose(_np(abs_cosine(u, -3 * u))[np.linalg.norm(u64, axis=-1) > 0], 1, atol=1e-5)
    assert (_np(cos)[norms == 0] == 0).all()

    K = data.draw(st.integers(1, m))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    Q = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=gen)).Q
    U0 = Q[:, :K].to(dtype)
    share = base_alignment(U0, u)
    U0_64 = _np(U0)
    norm_sq = (u64**2).sum(-1)
    expected = np.where(norm_sq > 0, ((u64 @ U0_64) ** 2).sum(-1) / np.where(norm_sq > 0, norm_sq, 1), 0)
    # clipped as documented: a U0 rounded to bf16/fp16 is orthonormal only to ~1e-3, so the ratio may pass 1
    np.testing.assert_allclose(_np(share), np.clip(expected, 0, 1), rtol=1e-5, atol=1e-6)
    assert ((share >= 0) & (share <= 1)).all()
    inside, outside = Q[:, :K] @ torch.ones(K, dtype=F64), Q[:, K:] @ torch.ones(m - K, dtype=F64)
    assert base_alignment(Q[:, :K], inside).item() == pytest.approx(1, abs=1e-12)
    assert base_alignment(Q[:, :K], outside).item() == pytest.approx(0, abs=1e-12)
    assert base_alignment(U0, torch.zeros(m, dtype=dtype)).item() == 0


@st.composite
def bases(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q, U1, U2)``: a random orthogonal ``(m, m)`` Q and two orthonormal bases built from it
    (nested, disjoint, random, or spread evenly over each other), float64."""
    m = draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    Q = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=gen)).Q
    k1, k2 = draw(st.integers(1, m)), draw(st.integers(1, m))
    relation = draw(st.sampled_from(["nested", "disjoint", "random", "spread"]))
    U1 = Q[:, :k1]
    if relation == "spread":  # U1 spread evenly over Q's columns (DCT-II): small cosines, much energy in U2
        i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        dct = np.sqrt(2 / m) * np.cos(np.pi * (i + 0.5) * j / m)
        dct[:, 0] /= np.sqrt(2)
        U1, U2 = Q @ torch.from_numpy(dct[:, :k1]), Q[:, :k2]
    elif relation == "nested":  # a rotated basis of the larger of the two spans
        U2 = Q[:, :k2] @ torch.linalg.qr(torch.randn(k2, k2, dtype=F64, generator=gen)).Q
    elif relation == "disjoint" and k1 < m:
        U2 = Q[:, k1 : k1 + k2]
    else:
        U2 = torch.linalg.qr(torch.randn(m, k2, dtype=F64, generator=gen)).Q
    return Q, U1, U2


@PROPS
@given(b=bases(), dtype=st.sampled_from((torch.float32, F64)))
def test_subspace_overlap(b: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype) -> None:
    """= |U1ᵀU2|²_F / min(k1, k2) (numpy), symmetric, in [0, 1]: 1 when one span contains the
    other, 0 for orthogonal spans."""
    _, U1, U2 = b
    k1, k2 = U1.shape[1], U2.shape[1]
    value = subspace_overlap(U1.to(dtype), U2.to(dtype)).item()
    expected = float(((_np(U1).T @ _np(U2)) ** 2).sum() / min(k1, k2))
    assert value == pytest.approx(expected, abs=1e-6)
    assert value == pytest.approx(subspace_overlap(U2.to(dtype), U1.to(dtype)).item(), abs=1e-6)
    assert 0 <= value <= 1
    if torch.linalg.matrix_rank(torch.cat([U1, U2], 1)) == max(k1, k2):  # nested spans
        assert value == pytest.approx(1, abs=1e-5)
    if (U1.mT @ U2).abs().max() < 1e-12:
        assert value == pytest.approx(0, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    b=bases(),
    threshold=st.integers(5, 100).map(lambda i: i / 100),  # a grid: floats() clusters at the ends
    top=st.integers(1, 12),
    dtype=st.sampled_from((torch.float32, F64, torch.bfloat16)),
)
def test_intruder_count(b: tuple[Tensor, Tensor, Tensor], threshold: float, top: int, dtype: torch.dtype) -> None:
    """= #{j < top: max_i |<y_j, x_i>| < threshold} (numpy; counts within round-off of the threshold
    may go either way), int64 in [0, min(top, k)]; truncated <= untruncated, and equal when U_0
    spans the whole space; 0 when U_t's columns are among U_0's."""
    Q, U_t, U_0 = b
    k = U_t.shape[1]
    U_t, U_0 = U_t.to(dtype), U_0.to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16 rounding of the vectors
    proj = np.abs(_np(U_t)[:, :top].T @ _np(U_0)).max(-1)
    outside = (_np(U_t)[:, :top] ** 2).sum(0) - ((_np(U_t)[:, :top].T @ _np(U_0)) ** 2).sum(-1)
    for truncated in (False, True):
        count = intruder_count(U_t, U_0, threshold, top, truncated=truncated)
        assert count.dtype == torch.int64 and count.shape == ()

        def oracle(margin: float, truncated: bool = truncated) -> int:
            new = proj < threshold + margin
            return int((new & (outside < threshold**2 + margin) if truncated else new).sum())

        assert oracle(-tol) <= count.item() <= oracle(tol)
        assert 0 <= count.item() <= min(top, k)
    assert intruder_count(U_t, U_0, threshold, top, truncated=True) <= intruder_count(U_t, U_0, threshold, top)
    full = Q.to(dtype)
    assert intruder_count(U_t, full, threshold, top, truncated=True) == intruder_count(U_t, full, threshold, top)
    if threshold < 1 - tol:
        assert intruder_count(U_t, U_t, threshold, top).item() == 0


@PROPS
@given(
    data=st.data(),
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    dtype=st.sampled_from(ALL_DTYPES),
    eta=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
)
def test_sparsity(data: st.DataObject, m: int, n: int, dtype: torch.dtype, eta: float) -> None:
    """= share of |dW| <= eta max(|W_t|, |W_0|) (numpy float64; entries within round-off of the
    bound may go either way), in [0, 1], non-decreasing in eta, 1 for dW = 0."""
    top = 1e-3 if dtype == torch.float16 else 1.0  # fp16 overflows at 65504
    W_0 = (data.draw(_vectors((2, m, n))) * top).to(dtype)
    step = data.draw(_vectors((2, m, n))) * top * data.draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0]))
    W_t = (W_0.float() + step).to(dtype)
    delta = W_t.float() - W_0.float()
    value = sparsity(delta, W_t, W_0, eta)
    assert value.shape == (2,) and value.dtype == (F64 if dtype == F64 else torch.float32)
    d, bound = np.abs(_np(delta)), eta * np.maximum(np.abs(_np(W_t)), np.abs(_np(W_0)))
    lo, hi = ((d <= bound * (1 + r)).mean((-2, -1)) for r in (-1e-6, 1e-6))
    assert ((lo - 1e-7 <= _np(value)) & (_np(value) <= hi + 1e-7)).all()
    assert ((value >= 0) & (value <= 1)).all()
    assert (sparsity(delta, W_t, W_0, 2 * eta + 1e-3) >= value).all()
    assert (sparsity(torch.zeros_like(delta), W_t, W_0, eta) == 1).all()


@PROPS
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    bshape=st.lists(st.integers(1, 3), max_size=2),
    dtype=st.sampled_from(ALL_DTYPES),
    r=st.integers(1, 4),
)
def test_zero_input_gives_the_documented_values_quietly(
    shape: tuple[int, int], bshape: list[int], dtype: torch.dtype, r: int
) -> None:
    """Step 0 / a frozen layer, in any shape, batch and dtype: the module table's values exactly,
    zero singular values, finite vectors, no fit, and no warning."""
    m, n = shape
    Z = torch.zeros(*bshape, m, n, dtype=dtype)
    W = torch.ones(*bshape, m, n, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fro = frobenius_sq(Z)
        S = full_singular_values(Z)
        U, S_r, V = randomized_svd(Z, r)
        Ul, S_l, Vl = lora_svd(torch.zeros(*bshape, m, r, dtype=dtype), torch.ones(r, n, dtype=dtype), 2.0)
        table = {
            "frobenius_sq": (fro, 0.0),
            "energy_share": (energy_share(S, fro, 1), 0.0),
            "stable_rank": (stable_rank(S, fro), 0.0),
            "effective_rank": (effective_rank(S), 0.0),
            "effective_rank_tail": (effective_rank(S_r, fro - S_r.square().sum(-1), min(m, n)), 0.0),
            "spectral_gap": (spectral_gap(S), 1.0),
            "sparsity": (sparsity(Z, W, W), 1.0),
            "abs_cosine": (abs_cosine(Z[..., 0], W[..., 0]), 0.0),
            "base_alignment": (base_alignment(torch.eye(m)[:, :1], Z[..., 0]), 0.0),
        }
        fit = fit_power_law(S.square())
    for name, (value, expected) in table.items():
        assert value.shape == tuple(bshape), name
        assert (value == expected).all(), name
    for t in (S, S_r, S_l):
        assert (t == 0).all()
    for t in (U, V, Ul, Vl):
        assert t.isfinite().all()
    assert fit.alpha.isnan().all() and (fit.n_tail == 0).all() and not fit.reliable.any()


# --------------------------------------------------------------------------- fit_power_law

JUNK = (0.0, -1.0, math.nan, math.inf, -math.inf)


def _np_candidates(values: np.ndarray, min_tail: int = 1, q: float | None = None) -> list[tuple[float, ...]]:
    """Every admissible x_min of a continuous power-law fit, as ``(D, xmin, alpha, n_tail)``, by the
    module's definition computed directly: the finite positive values; candidates the distinct ones
    but the two largest (none when that leaves fewer than two); alpha = 1 + n / sum ln(x / xmin);
    D = max over distinct tail values u of |1 - (u/xmin)^(1-alpha) - share of the tail below u|."""
    x = np.sort(values[np.isfinite(values) & (values > 0)])
    distinct = np.unique(x)[:-2]
    if len(distinct) < 2:
        return []
    out = []
    for c in distinct:
        tail = x[x >= c]
        below = len(x) - len(tail)
        if len(tail) < min_tail or (q is not None and below > math.floor(q * (len(x) - 1) + 1e-9)):
            continue
        alpha = 1 + len(tail) / np.log(tail / c).sum()
        u = np.unique(tail)
        D = np.abs(1 - (u / c) ** (1 - alpha) - np.searchsorted(tail, u, side="left") / len(tail)).max()
        out.append((float(D), float(c), float(alpha), len(tail)))
    return out


def _check_fit(fit, i: int, values: np.ndarray, min_tail: int = 1, q: float | None = None) -> None:
    """Row ``i`` of ``fit`` is the oracle's best candidate (or one within 1e-9 of its D: round-off
    may pick either of two near-tied candidates), with that candidate's alpha, D and tail."""
    cands = _np_candidates(values, min_tail, q)
    alpha, xmin, ks, n_tail = (t.reshape(-1)[i].item() for t in (fit.alpha, fit.xmin, fit.ks, fit.n_tail))
    if not cands:
        assert math.isnan(alpha) and math.isnan(xmin) and math.isnan(ks) and n_tail == 0
        assert not fit.reliable.reshape(-1)[i]
        return
    best = min(c[0] for c in cands)
    chosen = [c for c in cands if np.float32(c[1]) == xmin]
    assert chosen, f"xmin={xmin} is not a candidate"
    dist, c, a, n = chosen[0]
    assert dist <= best + 1e-9
    assert alpha == pytest.approx(a, rel=1e-6) and alpha > 1
    assert ks == pytest.approx(dist, abs=1e-6) and 0 <= ks <= 1
    x = values[np.isfinite(values) & (values > 0)]
    assert n_tail == n == (x >= c).sum() <= len(x) and n_tail >= min_tail


def _eigs(dtype: torch.dtype = torch.float32) -> st.SearchStrategy[np.ndarray]:
    """Eigenvalue lists as the dtype holds them (float64 array): arbitrary floats 1e-6..1e6, small
    integers (ties), Pareto samples, and junk (0, negative, NaN, inf) mixed in."""
    value = st.one_of(st.floats(1e-6, 1e6), st.sampled_from([1.0, 2.0, 3.0, 4.0, 8.0]), st.sampled_from(JUNK))
    mixed = st.lists(value, max_size=40).map(np.array)
    few = st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=5, unique=True).flatmap(  # ties, 1-5 distinct
        lambda pool: st.lists(st.sampled_from(pool + list(JUNK)), max_size=20).map(np.array)
    )
    pareto = st.builds(
        lambda a, n, seed: (1 - np.random.default_rng(seed).random(n)) ** (-1 / (a - 1)),
        st.floats(1.5, 6.0),
        st.integers(1, 60),
        st.integers(0, 2**31 - 1),
    )
    return st.one_of(mixed, few, pareto).map(lambda v: torch.tensor(v, dtype=F64).to(dtype).double().numpy())


@PROPS
@given(
    values=st.sampled_from([torch.float32, F64, torch.bfloat16]).flatmap(lambda d: st.tuples(st.just(d), _eigs(d))),
    min_tail=st.sampled_from([1, 1, 3, 10]),
    q=st.sampled_from([None, None, 0.0, 0.5, 1.0]),
)
def test_fit_power_law_matches_the_direct_search(
    values: tuple[torch.dtype, np.ndarray], min_tail: int, q: float | None
) -> None:
    """Against the direct numpy search (module definition): xmin is an input value and the best
    candidate, alpha > 1 is that candidate's MLE, D its KS distance, n_tail <= n its tail; no fit
    exactly when no candidate is admissible (by default: fewer than 4 distinct positive values)."""
    dtype, x = values
    fit = fit_power_law(torch.from_numpy(x).to(dtype), min_tail=min_tail, xmin_max_quantile=q)
    assert fit.alpha.shape == () and fit.alpha.dtype == torch.float32 and fit.n_tail.dtype == torch.int64
    _check_fit(fit, 0, x, min_tail, q)
    if min_tail == 1 and q is None:
        distinct = len(np.unique(x[np.isfinite(x) & (x > 0)]))
        assert fit.alpha.isfinite().item() == (distinct >= 4)
    if fit.alpha.isfinite():
        assert fit.xmin.item() in x.astype(np.float32)


@PROPS
@given(
    x=_eigs(),
    power=st.integers(-20, 20),
    factor=st.floats(1e-3, 1e3),
    junk=st.lists(st.sampled_from(JUNK), max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_fit_power_law_invariances(x: np.ndarray, power: int, factor: float, junk: list[float], seed: int) -> None:
    """Scaling every eigenvalue by c keeps alpha, D and n_tail and scales xmin (exactly for c = 2^j
    on float32, to float64 rounding for any c); order and junk (0, negative, NaN, inf) are ignored.
    Round-off may switch between two candidates whose D are within 1e-9, so a different xmin is
    accepted only for such a near tie."""
    base = fit_power_law(torch.from_numpy(x).float())
    for scaled, c, dtype in ((x * 2.0**power, 2.0**power, torch.float32), (x * factor, factor, F64)):
        fit = fit_power_law(torch.from_numpy(scaled).to(dtype))
        if not base.alpha.isfinite():
            assert fit.alpha.isnan().item()
            continue
        if fit.xmin.item() == pytest.approx(c * base.xmin.item(), rel=1e-6):
            assert fit.alpha.item() == pytest.approx(base.alpha.item(), rel=1e-5)
            assert fit.ks.item() == pytest.approx(base.ks.item(), abs=1e-6)
            assert fit.n_tail.item() == base.n_tail.item()
        else:
            assert _near_tie(x)
    shuffled = np.random.default_rng(seed).permutation(np.concatenate([x, junk]))
    fit = fit_power_law(torch.from_numpy(shuffled).float())
    if not base.alpha.isfinite():
        assert fit.alpha.isnan().item()
    elif fit.xmin.item() == base.xmin.item():
        assert fit.alpha.item() == pytest.approx(base.alpha.item(), rel=1e-6)
        assert fit.ks.item() == pytest.approx(base.ks.item(), abs=1e-7) and fit.n_tail.item() == base.n_tail.item()
    else:
        assert _near_tie(x)


def _near_tie(x: np.ndarray) -> bool:
    """Whether the two best candidates' D are within 1e-9 (round-off may pick either)."""
    D = sorted(c[0] for c in _np_candidates(x))
    return len(D) >= 2 and D[1] - D[0] <= 1e-9


@PROPS
@given(
    rows=st.lists(_eigs(), min_size=1, max_size=4),
    total_extra=st.integers(0, 5),
    edge=st.integers(0, 3),
    max_ks=st.sampled_from([0.0, 0.1, 1.0]),
    min_tail=st.sampled_from([1, 5]),
)
def test_fit_power_law_batches_and_flags(
    rows: list[np.ndarray], total_extra: int, edge: int, max_ks: float, min_tail: int
) -> None:
    """A batch of mixed spectra (NaN-padded to one length, as a 2-D or 3-D batch) fits every row as
    the direct search does; covered = whole spectrum, or a fit whose xmin has >= edge kept positive
    values below it; reliable = covered and fitted and n_tail >= min_tail and D <= max_ks."""
    k = max(len(r) for r in rows)
    padded = np.stack([np.pad(r, (0, k - len(r)), constant_values=np.nan) for r in rows])
    eigs = torch.from_numpy(padded).float()
    if len(rows) == 4:
        eigs = eigs.reshape(2, 2, k)
    total = k + total_extra
    fit = fit_power_law(eigs, total=total, edge=edge, max_ks=max_ks, min_tail=min_tail)
    assert fit.alpha.shape == eigs.shape[:-1]
    for i, x in enumerate(padded):
        _check_fit(fit, i, x, min_tail)
        found = math.isfinite(fit.alpha.reshape(-1)[i].item())
        pos = x[np.isfinite(x) & (x > 0)]
        below = int((pos < fit.xmin.reshape(-1)[i].item()).sum()) if found else 0
        covered = total == k or (found and below >= edge)
        assert fit.covered.reshape(-1)[i].item() == covered
        ks, n_tail = fit.ks.reshape(-1)[i].item(), fit.n_tail.reshape(-1)[i].item()
        assert fit.reliable.reshape(-1)[i].item() == (covered and found and n_tail >= min_tail and ks <= max_ks)
