"""The pure per-layer metrics and aggregates, on hand-built decompositions."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.metrics import Decomposition, aggregate, layer_values


def _basis(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed))).Q


def test_values_of_a_rank_two_update_by_hand():
    """S = (3, 4)·… planted: ρ₁ = 16/25 with ‖ΔW‖² = 25, stable rank 25/16, gap 4/3, relative norm 5/10."""
    m, n = 12, 10
    U, V = _basis(m, 2, 0), _basis(n, 2, 1)
    S = torch.tensor([[4.0, 3.0]])
    dec = Decomposition(U[None], S, V[None], torch.tensor([25.0]), torch.tensor([0.25]), None, None)
    base_u = torch.cat([U[:, :1], _basis(m, 4, 2)[:, 1:3]], dim=1)  # contains u₁
    base_u = torch.linalg.qr(base_u).Q[None]
    [res] = layer_values(
        dec, finite=[True], base_u=base_u, base_fro=[10.0], prev_u=[None], shape=(m, n), config=MonitorConfig()
    )
    v = res.values
    assert v["update_norm"] == pytest.approx(5.0)
    assert v["update_rel"] == pytest.approx(0.5)
    assert v["rho1"] == pytest.approx(16 / 25)
    assert v["topk_energy"] == pytest.approx(1.0)
    assert v["stable_rank"] == pytest.approx(25 / 16)
    assert v["gap"] == pytest.approx(4 / 3)
    assert v["sigma1"] == 4.0 and v["rank"] == 2.0 and v["sparsity"] == 0.25
    assert v["align_base"] == pytest.approx(1.0, abs=1e-6)
    assert v["erank_exact"] == 0.0 and v["nonfinite"] == 0.0
    assert "align_prev" not in v and "intruders" not in v  # no previous direction, no intruder sketch
    assert res.finite and not res.zero


def test_alignment_to_the_previous_direction_is_sign_free():
    m, n = 8, 6
    U, V = _basis(m, 2, 0), _basis(n, 2, 1)
    dec = Decomposition(U[None], torch.tensor([[2.0, 1.0]]), V[None], torch.tensor([5.0]), None, None, None)
    [res] = layer_values(
        dec, finite=[True], base_u=U[None], base_fro=[1.0], prev_u=[-U], shape=(m, n), config=MonitorConfig(align_k=2)
    )
    assert res.values["align_prev"] == pytest.approx(1.0) and res.values["overlap_prev"] == pytest.approx(1.0)
    assert "sparsity" not in res.values  # not given (a LoRA update)


def test_exact_spectrum_gives_exact_effective_rank():
    m, n = 8, 6
    S = torch.tensor([[2.0, 1.0, 1.0]])
    p = torch.tensor([0.5, 0.25, 0.25])
    dec = Decomposition(_basis(m, 3, 0)[None], S, _basis(n, 3, 1)[None], torch.tensor([6.0]), None, S, None)
    [res] = layer_values(
        dec,
        finite=[True],
        base_u=_basis(m, 2, 3)[None],
        base_fro=[1.0],
        prev_u=[None],
        shape=(m, n),
        config=MonitorConfig(),
    )
    assert res.values["erank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert res.values["erank_exact"] == 1.0


def test_zero_and_non_finite_layers():
    m, n = 6, 5
    dec = Decomposition(torch.zeros(2, m, 2), torch.zeros(2, 2), torch.zeros(2, n, 2), torch.zeros(2), None, None, None)
    zero, bad = layer_values(
        dec,
        finite=[True, False],
        base_u=torch.zeros(2, m, 2),
        base_fro=[1.0, 1.0],
        prev_u=[torch.zeros(m, 2), None],
        shape=(m, n),
        config=MonitorConfig(),
    )
    assert zero.zero and zero.values["update_norm"] == 0.0 and zero.values["rho1"] == 0.0
    assert not {"align_prev", "overlap_prev", "align_base"} & set(zero.values)  # arbitrary directions
    assert bad.values == {"nonfinite": 1.0} and not bad.finite


def test_aggregate_skips_non_finite_layers_and_unreliable_alpha():
    layers = {
        "h.0.q": {"rho1": 0.2, "alpha": 3.0, "alpha_reliable": 1.0, "update_norm": 3.0, "nonfinite": 0.0},
        "h.0.k": {"rho1": 0.6, "alpha": 9.0, "alpha_reliable": 0.0, "update_norm": 4.0, "nonfinite": 0.0},
        "h.1.q": {"nonfinite": 1.0},
    }
    aggregates, by_type, model = aggregate(layers, {"h.0.q": "q", "h.0.k": "k", "h.1.q": "q"}, skipped=1)
    assert aggregates["rho1"] == {"mean": 0.4, "median": 0.4, "min": 0.2, "max": 0.6}
    assert aggregates["alpha"] == {"mean": 3.0, "median": 3.0, "min": 3.0, "max": 3.0}
    assert by_type["rho1"] == {"q": 0.2, "k": 0.6}
    assert model == {
        "update_norm_total": 5.0,
        "alpha_reliable_frac": 0.5,
        "layers": 2.0,
        "zero_update": 0.0,
        "skipped": 1.0,
        "nonfinite": 1.0,
    }
