"""Tests of spectral_monitor.functional.rsvd against exact float64 SVDs of matrices with known spectra."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spectral_monitor.functional.rsvd import lora_svd, randomized_svd, sketch_left_vectors

F64 = torch.float64


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=_gen(seed))).Q


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float64 ``U diag(s) Vᵀ`` with random orthonormal U (m, k), V (n, k)."""
    k = s.numel()
    return (_orthonormal(m, k, seed) * s.to(F64)) @ _orthonormal(n, k, seed + 1).mT


def _spike_plus_noise(m: int, n: int, spike: float, seed: int = 0) -> torch.Tensor:
    """Rank-1 spike of size ``spike`` on Gaussian noise whose top singular value is ~1 + sqrt(m/n)."""
    noise = torch.randn(m, n, dtype=F64, generator=_gen(seed)) / n**0.5
    u, v = _orthonormal(m, 1, seed + 1), _orthonormal(n, 1, seed + 2)
    return noise + spike * u @ v.mT


FAST = 0.8 ** torch.arange(384, dtype=F64)  # sigma_16 / sigma_17 = 1.25
SLOW = torch.arange(1, 385, dtype=F64) ** -0.5  # sigma_1/sigma_2 = 1.41, then flat


def _rel_err(S: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (S.to(F64) - exact[..., : S.shape[-1]]).abs() / exact[..., : S.shape[-1]]


def _col_cos(U: torch.Tensor, U_exact: torch.Tensor) -> torch.Tensor:
    """|cos| between matching columns (sign-free)."""
    k = U.shape[-1]
    return (U.to(F64) * U_exact[..., :k]).sum(-2).abs()


@pytest.mark.parametrize(("m", "n"), [(512, 384), (384, 512)])
def test_fast_decay_matches_exact_svd(m: int, n: int) -> None:
    A = _with_spectrum(m, n, FAST)
    U0, S0, Vh0 = torch.linalg.svd(A, full_matrices=False)
    U, S, V = randomized_svd(A.float(), 16)
    assert U.shape == (m, 16) and S.shape == (16,) and V.shape == (n, 16)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert _rel_err(S, S0).max() < 1e-5  # measured ~5e-7
    assert _col_cos(U, U0).min() > 1 - 1e-5
    assert _col_cos(V, Vh0.mT).min() > 1 - 1e-5
    assert torch.all(S[:-1] >= S[1:])
    torch.testing.assert_close(U.mT @ U, torch.eye(16), atol=1e-5, rtol=0)


def test_power_iterations_needed_for_a_spike_in_noise() -> None:
    """sigma_1 / sigma_2 ~ 3: q = 0 is unusable (18% error on sigma_1), q = 2 is accurate."""
    A = _spike_plus_noise(512, 1024, spike=6.0)
    U0, S0, _ = torch.linalg.svd(A, full_matrices=False)
    assert 2.5 < S0[0] / S0[1] < 4.0
    errs, coss = [], []
    for q in (0, 2):
        U, S, _ = randomized_svd(A.float(), 8, niter=q)
        errs.append(_rel_err(S, S0)[0].item())
        coss.append(_col_cos(U, U0)[0].item())
    assert errs[0] > 0.05 and coss[0] < 0.95  # measured 0.18, 0.81
    assert errs[1] < 1e-3 and coss[1] > 0.999  # measured 1e-6, 0.999999


def test_slow_decay_accuracy_improves_with_niter() -> None:
    A = _with_spectrum(384, 768, SLOW)
    S0 = torch.linalg.svdvals(A)
    errs = [_rel_err(randomized_svd(A.float(), 16, niter=q)[1], S0).max().item() for q in (0, 1, 2, 4)]
    assert errs == sorted(errs, reverse=True)  # measured 0.43, 0.09, 0.02, 1.3e-3
    assert errs[2] < 0.05 and errs[0] > 0.2


def test_base_equals_materialised_difference() -> None:
    A = torch.randn(300, 200, generator=_gen(1))
    base = A - _with_spectrum(300, 200, FAST[:200], seed=3).float()
    U1, S1, V1 = randomized_svd(A, 10, base=base)
    U2, S2, V2 = randomized_svd(A - base, 10)
    torch.testing.assert_close(S1, S2, rtol=1e-5, atol=1e-6)
    assert _col_cos(U1, U2.double()).min() > 1 - 1e-5
    assert _col_cos(V1, V2.double()).min() > 1 - 1e-5


class _LargestOutput(TorchDispatchMode):
    """Records the largest fresh allocation (in elements) made by any aten op; views do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_float32_base_allocates_nothing_matrix_sized() -> None:
    m, n = 400, 300
    A, base = torch.randn(m, n, generator=_gen(0)), torch.randn(m, n, generator=_gen(1))
    with _LargestOutput() as probe:
        randomized_svd(A, 8, base=base)
    assert probe.largest < m * n // 4  # only m x l and n x l blocks
    with _LargestOutput() as control:
        randomized_svd(A - base, 8)
    assert control.largest == m * n  # the probe does see a materialised difference


def test_low_precision_input_folds_base_into_the_upcast_copy() -> None:
    m, n = 400, 300
    A, base = torch.randn(m, n, generator=_gen(0)), torch.randn(m, n, generator=_gen(1))
    with _LargestOutput() as probe:
        _, S, _ = randomized_svd(A.bfloat16(), 8, base=base.bfloat16())
    assert probe.largest == m * n  # the one float32 copy of A, nothing more
    _, S_ref, _ = randomized_svd(A.bfloat16().float() - base.bfloat16().float(), 8)
    torch.testing.assert_close(S, S_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(dtype: torch.dtype) -> None:
    A = _with_spectrum(256, 512, FAST[:256]).float()
    U32, S32, V32 = randomized_svd(A, 8)
    U, S, V = randomized_svd(A.to(dtype), 8)
    assert S.dtype == U.dtype == V.dtype == torch.float32
    torch.testing.assert_close(S, S32, rtol=1e-2, atol=0)  # bf16 rounding of the entries: ~4e-3
    assert _col_cos(U, U32.double()).min() > 0.99
    assert _col_cos(V, V32.double()).min() > 0.99
    base = torch.randn(256, 512, generator=_gen(5)).to(dtype)
    _, S_base, _ = randomized_svd(A.to(dtype), 8, base=base)
    _, S_ref, _ = randomized_svd(A.to(dtype).float() - base.float(), 8)
    torch.testing.assert_close(S_base, S_ref)


def test_float64_input_stays_float64() -> None:
    A = _with_spectrum(200, 100, FAST[:100])
    U, S, V = randomized_svd(A, 8, niter=4)
    assert S.dtype == U.dtype == V.dtype == F64
    assert _rel_err(S, torch.linalg.svdvals(A)).max() < 1e-12  # float32 gives ~5e-7


def test_batched_equals_per_matrix() -> None:
    mats = torch.stack(
        [
            _with_spectrum(200, 300, FAST[:200], seed=0),
            _with_spectrum(200, 300, SLOW[:200], seed=10),
            _spike_plus_noise(200, 300, 5.0, seed=20),
        ]
    ).float()
    base = torch.randn(200, 300, generator=_gen(7))  # one base broadcast over the batch
    U, S, V = randomized_svd(mats + base, 12, base=base)
    assert U.shape == (3, 200, 12) and S.shape == (3, 12) and V.shape == (3, 300, 12)
    for i in range(3):
        Ui, Si, Vi = randomized_svd(mats[i], 12)
        torch.testing.assert_close(S[i], Si, rtol=1e-4, atol=1e-5)
        # a shared test matrix makes every member's result independent of its batch-mates
        assert _col_cos(U[i, :, :4], Ui.double()).min() > 1 - 1e-4
        assert _col_cos(V[i, :, :4], Vi.double()).min() > 1 - 1e-4


def test_rank_is_clamped_and_then_exact() -> None:
    A = torch.randn(20, 50, generator=_gen(0), dtype=F64)
    U, S, V = randomized_svd(A, 100)
    assert U.shape == (20, 20) and S.shape == (20,) and V.shape == (50, 20)
    torch.testing.assert_close(S, torch.linalg.svdvals(A))
    torch.testing.assert_close(U @ torch.diag(S) @ V.mT, A)


@pytest.mark.parametrize("shape", [(1, 37), (37, 1)])
def test_vectors(shape: tuple[int, int]) -> None:
    A = torch.randn(shape, generator=_gen(0))
    U, S, V = randomized_svd(A, 4)
    assert S.shape == (1,)
    torch.testing.assert_close(S[0], A.norm())
    torch.testing.assert_close(U @ torch.diag(S) @ V.mT, A)


def test_zero_matrix_gives_zeros() -> None:
    U, S, V = randomized_svd(torch.zeros(2, 64, 48), 8, init=torch.zeros(2, 48, 8))
    assert torch.equal(S, torch.zeros(2, 8))
    assert U.isfinite().all() and V.isfinite().all()


def test_warm_start_from_exact_subspace_needs_no_iterations() -> None:
    A = _with_spectrum(384, 768, SLOW)
    _, S0, Vh0 = torch.linalg.svd(A, full_matrices=False)
    cold = randomized_svd(A.float(), 16, niter=0)[1]
    warm = randomized_svd(A.float(), 16, niter=0, init=Vh0[:16].mT.float())[1]
    assert _rel_err(cold, S0).max() > 0.2  # measured 0.43
    assert _rel_err(warm, S0).max() < 1e-5  # measured 8e-7


@pytest.mark.parametrize("spectrum", ["slow", "spike"])
def test_warm_start_from_previous_measurement_is_more_accurate(spectrum: str) -> None:
    """The previous measurement's V (of a slightly different matrix) beats a cold start."""
    m, n, k = 384, 768, 16
    if spectrum == "slow":
        prev = _with_spectrum(m, n, SLOW, seed=0)
    else:
        prev = _spike_plus_noise(m, n, 4.0, seed=0)
    A = prev + 0.02 * _spike_plus_noise(m, n, 0.0, seed=99)  # the update moved a little
    S0 = torch.linalg.svdvals(A)
    _, _, V_prev = randomized_svd(prev.float(), k, niter=2)
    for q in (0, 1, 2):
        cold = _rel_err(randomized_svd(A.float(), k, niter=q)[1], S0)
        warm = _rel_err(randomized_svd(A.float(), k, niter=q, init=V_prev)[1], S0)
        assert warm.max() <= cold.max() and warm[0] <= cold[0] + 1e-6


def test_init_wider_than_sketch_and_batched_init() -> None:
    A = torch.stack([_with_spectrum(60, 40, FAST[:40], seed=s) for s in (0, 5)]).float()
    _, S0, Vh0 = torch.linalg.svd(A.double(), full_matrices=False)
    _, S, _ = randomized_svd(A, 4, oversample=2, niter=0, init=Vh0.mT.float())  # r0 = 40 > l = 6
    assert S.shape == (2, 4)
    assert _rel_err(S, S0).max() < 1e-5


def test_global_rng_untouched_and_deterministic() -> None:
    A = torch.randn(100, 80, generator=_gen(0))
    state = torch.get_rng_state()
    first = randomized_svd(A, 5, niter=0)
    second = randomized_svd(A, 5, niter=0, init=torch.randn(80, 2, generator=_gen(1)))
    assert torch.equal(torch.get_rng_state(), state)
    again = randomized_svd(A, 5, niter=0)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert second[1].shape == (5,)


def test_generator_controls_the_sketch() -> None:
    A = _with_spectrum(200, 300, SLOW[:200]).float()  # q = 0 on a slow decay: results depend on Omega
    a = randomized_svd(A, 8, niter=0, generator=_gen(1))[1]
    b = randomized_svd(A, 8, niter=0, generator=_gen(1))[1]
    c = randomized_svd(A, 8, niter=0, generator=_gen(2))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_arguments_raise_with_the_bad_value() -> None:
    A = torch.randn(10, 8)
    with pytest.raises(ValueError, match="rank=0"):
        randomized_svd(A, 0)
    with pytest.raises(ValueError, match="niter=-1"):
        randomized_svd(A, 2, niter=-1)
    with pytest.raises(ValueError, match="oversample=-1"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match=r"\(8, 10\)"):
        randomized_svd(A, 2, base=torch.zeros(8, 10))
    with pytest.raises(ValueError, match="broadcast"):
        randomized_svd(A, 2, base=torch.zeros(3, 10, 8))
    with pytest.raises(ValueError, match="init"):
        randomized_svd(A, 2, init=torch.zeros(10, 2))
    with pytest.raises(TypeError, match="int64"):
        randomized_svd(torch.ones(10, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="shape"):
        randomized_svd(torch.ones(10), 2)


# --------------------------------------------------------------------------- lora_svd


@pytest.mark.parametrize(("m", "n", "r", "scale"), [(96, 64, 8, 2.0), (64, 96, 4, -0.5), (5, 40, 8, 1.0)])
def test_lora_svd_matches_dense(m: int, n: int, r: int, scale: float) -> None:
    B = torch.randn(m, r, generator=_gen(0))
    A = torch.randn(r, n, generator=_gen(1))
    dense = scale * B.double() @ A.double()
    U0, S0, Vh0 = torch.linalg.svd(dense, full_matrices=False)
    U, S, V = lora_svd(B, A, scale)
    k = min(m, n, r)
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert _rel_err(S, S0).max() < 1e-5
    assert _col_cos(U, U0).min() > 1 - 1e-5
    assert _col_cos(V, Vh0.mT).min() > 1 - 1e-5
    torch.testing.assert_close((U * S) @ V.mT, dense.float(), rtol=1e-4, atol=1e-4)


def test_lora_svd_batched_low_precision_and_zero() -> None:
    B = torch.randn(3, 50, 4, generator=_gen(0)).bfloat16()
    A = torch.randn(3, 4, 70, generator=_gen(1)).bfloat16()
    U, S, V = lora_svd(B, A, 0.25)
    assert S.dtype == torch.float32 and S.shape == (3, 4)
    for i in range(3):
        exact = torch.linalg.svdvals(0.25 * B[i].double() @ A[i].double())[:4]
        assert _rel_err(S[i], exact).max() < 1e-5
    # PEFT initialises B = 0: the update at step 0 is exactly zero
    U, S, V = lora_svd(torch.zeros(50, 4), A[0], 2.0)
    assert torch.equal(S, torch.zeros(4)) and U.isfinite().all() and V.isfinite().all()


def test_lora_svd_shape_error() -> None:
    with pytest.raises(ValueError, match=r"B.shape=\(5, 3\)"):
        lora_svd(torch.zeros(5, 3), torch.zeros(4, 6), 1.0)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    A = _with_spectrum(512, 1024, FAST[:512]).float()
    base = torch.randn(512, 1024, generator=_gen(3))
    cuda_state = torch.cuda.get_rng_state()
    for kwargs in ({}, {"generator": _gen(4)}):  # default CUDA generator; CPU generator moved over
        U_c, S_c, V_c = randomized_svd((A + base).cuda(), 16, base=base.cuda(), **kwargs)
        U, S, V = randomized_svd(A, 16)
        assert S_c.device.type == "cuda"
        torch.testing.assert_close(S_c.cpu(), S, rtol=1e-4, atol=1e-6)
        assert _col_cos(U_c.cpu(), U.double()).min() > 1 - 1e-4
        assert _col_cos(V_c.cpu(), V.double()).min() > 1 - 1e-4
    _, S_bf, _ = randomized_svd(A.cuda().bfloat16(), 8)
    torch.testing.assert_close(S_bf.cpu(), S[:8], rtol=1e-2, atol=0)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    B, A_l = torch.randn(300, 8, generator=_gen(5)), torch.randn(8, 200, generator=_gen(6))
    torch.testing.assert_close(lora_svd(B.cuda(), A_l.cuda(), 2.0)[1].cpu(), lora_svd(B, A_l, 2.0)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_rows_matches_the_unblocked_result(dtype: torch.dtype) -> None:
    """Row-blocked products (for layers over the memory budget) give the same decomposition."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(300, 120, generator=gen).to(dtype)
    spike = 5.0 * torch.randn(300, 1, generator=gen) @ torch.randn(1, 120, generator=gen) / 100
    A = (base.float() + spike + 0.01 * torch.randn(300, 120, generator=gen)).to(dtype)
    ref = randomized_svd(A, 8, base=base, generator=torch.Generator().manual_seed(3))
    out = randomized_svd(A, 8, base=base, block_rows=64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-5)
    assert (out[0][:, 0] @ ref[0][:, 0]).abs().item() == pytest.approx(1.0, abs=1e-4)
    exact = torch.linalg.svdvals(A.double() - base.double())[0]  # the planted spike
    assert out[1][0].item() == pytest.approx(exact.item(), rel=1e-3)
    with pytest.raises(ValueError, match="block_rows"):
        randomized_svd(A, 8, block_rows=0)


@pytest.mark.parametrize(("m", "n"), [(768, 1024), (1024, 768)])
def test_bf16_sketch_matches_the_exact_svd_of_the_rounded_matrix(m: int, n: int) -> None:
    """Products in bf16, QR/SVD in float32: against the exact SVD of bf16(A) the error is the
    algorithm's alone (measured <= 2.7e-4, the bf16 rounding of the projected B). The returned U is
    orthonormal to float32 precision: without re-orthonormalising the rounded basis before the
    Ritz step, UᵀU - I would be ~3e-4."""
    A = _with_spectrum(m, n, FAST[:64]).float()
    rounded = A.bfloat16()
    _, S0, Vh0 = torch.linalg.svd(rounded.double(), full_matrices=False)
    for inp in (A, rounded):  # a float32 input is rounded once inside
        U, S, V = randomized_svd(inp, 16, niter=2, sketch_dtype=torch.bfloat16)
        assert S.dtype == U.dtype == torch.float32
        assert _rel_err(S, S0).max() < 5e-4
        assert _col_cos(V, Vh0.mT)[:8].min() > 1 - 1e-4
        assert torch.allclose(U.mT @ U, torch.eye(16), atol=1e-5)


def test_sketch_left_vectors_exact_from_the_leading_right_subspace() -> None:
    """Ω spanning A's top-l right subspace (mixed, not orthonormal) gives A's top-k left vectors;
    works on transposed views and bf16 matrices; a NaN matrix gives finite output."""
    A = _with_spectrum(300, 200, FAST[:200])
    U0, _, Vh0 = torch.linalg.svd(A, full_matrices=False)
    mix = torch.randn(12, 12, dtype=F64, generator=_gen(7))
    start = (Vh0[:12].mT @ mix).float()  # same span, not orthonormal
    A32 = A.float()
    for mats in ([A32, A32.mT.contiguous().mT], [A32.bfloat16()]):
        U = sketch_left_vectors(mats, start.expand(len(mats), -1, -1), 8)
        assert U.shape == (len(mats), 300, 8) and U.dtype == torch.float32
        tol = 1e-5 if mats[0].dtype == torch.float32 else 1e-2
        assert _col_cos(U, U0).min() > 1 - tol
    bad = A32.clone()
    bad[0, 0] = float("nan")
    assert sketch_left_vectors([bad], start[None], 8).isfinite().all()


def test_sketch_left_vectors_is_a_restriction_when_the_start_misses() -> None:
    """With Ω away from the top subspace the vectors are those of A Ω: the top direction is missed."""
    A = _with_spectrum(300, 200, FAST[:200])
    U0, _, Vh0 = torch.linalg.svd(A, full_matrices=False)
    start = Vh0[20:32].mT.float()  # right vectors 21..32 only
    U = sketch_left_vectors([A.float()], start[None], 4)[0]
    assert _col_cos(U[:, :1], U0[:, 20:21]).item() > 1 - 1e-5  # the best A Ω holds is σ_21's
    assert (U.double().mT @ U0[:, :1]).abs().max().item() < 1e-4
