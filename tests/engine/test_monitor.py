"""SpectralMonitor on planted updates whose spectrum is known by construction.

Every expected value below is computed by hand (or with numpy in float64) from the planted
factors, never from the monitor itself.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spectral_monitor.engine.plan as plan_mod
import spectral_monitor.engine.updates as updates_mod
from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine import SpectralMonitor
from spectral_monitor.errors import ConfigError, NonFiniteError
from spectral_monitor.snapshot import DiskStore

LOGGER = "spectral_monitor"


@pytest.fixture(autouse=True)
def _float32_sketches(monkeypatch):
    """The hand-computed cases below check the float32 path to ~1e-6; ``sketch_dtype="auto"`` would
    pick bf16 products on AMX / AVX512-BF16 CPUs (~1e-4). The bf16 path has its own tests at the end."""
    monkeypatch.setattr(plan_mod, "fast_bf16", lambda device: False)


# ------------------------------------------------------------------ helpers
def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def unit(n: int, seed: int) -> torch.Tensor:
    return orthonormal(n, 1, seed)[:, 0]


def single(m: int, n: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """One bias-free ``q_proj`` linear layer with an (m, n) weight."""
    return nn.ModuleDict({"q_proj": nn.Linear(n, m, bias=False, dtype=dtype)})


def set_canonical(monitor: SpectralMonitor, name: str, W: torch.Tensor) -> None:
    """Write the canonical (out, in) matrix ``W`` into the layer's parameter (any orientation/dtype)."""
    spec = next(s for s in monitor.specs if s.name == name)
    p = spec.parameter()
    with torch.no_grad():
        p.copy_((W.T if spec.transposed else W).to(p.dtype))


def get_canonical(monitor: SpectralMonitor, name: str) -> torch.Tensor:
    spec = next(s for s in monitor.specs if s.name == name)
    return spec.canonical(spec.parameter().detach()).double().clone()


def batches(mon: SpectralMonitor) -> list:
    """The batches the monitor's next measurement would use."""
    return mon.planner.batches(mon.specs, lambda s: mon._state(s).rank, full=False)


def val(report, metric: str, layer: str) -> float:
    return report.metrics[f"spectral/{metric}/{layer}"]


def roy_vetterli(s) -> float:
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def known_base(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W_0 = U0 diag(s0) V0ᵀ with a well-separated spectrum 10·0.7^i; returns (W0, U0)."""
    U0, V0 = orthonormal(m, m, seed), orthonormal(n, n, seed + 1)
    k = min(m, n)
    s0 = 10.0 * 0.7 ** torch.arange(k, dtype=torch.float64)
    return (U0[:, :k] * s0) @ V0[:, :k].T, U0


def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


# ------------------------------------------------------------------ planted rank-1
def test_planted_rank1_update_exact_metrics():
    m, n, sigma = 40, 30, 0.7
    W0, U0 = known_base(m, n)
    model = single(m, n)
    mon = SpectralMonitor(model, rank=8, base_k=4)
    set_canonical(mon, "q_proj", W0)
    mon.snapshot()
    W0 = get_canonical(mon, "q_proj")  # the float32 base actually stored
    # u: 0.6 inside W_0's top-4 left subspace, 0.8 outside it -> align_base = 0.36 by hand
    u = 0.6 * U0[:, 1] + 0.8 * U0[:, 20]
    v = unit(n, 7)
    set_canonical(mon, "q_proj", W0 + sigma * torch.outer(u, v))
    delta = get_canonical(mon, "q_proj") - W0  # the update as stored in float32
    r = mon.measure(1)

    L = "q_proj"
    assert val(r, "update_norm", L) == pytest.approx(delta.norm().item(), rel=1e-6)
    assert val(r, "update_norm", L) == pytest.approx(sigma, rel=1e-6)
    assert val(r, "sigma1", L) == pytest.approx(sigma, rel=1e-5)
    assert val(r, "rho1", L) == pytest.approx(1.0, abs=1e-5)
    assert val(r, "topk_energy", L) == pytest.approx(1.0, abs=1e-5)
    assert val(r, "stable_rank", L) == pytest.approx(1.0, abs=1e-5)
    assert val(r, "gap", L) > 1e4
    assert val(r, "erank", L) == pytest.approx(1.0, abs=1e-2)
    assert val(r, "erank_exact", L) == 0.0
    assert val(r, "rank", L) == 8.0
    # update_rel = σ/‖W_0‖_F, with ‖W_0‖_F from the planted spectrum
    assert val(r, "update_rel", L) == pytest.approx(sigma / np.linalg.norm(W0.numpy()), rel=1e-6)
    # align_base = ‖U_{0,4}ᵀ u‖² with U_{0,4} from numpy's SVD of W_0
    U0_np = np.linalg.svd(W0.numpy())[0][:, :4]
    assert val(r, "align_base", L) == pytest.approx(float(np.sum((U0_np.T @ u.numpy()) ** 2)), abs=1e-5)
    assert val(r, "align_base", L) == pytest.approx(0.36, abs=1e-5)
    # sparsity by its definition: |ΔW| <= 1e-3·max(|W_t|, |W_0|)
    Wt = W0 + delta
    expected_sparsity = (delta.abs() <= 1e-3 * torch.maximum(Wt.abs(), W0.abs())).double().mean().item()
    assert val(r, "sparsity", L) == pytest.approx(expected_sparsity, abs=1e-6)
    # the top singular value is in the spectra too, and the top left vector is ±u
    assert r.spectra[L][0].item() == pytest.approx(sigma, rel=1e-5)
    prev_u = mon.state_dict()["layers"][L]["prev_u"]
    assert abs(float(prev_u[:, 0].double() @ u)) == pytest.approx(1.0, abs=1e-5)
    assert not r.skipped
    # model-level aggregates of a single layer equal the layer's value
    assert r.metrics["spectral/model/rho1_mean"] == pytest.approx(val(r, "rho1", L))
    assert r.metrics["spectral/model/update_norm_total"] == pytest.approx(sigma, rel=1e-6)


def test_intruder_dimension_from_a_planted_direction():
    """u ⊥ col(W_0) planted with σ=20 on W_0's weakest right vector: exactly one intruder."""
    m, n = 40, 30
    W0, U0 = known_base(m, n)
    V0 = orthonormal(n, n, 1)
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4, base_k=30)
    set_canonical(mon, "q_proj", W0)
    mon.snapshot()
    r0 = mon.measure(1)
    assert val(r0, "intruders", "q_proj") == 0.0  # W_t = W_0: nothing new
    u = U0[:, 35]  # outside the column space of W_0 (rank 30 in R^40)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + 20.0 * torch.outer(u, V0[:, 29]))
    r = mon.measure(2)
    assert val(r, "intruders", "q_proj") == 1.0
    assert val(r, "align_base", "q_proj") == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ planted rank-r
S_PLANTED = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


def planted_rank_r(full_every: int, rank: int = 3):
    m, n = 40, 30
    model = single(m, n)
    torch.manual_seed(3)
    mon = SpectralMonitor(model, rank=rank, full_every=full_every, adaptive_rank=False)
    mon.snapshot()
    U, V = orthonormal(m, 6, 11), orthonormal(n, 6, 12)
    s = torch.tensor(S_PLANTED, dtype=torch.float64)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + (U * s) @ V.T)
    return mon, mon.measure(1)


def test_planted_rank_r_topk_energy_gap_stable_rank():
    _, r = planted_rank_r(full_every=0)
    total = sum(x * x for x in S_PLANTED)  # 91
    L = "q_proj"
    assert val(r, "update_norm", L) == pytest.approx(math.sqrt(total), rel=1e-5)
    assert val(r, "rho1", L) == pytest.approx(36 / total, rel=1e-5)
    assert val(r, "topk_energy", L) == pytest.approx((36 + 25 + 16) / total, rel=1e-5)
    assert val(r, "stable_rank", L) == pytest.approx(total / 36, rel=1e-5)
    assert val(r, "gap", L) == pytest.approx(6 / 5, rel=1e-5)
    assert val(r, "sigma1", L) == pytest.approx(6.0, rel=1e-5)
    torch.testing.assert_close(r.spectra[L], torch.tensor([6.0, 5.0, 4.0]), rtol=1e-5, atol=1e-5)
    assert val(r, "rank", L) == 3.0
    # erank estimated from top-3 + residual energy 14 spread evenly over the 27 missing values
    tail = math.sqrt((total - 77) / 27)
    assert val(r, "erank_exact", L) == 0.0
    assert val(r, "erank", L) == pytest.approx(roy_vetterli([6, 5, 4] + [tail] * 27), rel=1e-4)


def test_planted_rank_r_erank_with_full_spectrum():
    _, r = planted_rank_r(full_every=1)
    assert val(r, "erank_exact", "q_proj") == 1.0
    # Roy–Vetterli of the planted values (the other 24 singular values are 0). The Gram-matrix
    # eigensolver lifts the zero values to round-off (~1e-3·σ1), which costs ~0.5% on a 40×30 layer.
    assert val(r, "erank", "q_proj") == pytest.approx(roy_vetterli(S_PLANTED), rel=1e-2)


# ------------------------------------------------------------------ orientation
def test_conv1d_left_vectors_live_in_the_output_space():
    model = gpt2()
    mon = SpectralMonitor(model, rank=4, base_k=8)
    mon.snapshot()
    qkv, proj = "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"
    assert next(s for s in mon.specs if s.name == qkv).shape == (96, 32)
    W_qkv, W_proj = get_canonical(mon, qkv), get_canonical(mon, proj)
    u, v1, v2 = unit(96, 1), orthonormal(32, 2, 2)[:, 0], orthonormal(32, 2, 2)[:, 1]
    # square c_proj (32×32): shapes cannot tell the orientation, the vectors can
    a1, a2, w = orthonormal(32, 2, 3)[:, 0], orthonormal(32, 2, 3)[:, 1], unit(32, 4)
    set_canonical(mon, qkv, W_qkv + 0.5 * torch.outer(u, v1))
    set_canonical(mon, proj, W_proj + 0.5 * torch.outer(a1, w))
    mon.measure(1)
    prev_u = mon.state_dict()["layers"][qkv]["prev_u"]
    assert prev_u.shape[0] == 96
    assert abs(float(prev_u[:, 0].double() @ u)) == pytest.approx(1.0, abs=1e-5)
    # second measurement: same left vector, orthogonal right vector -> align_prev = 1;
    # on c_proj: orthogonal left vector, same right vector -> align_prev = 0
    set_canonical(mon, qkv, W_qkv + 0.5 * torch.outer(u, v2))
    set_canonical(mon, proj, W_proj + 0.5 * torch.outer(a2, w))
    r = mon.measure(2)
    assert val(r, "align_prev", qkv) == pytest.approx(1.0, abs=1e-5)
    assert val(r, "align_prev", proj) == pytest.approx(0.0, abs=1e-5)
    assert val(r, "sigma1", qkv) == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------ edge cases
def test_zero_update_gives_defined_values_and_no_warnings(caplog):
    model = gpt2()
    mon = SpectralMonitor(model, rank=4, full_every=2)
    mon.snapshot()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports = [mon.measure(1), mon.measure(2)]  # the second takes the full-spectrum path
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING and rec.name == LOGGER]
    for r in reports:
        assert not r.skipped
        for layer in r.layers:
            expected = {
                "update_norm": 0.0,
                "update_rel": 0.0,
                "sigma1": 0.0,
                "rho1": 0.0,
                "topk_energy": 0.0,
                "stable_rank": 0.0,
                "erank": 0.0,
                "gap": 1.0,
                "sparsity": 1.0,
                "intruders": 0.0,
                "nonfinite": 0.0,
            }
            for metric, value in expected.items():
                assert val(r, metric, layer) == value, (metric, layer)
            assert f"spectral/align_base/{layer}" not in r.metrics  # the top direction of a zero update is arbitrary
            assert val(r, "alpha_reliable", layer) == 0.0
            assert f"spectral/align_prev/{layer}" not in r.metrics  # no previous direction to compare
        # a zero update has no spectrum to summarise: no aggregate, counted as zero updates
        assert r.aggregates == {} and r.model["zero_update"] == len(r.layers) == 8
        assert r.model["update_norm_total"] == 0.0 and r.model["layers"] == 0.0
    assert reports[1].metrics["spectral/erank_exact/transformer.h.0.attn.c_attn"] == 1.0


def test_nan_in_one_layer_is_reported_and_the_others_measured(caplog):
    model = gpt2()
    mon = SpectralMonitor(model, rank=4)
    mon.snapshot()
    bad, good = "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"  # same shape: same chunk
    u, v = unit(128, 1), unit(32, 2)
    set_canonical(mon, good, get_canonical(mon, good) + 0.3 * torch.outer(u, v))
    with torch.no_grad():
        next(s for s in mon.specs if s.name == bad).parameter()[3, 5] = float("nan")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    r = mon.measure(1)
    r2 = mon.measure(2)
    assert val(r, "nonfinite", bad) == 1.0
    assert f"spectral/update_norm/{bad}" not in r.metrics
    assert "non-finite" in r.skipped[bad]
    assert list(r.skipped) == [bad]
    assert val(r, "update_norm", good) == pytest.approx(0.3, rel=1e-5)
    assert val(r, "rho1", good) == pytest.approx(1.0, abs=1e-5)
    measured = r.layer_values("update_norm")
    assert len(measured) == 7 and bad not in measured
    assert r.metrics["spectral/model/nonfinite"] == 1.0
    assert math.isfinite(r.metrics["spectral/model/update_norm_total"])
    assert r.metrics["spectral/model/update_norm_total"] == pytest.approx(0.3, rel=1e-5)
    assert bad in r2.skipped
    nan_warnings = [rec for rec in caplog.records if "NaN" in rec.getMessage()]
    assert len(nan_warnings) == 1  # warned once, not on every measurement


def test_nan_in_strict_mode_raises():
    model = gpt2()
    mon = SpectralMonitor(model, rank=4, strict=True)
    mon.snapshot()
    with torch.no_grad():
        mon.specs[2].parameter()[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=re.escape("transformer.h.0.mlp.c_fc")):
        mon.measure(1)


def test_rank_larger_than_the_layer_is_clamped_with_a_note(caplog):
    model = single(5, 6)
    mon = SpectralMonitor(model, rank=32)
    mon.snapshot()
    s = [3.0, 2.0, 1.0, 0.5, 0.25]
    U, V = orthonormal(5, 5, 1), orthonormal(6, 5, 2)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + (U * torch.tensor(s, dtype=torch.float64)) @ V.T)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    r = mon.measure(1)
    assert val(r, "rank", "q_proj") == 5.0
    torch.testing.assert_close(r.spectra["q_proj"], torch.tensor(s), rtol=1e-5, atol=1e-6)
    assert val(r, "topk_energy", "q_proj") == pytest.approx(1.0, abs=1e-6)
    assert any("clamped to 5" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize(("m", "n"), [(1, 7), (9, 1)])
def test_vector_shaped_linear_layers(m, n):
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4)
    mon.snapshot()
    delta = torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + delta)
    r = mon.measure(1)
    norm = float(delta.norm())
    assert val(r, "update_norm", "q_proj") == pytest.approx(norm, rel=1e-5)
    assert val(r, "sigma1", "q_proj") == pytest.approx(norm, rel=1e-5)
    assert val(r, "rho1", "q_proj") == pytest.approx(1.0, abs=1e-6)
    assert val(r, "stable_rank", "q_proj") == pytest.approx(1.0, abs=1e-6)
    assert val(r, "erank", "q_proj") == pytest.approx(1.0, abs=1e-6)
    assert val(r, "gap", "q_proj") == math.inf  # one singular value only
    assert val(r, "rank", "q_proj") == 1.0
    assert not r.skipped


def test_layer_larger_than_the_memory_budget(caplog):
    m, n = 512, 300  # 0.6 MB as float32; ΔW and W_t together exceed a 1 MB budget
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4, memory_budget_mb=1)
    mon.snapshot()
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    U, V = orthonormal(m, 2, 1), orthonormal(n, 2, 2)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + (U * s) @ V.T)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    r = mon.measure(1)
    assert not r.skipped
    assert val(r, "update_norm", "q_proj") == pytest.approx(math.sqrt(5.0), rel=1e-5)
    assert val(r, "sigma1", "q_proj") == pytest.approx(2.0, rel=1e-5)
    assert val(r, "gap", "q_proj") == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize(
    ("dtype", "sketch"), [(torch.float32, "float32"), (torch.bfloat16, "float32"), (torch.float32, "bfloat16")]
)
def test_over_budget_layer_streams_rows_and_agrees_with_the_batched_path(dtype, sketch):
    """The row-streaming path (ΔW never formed) gives the numbers of the in-memory path, also
    with bf16 sketches (blocks rounded on the fly; batch: ΔW formed in float32, then rounded)."""
    m, n = 512, 300
    results = []
    for budget in (1, 64):  # 1 MB: over budget, streamed; 64 MB: formed in one buffer
        torch.manual_seed(0)
        model = single(m, n, dtype=dtype)
        mon = SpectralMonitor(model, rank=6, memory_budget_mb=budget, sketch_dtype=sketch)
        mon.snapshot()
        W0 = get_canonical(mon, "q_proj")
        spike = 0.5 * torch.outer(unit(m, 3), unit(n, 4)) + 0.01 * orthonormal(m, 3, 5) @ orthonormal(n, 3, 6).T
        set_canonical(mon, "q_proj", W0 + spike)
        results.append(mon.measure(1))
    streamed, batched = results
    # sparsity: exact when streamed, from a 16,384-entry strided sample in the batched path
    assert val(streamed, "sparsity", "q_proj") == pytest.approx(val(batched, "sparsity", "q_proj"), abs=5e-3)
    # bf16: W_0's top-32 basis of this random (flat-spectrum) base is rounded differently in the two
    # paths and turns a little, so align_base (a share of ‖u₁‖² in that basis) gets an absolute bound
    tol, tol_abs = (1e-4, 1e-6) if sketch == "float32" else (2e-3, 2e-3)
    for metric in ("update_norm", "update_rel", "sigma1", "rho1", "align_base", "intruders"):
        expected = pytest.approx(val(batched, metric, "q_proj"), rel=tol, abs=tol_abs)
        assert val(streamed, metric, "q_proj") == expected, metric


def test_bf16_weights_are_upcast():
    m, n = 24, 16
    model = single(m, n, dtype=torch.bfloat16)
    mon = SpectralMonitor(model, rank=4)
    mon.snapshot()
    W0 = get_canonical(mon, "q_proj")
    U, V = orthonormal(m, 2, 1), orthonormal(n, 2, 2)
    set_canonical(mon, "q_proj", W0 + (U * torch.tensor([1.0, 0.5], dtype=torch.float64)) @ V.T)
    delta = (get_canonical(mon, "q_proj") - W0).numpy()  # what bf16 actually holds
    s = np.linalg.svd(delta, compute_uv=False)
    r = mon.measure(1)
    assert model["q_proj"].weight.dtype == torch.bfloat16
    assert val(r, "update_norm", "q_proj") == pytest.approx(np.linalg.norm(delta), rel=1e-5)
    assert val(r, "sigma1", "q_proj") == pytest.approx(s[0], rel=1e-4)
    assert val(r, "rho1", "q_proj") == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-4)
    assert val(r, "update_rel", "q_proj") == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(W0), rel=1e-5)


# ------------------------------------------------------------------ warm start and state
def test_warm_start_uses_the_previous_right_subspace(monkeypatch):
    m, n = 60, 50
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4, oversample=0, niter=0, adaptive_rank=False, intruders=False)
    mon.snapshot()
    s = 0.8 ** torch.arange(30, dtype=torch.float64)
    U, V = orthonormal(m, 30, 1), orthonormal(n, 30, 2)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + (U * s) @ V.T)

    inits = []
    real = updates_mod.randomized_svd

    def spy(A, rank, **kw):
        if rank == 4:  # the ΔW sketch (the base's has rank base_k)
            inits.append(kw.get("init"))
        return real(A, rank, **kw)

    monkeypatch.setattr(updates_mod, "randomized_svd", spy)
    errors = []
    for step in range(1, 6):
        r = mon.measure(step)
        errors.append(float((r.spectra["q_proj"].double() - s[:4]).abs().max()))
        prev_v = mon.state_dict()["layers"]["q_proj"]["prev_v"]
        assert prev_v.shape == (n, 4)
        if step < 5:
            last_v = prev_v.clone()
    assert inits[0] is None
    assert all(init is not None for init in inits[1:])
    torch.testing.assert_close(inits[-1][0], last_v)
    # with niter=0 each measurement is one more subspace iteration: the error keeps falling
    # (a cold start would redraw a random sketch and stay at the first error every time)
    assert errors[-1] < 0.25 * errors[0]
    assert all(b < a for a, b in itertools.pairwise(errors))


def test_a_cold_sketch_is_twice_as_wide(monkeypatch):
    """No previous subspace (first measurement, or after a zero update): 2 x oversample columns."""
    m, n = 60, 50
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4, oversample=5, adaptive_rank=False, intruders=False)
    mon.snapshot()
    W0 = get_canonical(mon, "q_proj")
    calls = []
    real = updates_mod.randomized_svd

    def spy(A, rank, **kw):
        if rank == 4:  # the ΔW sketch (the base's has rank base_k)
            calls.append((kw["oversample"], kw.get("init") is not None))
        return real(A, rank, **kw)

    monkeypatch.setattr(updates_mod, "randomized_svd", spy)
    for step, scale in enumerate((1.0, 2.0, 0.0, 1.0), start=1):  # the third update is zero
        set_canonical(mon, "q_proj", W0 + scale * _realistic(m, n, seed=0, r=3, noise=1e-3))
        mon.measure(step)
    assert calls == [(10, False), (5, True), (5, True), (10, False)]


def test_state_dict_round_trip_gives_the_same_next_measurement():
    model = gpt2()
    cfg = MonitorConfig(rank=4, base_k=8)
    a = SpectralMonitor(model, cfg)
    a.snapshot()
    name = "transformer.h.1.mlp.c_proj"
    W0 = get_canonical(a, name)
    set_canonical(a, name, W0 + 0.4 * torch.outer(unit(32, 1), unit(128, 2)))
    a.measure(10)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    b = SpectralMonitor(model, cfg)
    b.set_base(a.store)
    b.load_state_dict(state)
    assert b.measurements == 1 and b.last_step == 10
    u2 = 0.8 * unit(32, 1) + 0.6 * unit(32, 3)
    set_canonical(a, name, W0 + 0.4 * torch.outer(u2 / u2.norm(), unit(128, 2)))
    ra, rb = a.measure(20), b.measure(20)
    assert f"spectral/align_prev/{name}" in rb.metrics  # the previous direction survived
    keys = [k for k in ra.metrics if not k.endswith("measure_s")]
    assert keys == [k for k in rb.metrics if not k.endswith("measure_s")]
    for key in keys:
        va, vb = ra.metrics[key], rb.metrics[key]
        assert (math.isnan(va) and math.isnan(vb)) or va == pytest.approx(vb, rel=1e-6, abs=1e-7), key


def test_load_state_dict_reopens_a_disk_base(tmp_path):
    model = gpt2()
    cfg = MonitorConfig(rank=4, base_store="disk", base_dir=str(tmp_path))
    a = SpectralMonitor(model, cfg)
    a.snapshot()
    name = "transformer.h.0.attn.c_attn"
    set_canonical(a, name, get_canonical(a, name) + 0.25 * torch.outer(unit(96, 1), unit(32, 2)))
    state = a.state_dict()
    assert state["base"]["kind"] == "disk"
    b = SpectralMonitor(model, cfg)
    assert not b.has_base
    b.load_state_dict(state)
    assert isinstance(b.store, DiskStore) and b.has_base
    assert val(b.measure(5), "update_norm", name) == pytest.approx(0.25, rel=1e-5)


def test_measure_before_snapshot_raises():
    mon = SpectralMonitor(single(4, 4))
    with pytest.raises(RuntimeError, match="snapshot"):
        mon.measure(1)


def test_monitor_touches_neither_the_rng_nor_the_weights():
    model = gpt2()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    mon = SpectralMonitor(model, rank=4, full_every=2)
    mon.snapshot()
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.ones_like(p))  # deterministic, no RNG
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for step in (1, 2, 3):
        mon.measure(step)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_same_shape_layers_batched_or_one_by_one_agree():
    m, n = 384, 512  # 0.75 MB of float32 ΔW per layer: a 1 MB budget holds one, 1024 MB all four
    model = nn.ModuleDict({f"l{i}": nn.Linear(n, m, bias=False) for i in range(4)})

    def run(budget: int):
        torch.manual_seed(0)
        for layer in model.values():
            layer.reset_parameters()
        mon = SpectralMonitor(model, rank=4, memory_budget_mb=budget, base_k=8)
        mon.snapshot()
        chunks = [b.specs for b in batches(mon)]
        reports = []
        for step, scale in ((1, 1.0), (2, 1.5)):
            for i, name in enumerate(model):
                U, V = orthonormal(m, 3, 10 * i + step), orthonormal(n, 3, 10 * i + 5)
                s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * scale * (i + 1)
                with torch.no_grad():
                    model[name].weight.copy_(mon.store.get(mon.specs[i], torch.device("cpu")) + ((U * s) @ V.T).float())
            reports.append(mon.measure(step))
        return [len(c) for c in chunks], reports

    small_chunks, small = run(1)
    large_chunks, large = run(1024)
    assert small_chunks == [1, 1, 1, 1] and large_chunks == [4]
    for rs, rl in zip(small, large):
        assert set(rs.metrics) == set(rl.metrics)
        for key, value in rs.metrics.items():
            if key.endswith("measure_s"):
                continue
            assert (math.isnan(value) and math.isnan(rl.metrics[key])) or rl.metrics[key] == pytest.approx(
                value, rel=1e-4, abs=1e-6
            ), key
    # and the numbers are the planted ones
    assert small[0].metrics["spectral/sigma1/l2"] == pytest.approx(9.0, rel=1e-5)
    assert "spectral/align_prev/l0" in small[1].metrics


# ------------------------------------------------------------------ LoRA
peft = pytest.importorskip("peft")


def _set_lora(layer, B: torch.Tensor, A: torch.Tensor, adapter: str = "default") -> None:
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_(B)
        layer.lora_A[adapter].weight.copy_(A)


def _check_lora_layer(report, name: str, dense: torch.Tensor, W0: torch.Tensor) -> None:
    """Metrics of a LoRA layer against the dense product ``dense`` (float64, canonical)."""
    s = np.linalg.svd(dense.numpy(), compute_uv=False)
    r = len([x for x in s if x > 1e-9 * s[0]])
    assert val(report, "update_norm", name) == pytest.approx(np.linalg.norm(dense.numpy()), rel=1e-5)
    assert val(report, "sigma1", name) == pytest.approx(s[0], rel=1e-5)
    assert val(report, "rho1", name) == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-5)
    np.testing.assert_allclose(report.spectra[name].numpy()[:r], s[:r], rtol=1e-5)
    assert val(report, "update_rel", name) == pytest.approx(
        np.linalg.norm(dense.numpy()) / np.linalg.norm(W0.numpy()), rel=1e-5
    )
    assert val(report, "erank", name) == pytest.approx(roy_vetterli(s[:r]), rel=1e-4)
    # align_base with base_k = full rank of W_0: the share of u1 inside W_0's column space
    U = np.linalg.svd(dense.numpy())[0][:, 0]
    Q = np.linalg.qr(W0.numpy())[0]
    assert val(report, "align_base", name) == pytest.approx(float(np.sum((Q.T @ U) ** 2)), abs=1e-4)


def test_lora_on_gpt2_conv1d_fan_in_fan_out():
    base = gpt2()
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    # PEFT freezes the non-adapted layers: not monitored unless include_frozen
    assert all(s.kind == "lora" for s in SpectralMonitor(model).specs)
    mon = SpectralMonitor(model, rank=4, base_k=32, include_frozen=True)
    mon.snapshot()
    name = "base_model.model.transformer.h.0.attn.c_attn"
    layer = dict(model.named_modules())[name]
    gen = torch.Generator().manual_seed(5)
    B, A = torch.randn(96, 4, generator=gen), torch.randn(4, 32, generator=gen)
    _set_lora(layer, B, A)
    scaling = layer.scaling["default"]
    assert scaling == 2.0
    dense = scaling * B.double() @ A.double()  # canonical (out, in) = (96, 32)
    W0 = layer.get_base_layer().weight.detach().double().T.clone()
    r = mon.measure(1)
    _check_lora_layer(r, name, dense, W0)
    # h.1's adapter is untouched (B = 0): ΔW = 0, defined values
    other = "base_model.model.transformer.h.1.attn.c_attn"
    assert val(r, "update_norm", other) == 0.0 and val(r, "rho1", other) == 0.0
    # the non-adapted Conv1D layers are dense specs measured against the snapshot
    assert val(r, "update_norm", "base_model.model.transformer.h.0.mlp.c_fc") == 0.0
    # peft's own merge is the oracle for the orientation: W_merged - W_base = ΔWᵀ (stored (in, out))
    model.merge_adapter()
    merged = layer.get_base_layer().weight.detach().double()
    torch.testing.assert_close(merged.T - W0, dense, rtol=1e-5, atol=1e-5)
    # a merged adapter: skipped with a reason, the dense layers still measured, no exception
    r2 = mon.measure(2)
    assert "merged" in r2.skipped[name]
    assert f"spectral/update_norm/{name}" not in r2.metrics
    assert "spectral/update_norm/base_model.model.transformer.h.0.mlp.c_fc" in r2.metrics


def test_lora_on_linear_model_and_two_active_adapters():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(16, 16, bias=False)
            self.v_proj = nn.Linear(16, 8, bias=False)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": Attn()}) for _ in range(2))

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    mon = SpectralMonitor(model, rank=4, base_k=16)
    assert mon.snapshot() is None  # every layer is LoRA: no copy of the base
    assert all(s.kind == "lora" for s in mon.specs) and len(mon.specs) == 4
    name = "base_model.model.layers.0.self_attn.v_proj"
    layer = dict(model.named_modules())[name]
    gen = torch.Generator().manual_seed(1)
    B, A = torch.randn(8, 2, generator=gen), torch.randn(2, 16, generator=gen)
    _set_lora(layer, B, A)
    W0 = layer.get_base_layer().weight.detach().double().clone()
    r = mon.measure(1)
    _check_lora_layer(r, name, 3.0 * B.double() @ A.double(), W0)  # scaling = 6 / 2
    # a second adapter, both active: ΔW = s1·B1A1 + s2·B2A2
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    B2, A2 = torch.randn(8, 3, generator=gen), torch.randn(3, 16, generator=gen)
    _set_lora(layer, B2, A2, "second")
    model.base_model.set_adapter(["default", "second"])
    assert list(layer.active_adapters) == ["default", "second"]
    _set_lora(layer, B, A)  # set_adapter may have touched requires_grad only; values stay explicit
    r2 = mon.measure(2)
    dense = 3.0 * B.double() @ A.double() + 1.0 * B2.double() @ A2.double()
    _check_lora_layer(r2, name, dense, W0)


def test_lora_state_round_trip_keeps_the_previous_direction():
    torch.manual_seed(0)
    base = nn.ModuleDict({"q_proj": nn.Linear(24, 32, bias=False)})
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    a = SpectralMonitor(model, rank=4, strict=True)
    a.snapshot()
    name = "base_model.model.q_proj"
    layer = dict(model.named_modules())[name]
    gen = torch.Generator().manual_seed(3)
    B, A = torch.randn(32, 4, generator=gen), torch.randn(4, 24, generator=gen)
    _set_lora(layer, B, A)
    a.measure(1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = SpectralMonitor(model, rank=4, strict=True)
    b.load_state_dict(torch.load(buf))
    _set_lora(layer, 1.5 * B, A)  # same directions, larger: align_prev = 1
    rb = b.measure(2)
    assert not rb.skipped
    assert val(rb, "align_prev", name) == pytest.approx(1.0, abs=1e-5)
    assert val(rb, "update_norm", name) == pytest.approx(1.5 * 2.0 * float((B @ A).norm()), rel=1e-5)


def test_sharded_parameters_outside_a_distributed_job_are_a_clear_error():
    """A ZeRO-3-like partition (ds_id, shape [0]) needs its process group to be measured."""
    model = nn.ModuleDict({"q_proj": nn.Linear(6, 4, bias=False), "k_proj": nn.Linear(6, 4, bias=False)})
    weight = model["k_proj"].weight
    weight.ds_id, weight.ds_shape, weight.ds_tensor = 7, (4, 6), torch.zeros(12)  # what ZeRO-3 attaches
    with pytest.raises(ConfigError, match=r"sharded .* torch.distributed is not initialised"):
        SpectralMonitor(model)


# ------------------------------------------------------------------ bf16 sketches (sketch_dtype)
def test_auto_sketch_dtype_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(plan_mod, "fast_bf16", lambda device, fast=fast: fast)
        mon = SpectralMonitor(single(8, 8))
        assert mon.planner.sketch_dtype(cpu) == expected
        assert mon.planner.sketch_dtype(cpu, full=True) == torch.float32  # full spectra need float32 ΔW
        assert mon.planner.sketch_dtype(cpu, numel=plan_mod.SMALL_LAYER) == torch.float32  # too small to repay bf16
        assert mon.planner.sketch_dtype(cpu, numel=plan_mod.SMALL_LAYER + 1) == expected
    assert SpectralMonitor(single(8, 8), sketch_dtype="float32").planner.sketch_dtype(cpu) == torch.float32
    monkeypatch.setattr(plan_mod, "fast_bf16", lambda device: False)
    assert SpectralMonitor(single(8, 8), sketch_dtype="bfloat16").planner.sketch_dtype(cpu) == torch.bfloat16


def _realistic(m: int, n: int, seed: int, r: int = 6, noise: float = 1e-3) -> torch.Tensor:
    """A few decaying directions over a dense noise bulk (float64, canonical orientation)."""
    s = 4 * noise * (m**0.5 + n**0.5) * torch.arange(1, r + 1, dtype=torch.float64) ** -0.6
    g = torch.Generator().manual_seed(seed)
    return (orthonormal(m, r, seed) * s) @ orthonormal(n, r, seed + 1).T + noise * torch.randn(
        m, n, generator=g, dtype=torch.float64
    )


def test_bf16_sketches_agree_with_the_exact_spectrum_and_the_float32_path():
    """Same weights, both dtypes: σ within 1e-3 of float32's and of the exact SVD's where float32
    is exact; norms, sparsity (formed in float32) identical; alignment and intruders agree."""
    m, n, names = 192, 256, ["a", "b", "c"]
    torch.manual_seed(0)
    model = nn.ModuleDict({k: nn.Linear(n, m, bias=False) for k in names})
    deltas = {k: _realistic(m, n, seed=10 * i) for i, k in enumerate(names)}
    reports = {}
    for dtype in ("float32", "bfloat16"):
        mon = SpectralMonitor(model, rank=8, sketch_dtype=dtype, adaptive_rank=False, niter=4)
        mon.snapshot()
        W0 = {k: get_canonical(mon, k) for k in names}
        for k in names:
            set_canonical(mon, k, W0[k] + deltas[k])
        reports[dtype] = (mon.measure(1), mon.measure(2))  # cold, then warm-started
        assert mon.workspace_bytes > 0  # CPU buffers are kept for the next measurement
        for k in names:
            set_canonical(mon, k, W0[k])
    for k in names:
        exact = np.linalg.svd(deltas[k].numpy(), compute_uv=False)
        for r32, r16 in zip(*reports.values()):
            assert val(r16, "update_norm", k) == val(r32, "update_norm", k)
            assert val(r16, "sparsity", k) == val(r32, "sparsity", k)
            assert val(r16, "sigma1", k) == pytest.approx(exact[0], rel=1e-3)
            top = r16.spectra[k][:4].double().numpy()
            assert np.max(np.abs(top - exact[:4]) / exact[:4]) < 2e-3  # planted directions: exact in float32
            assert np.allclose(r16.spectra[k].numpy(), r32.spectra[k].numpy(), rtol=5e-3)
            assert val(r16, "rho1", k) == pytest.approx(val(r32, "rho1", k), abs=1e-3)
            assert val(r16, "align_base", k) == pytest.approx(val(r32, "align_base", k), abs=1e-2)
            assert val(r16, "intruders", k) == val(r32, "intruders", k)
        assert val(reports["bfloat16"][1], "align_prev", k) == pytest.approx(1.0, abs=1e-3)


def test_bf16_update_is_rounded_after_the_float32_subtraction():
    """ΔW of 1e-4·‖W‖: rounding W_t and W_0 to bf16 first would leave noise ~20x the update;
    rounding the float32 difference keeps σ₁ to ~1e-4."""
    m, n = 128, 96
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4, sketch_dtype="bfloat16")
    mon.snapshot()
    W0 = get_canonical(mon, "q_proj")
    sigma = 1e-4 * float(W0.norm())
    set_canonical(mon, "q_proj", W0 + sigma * torch.outer(unit(m, 7), unit(n, 8)))
    delta = get_canonical(mon, "q_proj") - W0  # what float32 actually holds
    r = mon.measure(1)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    assert val(r, "sigma1", "q_proj") == pytest.approx(s[0], rel=1e-3)
    assert val(r, "rho1", "q_proj") == pytest.approx(1.0, abs=1e-3)


def test_sampled_sparsity_of_a_large_layer_is_within_its_error_bar():
    """Over 16,384 entries: runs of 64 entries sampled; planted 30 % unchanged entries."""
    m, n = 640, 512
    model = single(m, n)
    mon = SpectralMonitor(model, rank=4)
    mon.snapshot()
    W0 = get_canonical(mon, "q_proj")
    g = torch.Generator().manual_seed(3)
    changed = (torch.rand(m, n, generator=g) > 0.3).double()
    set_canonical(mon, "q_proj", W0 + 0.01 * changed * torch.randn(m, n, generator=g, dtype=torch.float64))
    Wt = get_canonical(mon, "q_proj")
    exact = ((Wt - W0).abs() <= 1e-3 * torch.maximum(Wt.abs(), W0.abs())).double().mean().item()
    assert 0.29 < exact < 0.31
    assert val(mon.measure(1), "sparsity", "q_proj") == pytest.approx(exact, abs=0.01)


def test_small_layers_share_a_batch_across_ranks_and_a_zero_update_layer():
    """Same-shape layers under SMALL_LAYER weights form one batch even after their ranks diverge;
    a layer whose update is zero does not make the others lose align_prev or their warm start."""
    m, n, names = 64, 48, ["a", "b", "c"]
    model = nn.ModuleDict({k: nn.Linear(n, m, bias=False) for k in names})
    mon = SpectralMonitor(model, rank=4, adaptive_rank=False)
    mon.snapshot()
    W0 = {k: get_canonical(mon, k) for k in names}
    mon._state(mon.specs[0]).rank = 8  # as after an adaptive increase
    for step in (1, 2):
        for i, k in enumerate(names[:2]):  # "c" never changes
            set_canonical(mon, k, W0[k] + step * _realistic(m, n, seed=i, r=3, noise=1e-3))
        assert len(batches(mon)) == 1
        r = mon.measure(step)
    assert val(r, "rank", "a") == val(r, "rank", "b") == 8.0  # the batch's larger rank
    for k in names[:2]:
        assert val(r, "align_prev", k) == pytest.approx(1.0, abs=1e-3)  # same directions, twice as large
    assert "spectral/align_prev/c" not in r.metrics and val(r, "update_norm", "c") == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_and_float32_sketches_agree_and_cuda_buffers_are_released():
    """On a GPU the engine's two sketch dtypes give the same metrics (bf16 within ~1e-3), the
    workspace goes back to the caching allocator after each measurement, and the RNG is untouched."""
    m, n, names = 1024, 1536, ["a", "b"]  # over SMALL_LAYER: bf16 under "auto" on sm80+
    torch.manual_seed(0)
    model = nn.ModuleDict({k: nn.Linear(n, m, bias=False) for k in names}).cuda()
    deltas = {k: _realistic(m, n, seed=10 * i).float().cuda() for i, k in enumerate(names)}
    state = torch.cuda.get_rng_state()
    reports = {}
    for dtype in ("float32", "auto"):
        mon = SpectralMonitor(model, rank=8, sketch_dtype=dtype, adaptive_rank=False)
        mon.snapshot()
        with torch.no_grad():
            for k in names:
                model[k].weight += deltas[k]
        reports[dtype] = mon.measure(1)
        assert mon.workspace_bytes == 0
        with torch.no_grad():
            for k in names:
                model[k].weight -= deltas[k]
    assert torch.equal(torch.cuda.get_rng_state(), state)
    for k in names:
        r32, r16 = reports["float32"], reports["auto"]
        assert val(r16, "update_norm", k) == pytest.approx(val(r32, "update_norm", k), rel=1e-6)
        assert val(r16, "sigma1", k) == pytest.approx(val(r32, "sigma1", k), rel=1e-3)
        assert val(r16, "rho1", k) == pytest.approx(val(r32, "rho1", k), abs=1e-3)


# ------------------------------------------------------------------ adaptive rank
def test_rank_doubles_when_a_power_law_tail_runs_past_the_sketch():
    """σ_i ∝ i^(-1/3) (α = 2.5) over 200 directions: the top-16 fit reaches the cut with a small D."""
    m = n = 256
    model = single(m, n)
    mon = SpectralMonitor(model, rank=16, intruders=False)
    mon.snapshot()
    s = 0.1 * torch.arange(1, 201, dtype=torch.float64) ** (-1 / 3)
    set_canonical(mon, "q_proj", get_canonical(mon, "q_proj") + (orthonormal(m, 200, 1) * s) @ orthonormal(n, 200, 2).T)
    r = mon.measure(1)
    assert val(r, "alpha_tail", "q_proj") == 16.0 and val(r, "alpha_ks", "q_proj") < 0.1
    assert mon._state(mon.specs[0]).rank == 32
    assert val(mon.measure(2), "rank", "q_proj") == 32.0


# ------------------------------------------------------------------ what new users hit
def test_over_budget_layer_keeps_working_after_the_first_measurement():
    """A layer over the memory budget is streamed at every measurement, warm ones included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    mon = SpectralMonitor(model, memory_budget_mb=1, rank=8, strict=True)
    mon.snapshot()
    W0 = model[0].weight.detach().clone()
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.copy_(W0 + step * 0.1 * torch.outer(unit(1024, 1), unit(1024, 2)).float())
        r = mon.measure(step)
        assert not r.skipped
        assert val(r, "sigma1", "0") == pytest.approx(0.1 * step, rel=1e-4)
        assert val(r, "rho1", "0") == pytest.approx(1.0, abs=1e-5)
    assert val(r, "align_prev", "0") == pytest.approx(1.0, abs=1e-5)


def test_frozen_layers_are_not_monitored_and_said_so_once(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    for layer in model[:2]:
        layer.weight.requires_grad_(False)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    mon = SpectralMonitor(model, layers="re:.")
    assert [s.name for s in mon.specs] == ["2"]
    [msg] = [r.getMessage() for r in caplog.records if "frozen" in r.getMessage()]
    assert "2 of 3" in msg and "include_frozen=True" in msg
    assert [s.name for s in SpectralMonitor(model, layers="re:.", include_frozen=True).specs] == ["0", "1", "2"]


def test_zero_update_layers_do_not_enter_the_aggregates():
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    mon = SpectralMonitor(model, layers="re:.", include_frozen=True)
    mon.snapshot()
    with torch.no_grad():
        model[1].weight.add_(0.5 * torch.outer(unit(16, 1), unit(16, 2)).float())
    r = mon.measure(1)
    assert r.aggregate("rho1") == pytest.approx(1.0, abs=1e-5)  # the moving layer only, not (1 + 0) / 2
    assert r.model["layers"] == 1.0 and r.model["zero_update"] == 1.0


def test_a_replaced_module_is_skipped_with_a_reason(caplog):
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    mon = SpectralMonitor(model, layers="re:.")
    mon.snapshot()
    model["a"] = nn.Linear(8, 8)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    r1, r2 = mon.measure(1), mon.measure(2)
    assert "replaced" in r1.skipped["a"] and "a" not in r1.layers and "b" in r1.layers
    assert "a" in r2.skipped
    assert len([r for r in caplog.records if "replaced" in r.getMessage()]) == 1


def test_a_model_on_the_meta_device_is_refused_at_start():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    mon = SpectralMonitor(model, layers="re:.")
    with pytest.raises(ConfigError, match="meta device"):
        mon.snapshot()


def test_no_layer_left_says_which_option_removed_them(caplog):
    model = nn.ModuleDict({"dense": nn.Linear(8, 8)})
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert SpectralMonitor(model, layers="re:.", exclude="dense").specs == []
    assert any("exclude=['dense'] removes all 1 layers" in r.getMessage() for r in caplog.records)


def test_out_of_memory_retries_smaller_batches_then_skips(monkeypatch, caplog):
    """An allocation failure on a batch of four layers: halves, then single layers, measured exactly
    as before; a layer that still does not fit (on the CPU) is skipped, each step said once."""
    m, n = 64, 48
    model = nn.ModuleDict({f"l{i}": nn.Linear(n, m, bias=False) for i in range(4)})
    ref = SpectralMonitor(model, layers="re:.", rank=4)
    mon = SpectralMonitor(model, layers="re:.", rank=4)
    ref.snapshot()
    mon.snapshot()
    with torch.no_grad():
        for i, layer in enumerate(model.values()):
            layer.weight.add_((i + 1) * 0.1 * torch.outer(unit(m, i), unit(n, i + 7)).float())
    want = ref.measure(1)
    real = updates_mod.randomized_svd

    def tight(A, rank, **kw):
        if A.dim() == 3 and A.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(A, rank, **kw)

    monkeypatch.setattr(updates_mod, "randomized_svd", tight)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    got = mon.measure(1)
    assert not got.skipped
    for name in model:
        assert val(got, "sigma1", name) == pytest.approx(val(want, "sigma1", name), rel=1e-5)
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1

    def never(A, rank, **kw):
        raise MemoryError()

    monkeypatch.setattr(updates_mod, "randomized_svd", never)
    again = mon.measure(2)
    assert set(again.skipped) == set(model) and all("MemoryError" in r for r in again.skipped.values())


def test_a_measurement_runs_on_one_cpu_thread_and_restores_the_callers(monkeypatch):
    seen = []
    real = updates_mod.randomized_svd

    def spy(A, rank, **kw):
        seen.append(torch.get_num_threads())
        return real(A, rank, **kw)

    monkeypatch.setattr(updates_mod, "randomized_svd", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mon = SpectralMonitor(single(16, 12), rank=4)
        mon.snapshot()
        mon.measure(1)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        free = SpectralMonitor(single(16, 12), rank=4, threads=None)
        free.snapshot()
        free.measure(1)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
