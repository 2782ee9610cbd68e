"""Per-layer state between measurements: warm starts, sketch widths, subspaces, adaptive rank."""

from __future__ import annotations

import pytest
import torch

from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.metrics import Decomposition, LayerResult
from spectral_monitor.engine.state import (
    COLD_OVERSAMPLE,
    LayerState,
    remember,
    sketch_iterations,
    tail_may_continue,
    warm_start,
)


@pytest.mark.parametrize(
    ("covered", "n_tail", "ks", "grows"),
    [
        (True, 16, 0.01, False),  # the tail ends inside the top-k: nothing to gain
        (False, 32, 0.05, True),  # at the cut and a good fit
        (False, 32, 0.2, True),  # D above alpha_max_ks but below 1.36/sqrt(32) = 0.24: cannot tell yet
        (False, 32, 0.4, False),  # bulk-like edge
        (False, 128, 0.15, False),  # 1.36/sqrt(128) = 0.12
        (False, 0, float("nan"), False),  # no fit
    ],
)
def test_rank_grows_only_while_the_tail_may_continue(covered, n_tail, ks, grows):
    assert tail_may_continue(covered, n_tail, ks, 0.1) is grows


def test_warm_start_takes_previous_subspaces_and_fills_a_missing_one():
    gen = torch.Generator().manual_seed(0)
    a = LayerState(rank=4, prev_v=torch.eye(6)[:, :4])
    b = LayerState(rank=4, prev_v=torch.eye(6)[:, 2:5])  # narrower: the batch uses its 3 columns
    c = LayerState(rank=4)  # last update was zero: random columns
    init = warm_start([a, b, c], 6, gen, torch.device("cpu"))
    assert init.shape == (3, 6, 3)
    assert torch.equal(init[0], torch.eye(6)[:, :3]) and torch.equal(init[1], torch.eye(6)[:, 2:5])
    assert init[2].abs().sum() > 0
    assert warm_start([LayerState(rank=4)], 6, gen, torch.device("cpu")) is None


def test_sketch_iterations_cold_and_warm():
    cfg = MonitorConfig(niter=6, warm_niter=1, oversample=10)
    assert sketch_iterations(cfg, None) == (6, 10 * COLD_OVERSAMPLE)
    assert sketch_iterations(cfg, torch.zeros(1, 4, 2)) == (1, 10)
    assert sketch_iterations(MonitorConfig(niter=5, warm_niter=None), torch.zeros(1, 4, 2))[0] == 5


def _dec(b: int, m: int, n: int, k: int, spectrum: bool = False) -> Decomposition:
    U, V = torch.randn(b, m, k), torch.randn(b, n, k)
    S = torch.ones(b, k)
    return Decomposition(U, S, V, torch.ones(b), None, S if spectrum else None, None)


def test_remember_keeps_subspaces_of_finite_non_zero_updates_only():
    cfg = MonitorConfig(align_k=2, max_rank=64)
    states = [LayerState(rank=8) for _ in range(3)]
    dec = _dec(3, 40, 40, 8)
    tail = {"alpha_tail": 8.0, "alpha_ks": 0.05}
    results = [
        LayerResult(dict(tail), covered=False),  # a power law running past the cut: grow
        LayerResult(dict(tail), zero=True),
        LayerResult({"nonfinite": 1.0}, finite=False),
    ]
    remember(states, dec, results, (40, 40), cfg, warm=True, adapt=True)
    assert torch.equal(states[0].prev_u, dec.U[0, :, :2]) and torch.equal(states[0].prev_v, dec.V[0])
    assert states[0].rank == 10  # doubled, capped at a quarter of the smaller side
    for st in states[1:]:
        assert st.prev_u is None and st.prev_v is None and st.rank == 8


def test_remember_exact_or_full_spectrum_updates_do_not_adapt():
    cfg = MonitorConfig(align_k=2)
    res = [LayerResult({"alpha_tail": 8.0, "alpha_ks": 0.05}, covered=False)]
    exact = [LayerState(rank=8)]
    remember(exact, _dec(1, 100, 100, 8), res, (100, 100), cfg, warm=False, adapt=False)  # LoRA: no warm start
    assert exact[0].prev_v is None and exact[0].prev_u is not None and exact[0].rank == 8
    full = [LayerState(rank=8)]
    remember(full, _dec(1, 100, 100, 8, spectrum=True), res, (100, 100), cfg, warm=True, adapt=True)
    assert full[0].prev_v is not None and full[0].rank == 8
