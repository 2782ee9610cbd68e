"""Tests of spectral_monitor.functional.spectrum: hand-computed cases, numpy and float64 oracles."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

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


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=_gen(seed))).Q


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    k = s.numel()
    return (_orthonormal(m, k, seed) * s.to(F64)) @ _orthonormal(n, k, seed + 1).mT


def _np_erank(s: np.ndarray) -> float:
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# --------------------------------------------------------------------------- norms and energies


def test_frobenius_sq_hand_cases() -> None:
    M = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert frobenius_sq(M).item() == 30.0
    batch = torch.stack([M, 2 * M, torch.zeros(2, 2)])
    torch.testing.assert_close(frobenius_sq(batch), torch.tensor([30.0, 120.0, 0.0]))
    out = frobenius_sq(M.bfloat16())
    assert out.dtype == torch.float32 and out.item() == 30.0
    assert frobenius_sq(M.double()).dtype == F64


def test_frobenius_sq_large_matrix_against_float64() -> None:
    M = torch.randn(1024, 1024, generator=_gen(0)) + 0.3  # an offset that trips naive float32 sums
    exact = M.double().square().sum()
    assert abs(frobenius_sq(M).double() - exact) / exact < 1e-6


def test_energy_share_and_stable_rank_of_diag_3_4() -> None:
    S, fro = torch.tensor([4.0, 3.0]), torch.tensor(25.0)  # M = diag(3, 4)
    assert energy_share(S, fro, 1).item() == pytest.approx(16 / 25)
    assert energy_share(S, fro).item() == pytest.approx(1.0)
    assert energy_share(S, fro, 0).item() == 0.0
    assert energy_share(S, fro, 5).item() == pytest.approx(1.0)  # k past the values: all of them
    assert stable_rank(S, fro).item() == pytest.approx(25 / 16)
    assert stable_rank(torch.ones(3, 1), torch.full((3,), 7.0)).tolist() == [7.0] * 3  # srank(I_7) = 7


def test_energy_share_is_clamped_and_zero_safe() -> None:
    # sigma_1^2 a few ulps above ||M||_F^2: round-off, clamped to 1
    assert energy_share(torch.tensor([1.0000001]), torch.tensor(1.0)).item() == 1.0
    out = energy_share(torch.zeros(2, 3), torch.zeros(2))
    assert out.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="k=-1"):
        energy_share(torch.ones(2), torch.tensor(2.0), -1)


def test_energy_and_stable_rank_against_numpy() -> None:
    M = np.random.default_rng(0).standard_normal((40, 60))
    s = np.linalg.svd(M, compute_uv=False)
    fro = float((M**2).sum())
    S_t, fro_t = torch.from_numpy(s), torch.tensor(fro, dtype=F64)
    assert energy_share(S_t, fro_t, 5).item() == pytest.approx((s[:5] ** 2).sum() / fro, rel=1e-12)
    assert stable_rank(S_t, fro_t).item() == pytest.approx(fro / s[0] ** 2, rel=1e-12)
    assert frobenius_sq(torch.from_numpy(M)).item() == pytest.approx(np.linalg.norm(M, "fro") ** 2)


# --------------------------------------------------------------------------- effective rank


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 4.0),
        ([1.0, 0.0, 0.0], 1.0),
        ([2.0, 1.0, 1.0], 2**1.5),  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
        ([3.0], 1.0),
        ([0.0, 0.0], 0.0),  # zero matrix: defined as 0
    ],
)
def test_effective_rank_hand_cases(s: list[float], expected: float) -> None:
    assert effective_rank(torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)


def test_effective_rank_against_numpy_batched() -> None:
    rng = np.random.default_rng(1)
    spectra = np.sort(rng.random((4, 30)) ** 3, axis=-1)[:, ::-1].copy()
    spectra[1, 20:] = 0.0
    out = effective_rank(torch.from_numpy(spectra))
    assert out.shape == (4,)
    for row, value in zip(spectra, out.tolist()):
        assert value == pytest.approx(_np_erank(row), rel=1e-12)


@functools.cache
def _spectra() -> dict[str, torch.Tensor]:
    g = _gen(0)
    noise = torch.randn(256, 1024, dtype=F64, generator=g) / 32
    u, v = _orthonormal(256, 1, 1), _orthonormal(1024, 1, 2)
    return {
        "marchenko_pastur_square": torch.linalg.svdvals(torch.randn(512, 512, dtype=F64, generator=g)),
        "marchenko_pastur_wide": torch.linalg.svdvals(noise),
        "power_law_0.5": torch.arange(1, 513, dtype=F64) ** -0.5,
        "spike_plus_noise": torch.linalg.svdvals(noise + 5 * u @ v.mT),
    }


@pytest.mark.parametrize("name", list(_spectra()))
@pytest.mark.parametrize("k", [8, 32])
def test_tail_estimate_beats_ignoring_the_residual(name: str, k: int) -> None:
    """Noise-like spectra (what RL updates look like): measured errors +2..+24% vs -87..-98%."""
    s = _spectra()[name]
    exact = effective_rank(s).item()
    residual = s.square().sum() - s[:k].square().sum()
    estimate = effective_rank(s[:k], residual, s.numel()).item()
    truncated = effective_rank(s[:k]).item()
    assert abs(estimate - exact) < abs(truncated - exact)
    assert abs(estimate - exact) / exact < 0.25


@pytest.mark.parametrize(
    "s",
    [
        torch.arange(1, 513, dtype=F64) ** -1.0,
        torch.arange(1, 513, dtype=F64) ** -2.0,
        0.8 ** torch.arange(512, dtype=F64),
        *_spectra().values(),
    ],
)
def test_truncated_and_tail_estimate_bracket_the_exact_value(s: torch.Tensor) -> None:
    """On fast-decaying spectra the flat tail overshoots (0.8^i, k = 8: 180 vs 12.2) — the documented bias."""
    exact = effective_rank(s).item()
    for k in (8, 32):
        residual = s.square().sum() - s[:k].square().sum()
        assert effective_rank(s[:k]).item() <= exact <= effective_rank(s[:k], residual, s.numel()).item()


def test_tail_estimate_is_exact_for_a_flat_tail() -> None:
    s = torch.cat([torch.tensor([5.0, 3.0], dtype=F64), torch.full((98,), 0.5, dtype=F64)])
    residual = s[2:].square().sum().reshape(())
    torch.testing.assert_close(effective_rank(s[:2], residual, 100), effective_rank(s))
    # nothing missing: the residual is ignored; negative round-off counts as 0
    torch.testing.assert_close(effective_rank(s, torch.tensor(1.0, dtype=F64), 100), effective_rank(s))
    torch.testing.assert_close(effective_rank(s[:2], torch.tensor(-1e-9, dtype=F64), 100), effective_rank(s[:2]))


def test_tail_estimate_zero_and_batched() -> None:
    assert effective_rank(torch.zeros(3, 4), torch.zeros(3), 10).tolist() == [0.0] * 3
    # top-k all zero but residual energy present: the whole spectrum is the flat tail
    assert effective_rank(torch.zeros(2), torch.tensor(5.0), 10).item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="total=None"):
        effective_rank(torch.ones(3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="total=2"):
        effective_rank(torch.ones(3), torch.tensor(1.0), 2)


# --------------------------------------------------------------------------- gap, full spectrum


def test_spectral_gap_defined_values() -> None:
    S = torch.tensor([[4.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 1.0]])
    assert spectral_gap(S).tolist() == [2.0, math.inf, 1.0, 1.0]
    assert spectral_gap(torch.tensor([5.0])).item() == math.inf
    assert spectral_gap(torch.tensor([0.0])).item() == 1.0


@pytest.mark.parametrize(("m", "n"), [(512, 1024), (1024, 384)])
def test_full_singular_values_against_svdvals(m: int, n: int) -> None:
    k = min(m, n)
    s = torch.logspace(0, -4, k, dtype=F64)  # four decades, all values distinct
    M = _with_spectrum(m, n, s, seed=3)
    out = full_singular_values(M.float())
    assert out.shape == (k,) and out.dtype == torch.float32
    assert torch.all(out[:-1] >= out[1:]) and torch.all(out >= 0)
    # float64 Gram: every value, down to 1e-4 sigma_1, within float32 rounding of the input plus ~1e-6 sigma_1
    assert ((out.double() - s).abs() / s).max() < 5e-3
    assert (out.double() - s).abs().max() < 1e-5


def test_full_singular_values_gives_exact_effective_rank() -> None:
    """Planted rank-r spectra: the float64 Gram keeps the zero values at ~1e-6 sigma_1, so erank is exact."""
    for m, n in ((1024, 512), (300, 1024)):
        s = torch.zeros(min(m, n), dtype=F64)
        s[:6] = torch.arange(6, 0, -1, dtype=F64)
        M = _with_spectrum(m, n, s, seed=5).float()
        p = s[:6] / s[:6].sum()
        exact = math.exp(-(p * p.log()).sum().item())  # Roy & Vetterli on (6, 5, ..., 1): 5.272
        assert effective_rank(full_singular_values(M)).item() == pytest.approx(exact, rel=1e-3)


def test_full_singular_values_batched_low_precision_zero() -> None:
    M = torch.randn(3, 64, 40, generator=_gen(2))
    out = full_singular_values(M)
    torch.testing.assert_close(out, torch.linalg.svdvals(M), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        full_singular_values(M.bfloat16()), torch.linalg.svdvals(M.bfloat16().float()), rtol=1e-4, atol=1e-3
    )
    assert torch.equal(full_singular_values(torch.zeros(2, 5, 7)), torch.zeros(2, 5))
    # rank 1: the zero values come back as round-off far below sigma_1, not NaN
    u, v = torch.randn(300, 1, generator=_gen(3)), torch.randn(1, 200, generator=_gen(4))
    s = full_singular_values(u @ v)
    assert s[0].item() == pytest.approx((u.norm() * v.norm()).item(), rel=1e-5)
    assert s.isfinite().all() and s[1:].max() < 1e-5 * s[0]
    assert effective_rank(s).item() == pytest.approx(1.0, abs=5e-3)


# --------------------------------------------------------------------------- alignment


def test_abs_cosine() -> None:
    u = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    v = torch.tensor([[-2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    torch.testing.assert_close(abs_cosine(u, v), torch.tensor([1.0, 1 / math.sqrt(2), 0.0, 1.0]))


def test_subspace_overlap() -> None:
    eye = torch.eye(5)
    assert subspace_overlap(eye[:, :2], eye[:, :2]).item() == pytest.approx(1.0)
    assert subspace_overlap(eye[:, :2], eye[:, 2:4]).item() == 0.0
    assert subspace_overlap(eye[:, :2], eye[:, [0, 2]]).item() == pytest.approx(0.5)
    assert subspace_overlap(eye[:, :1], eye[:, :3].double()).item() == pytest.approx(1.0)  # contained
    rotated = torch.stack([torch.tensor([1.0, 0, 1.0, 0, 0]) / math.sqrt(2), eye[3]], dim=-1)
    assert subspace_overlap(eye[:, :2], rotated).item() == pytest.approx(0.25)  # cos^2 45 deg / 2
    Q = _orthonormal(50, 50, 0)
    batch = subspace_overlap(torch.stack([Q[:, :5], Q[:, :5]]), torch.stack([Q[:, :5], Q[:, 5:10]]))
    torch.testing.assert_close(batch, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)


def test_base_alignment() -> None:
    U0 = torch.eye(4)[:, :2]
    u = torch.full((4,), 0.5)
    assert base_alignment(U0, u).item() == pytest.approx(0.5)
    assert base_alignment(U0, 7 * u.bfloat16()).item() == pytest.approx(0.5)  # scale-free, any dtype
    assert base_alignment(U0, torch.tensor([0.0, 0.0, 1.0, 0.0])).item() == 0.0
    assert base_alignment(U0, torch.zeros(4)).item() == 0.0
    assert base_alignment(torch.stack([U0, U0]), torch.stack([u, torch.eye(4)[1]])).tolist() == [0.5, 1.0]


def test_intruder_count_constructed_cases() -> None:
    Q = _orthonormal(64, 64, 5).float()
    U_0 = Q[:, :32]
    assert intruder_count(U_0, U_0).item() == 0
    planted = U_0[:, :12].clone()
    planted[:, 3] = Q[:, 40]  # a direction orthogonal to every column of U_0
    assert intruder_count(planted, U_0).item() == 1
    assert intruder_count(planted, U_0, top=3).item() == 0  # outside the tested top
    assert intruder_count(planted, Q).item() == 0  # all of W_0's vectors: nothing is new
    # threshold: cos 0.6 with a base direction is not an intruder, cos 0.4 is
    for cos, expected in ((0.6, 0), (0.4, 1)):
        y = cos * Q[:, 0] + math.sqrt(1 - cos**2) * Q[:, 50]
        assert intruder_count(y[:, None], U_0).item() == expected
    batch = intruder_count(torch.stack([U_0[:, :10], planted[:, :10]]), torch.stack([U_0, U_0]))
    assert batch.dtype == torch.int64 and batch.tolist() == [0, 1]
    assert intruder_count(planted, U_0.double()).item() == 1  # mixed float32 / float64
    with pytest.raises(ValueError, match="top=0"):
        intruder_count(U_0, U_0, top=0)


# --------------------------------------------------------------------------- sparsity


def test_sparsity_hand_case() -> None:
    W_0 = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    W_t = torch.tensor([[1.0, 2.001, 0.0, -1.5]])
    # |d| = 0 <= 1e-3;  0.001 <= 0.002001;  0 <= 0;  0.5 > 0.0015
    assert sparsity(W_t - W_0, W_t, W_0).item() == pytest.approx(0.75)
    assert sparsity(W_t - W_0, W_t, W_0, eta=0.5).item() == 1.0
    with pytest.raises(ValueError, match="eta=-1"):
        sparsity(W_t - W_0, W_t, W_0, eta=-1)


def test_sparsity_counts_bf16_equality() -> None:
    W_0 = torch.randn(4, 128, 96, generator=_gen(0)).bfloat16()
    step = 1e-3 * torch.randn(4, 128, 96, generator=_gen(1)) * torch.rand(4, 1, 1, generator=_gen(2))
    W_t = (W_0.float() + step).bfloat16()
    expected = (W_t == W_0).double().mean((-2, -1)).float()
    assert expected.min() > 0.0 and expected.max() < 1.0
    torch.testing.assert_close(sparsity(W_t.float() - W_0.float(), W_t, W_0), expected, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- zero update


def test_everything_is_defined_on_a_zero_update() -> None:
    """Step 0 or a frozen layer: documented values, no NaN, no warnings."""
    W = torch.randn(2, 32, 24, generator=_gen(0))
    delta = torch.zeros_like(W)
    fro = frobenius_sq(delta)
    S = full_singular_values(delta)
    U = torch.eye(32)[:, :8].expand(2, 32, 8)
    values = {
        "frobenius_sq": (fro, 0.0),
        "energy_share": (energy_share(S[:, :4], fro, 1), 0.0),
        "stable_rank": (stable_rank(S, fro), 0.0),
        "effective_rank": (effective_rank(S), 0.0),
        "effective_rank_tail": (effective_rank(S[:, :4], fro - S[:, :4].square().sum(-1), 24), 0.0),
        "spectral_gap": (spectral_gap(S), 1.0),
        "abs_cosine": (abs_cosine(delta[:, :, 0], U[:, :, 0]), 0.0),
        "base_alignment": (base_alignment(U, delta[:, :, 0]), 0.0),
        "sparsity": (sparsity(delta, W, W), 1.0),
    }
    for name, (value, expected) in values.items():
        assert value.shape == (2,), name
        assert value.tolist() == [expected, expected], name


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    M = torch.randn(2, 512, 768, generator=_gen(0))
    W_0 = torch.randn(512, 768, generator=_gen(1))
    S = full_singular_values(M)
    S_c = full_singular_values(M.cuda())
    assert S_c.device.type == "cuda"
    torch.testing.assert_close(S_c.cpu(), S, rtol=1e-4, atol=1e-3)
    fro = frobenius_sq(M)
    torch.testing.assert_close(frobenius_sq(M.cuda()).cpu(), fro)
    S, S_c = S[:, :16], S_c[:, :16]
    for f in (energy_share, stable_rank):
        torch.testing.assert_close(f(S_c, fro.cuda()).cpu(), f(S, fro), rtol=1e-4, atol=0)
    residual = fro - S.square().sum(-1)
    torch.testing.assert_close(
        effective_rank(S_c, residual.cuda(), 512).cpu(), effective_rank(S, residual, 512), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(spectral_gap(S_c).cpu(), spectral_gap(S), rtol=1e-4, atol=0)
    U = torch.linalg.qr(M).Q
    assert torch.equal(intruder_count(U.cuda(), U.cuda()).cpu(), intruder_count(U, U))
    torch.testing.assert_close(subspace_overlap(U.cuda(), U.cuda()).cpu(), subspace_overlap(U, U))
    W_t = W_0 + 1e-3 * M[0]
    torch.testing.assert_close(
        sparsity((W_t - W_0).cuda(), W_t.cuda(), W_0.cuda()).cpu(), sparsity(W_t - W_0, W_t, W_0)
    )


def test_intruder_count_truncated_basis_counts_only_certain_intruders() -> None:
    """A top-K basis: a direction mostly outside span(U_0) might match an unseen vector of W_0."""
    eye = torch.eye(6, dtype=F64)
    U_0 = eye[:, :2]  # W_0's top-2 of a 6-dim space
    inside = (eye[:, 0] + eye[:, 1]) / math.sqrt(2)  # cos 0.707 with both: not an intruder
    outside = eye[:, 4]  # orthogonal to span(U_0): an intruder only if the basis were complete
    mixed = 0.3 * eye[:, 0] + 0.3 * eye[:, 1] + math.sqrt(0.82) * eye[:, 5]
    U_t = torch.stack([inside, outside, mixed], dim=1)
    assert intruder_count(U_t, U_0).item() == 2  # paper's rule on the truncated basis
    assert intruder_count(U_t, U_0, truncated=True).item() == 0  # the residuals (1.0, 0.82) exceed 0.25
    U_4 = eye[:, :4]  # top-4 basis: a direction spread thinly over it, little energy outside, is certainly new
    spread = torch.stack([0.45 * (eye[:, 0] + eye[:, 1] + eye[:, 2] + eye[:, 3]) + math.sqrt(0.19) * eye[:, 4]], dim=1)
    assert intruder_count(spread, U_4, truncated=True).item() == 1  # max cos 0.45, outside energy 0.19 < 0.25
    full = eye  # complete basis: truncated=True changes nothing
    assert intruder_count(U_t, full, truncated=True).item() == intruder_count(U_t, full).item() == 0
