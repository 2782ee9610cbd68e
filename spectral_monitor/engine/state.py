"""What the engine remembers about each layer between measurements, and how it changes.

The previous measurement's subspaces (warm start, alignment over time), W_0's cached top
singular vectors and norm (alignment to the base, intruders, relative update), and the sketch
rank, which grows while a layer's power-law tail runs past it (``adaptive_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.metrics import Decomposition, LayerResult

__all__ = [
    "COLD_OVERSAMPLE",
    "RANDOM_LIKE",
    "LayerState",
    "base_srank_ratio",
    "remember",
    "sketch_iterations",
    "tail_may_continue",
    "warm_start",
]

#: a cold sketch (no previous subspace: the first measurement, or a layer whose last update was 0
#: or NaN) oversamples this many times ``oversample``: near the cut of a slowly decaying spectrum a
#: wider sketch converges where more power iterations barely do
COLD_OVERSAMPLE = 2


@dataclass
class LayerState:
    """One layer's memory (tensors on CPU or the compute device)."""

    rank: int
    prev_u: Tensor | None = None  # (m, align_k) top left singular vectors of the last ΔW
    prev_v: Tensor | None = None  # (n, rank) right subspace, the next sketch's warm start
    base_u: Tensor | None = None  # (m, base_k) top left singular vectors of W_0
    base_v: Tensor | None = None  # (n, base_k) its right ones: the start of the sketch of W_t
    base_fro: float | None = None  # ‖W_0‖_F
    base_sigma1: float | None = None  # σ₁(W_0)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}


#: a base whose stable rank is at least this share of a random matrix's looks like a random
#: initialisation (trained weights are heavy-tailed: their stable rank is far lower)
RANDOM_LIKE = 0.9


def base_srank_ratio(state: LayerState, shape: tuple[int, int]) -> float | None:
    """Stable rank ‖W_0‖_F²/σ₁² over its value for an i.i.d. random matrix of the shape,
    mn/(√m+√n)² (Marchenko–Pastur edge): ≈ 1 for a random initialisation, well below 1 for
    trained weights. None before W_0's basis is known."""
    if not state.base_fro or not state.base_sigma1:
        return None
    m, n = shape
    return (state.base_fro / state.base_sigma1) ** 2 / (m * n / (m**0.5 + n**0.5) ** 2)


def warm_start(states: Sequence[LayerState], n: int, generator: torch.Generator, device: torch.device) -> Tensor | None:
    """The ``(b, n, k0)`` warm start of a batch: each layer's previous right subspace (its first
    ``k0`` columns, the narrowest in the batch), Gaussian columns for a layer without one (its last
    update was zero or NaN); None when no layer has one (a cold sketch)."""
    prev = [s.prev_v for s in states]
    if all(v is None for v in prev):
        return None
    k0 = min(v.shape[-1] for v in prev if v is not None)
    fill = None
    if any(v is None for v in prev):
        fill = torch.randn(n, k0, generator=generator, device=generator.device).to(device)
    return torch.stack([fill if v is None else v[:, :k0].to(device) for v in prev])


def sketch_iterations(config: MonitorConfig, init: Tensor | None) -> tuple[int, int]:
    """``(niter, oversample)`` of a sketch: ``warm_niter`` and ``oversample`` when warm-started,
    else ``niter`` and ``COLD_OVERSAMPLE * oversample``."""
    if init is None:
        return config.niter, config.oversample * COLD_OVERSAMPLE
    return (config.niter if config.warm_niter is None else config.warm_niter), config.oversample


def tail_may_continue(covered: bool, n_tail: float, ks: float, max_ks: float) -> bool:
    """Grow the sketch rank? Only when the fitted tail reaches the smallest kept value (not covered)
    *and* the top-k fit is consistent with a power law: D at most ``max_ks`` or the KS test's 5 %
    critical value 1.36/√n_tail (a short tail cannot tell). A spike-plus-bulk or bulk-like edge
    only adds bulk values and cost when doubled."""
    if covered or not n_tail > 0:
        return False
    return ks <= max(max_ks, 1.36 / math.sqrt(n_tail))  # False for a NaN D (no fit)


def remember(
    states: Sequence[LayerState],
    dec: Decomposition,
    results: Sequence[LayerResult],
    shape: tuple[int, int],
    config: MonitorConfig,
    *,
    warm: bool,
    adapt: bool,
) -> None:
    """Update each layer's state after a measurement: the subspaces the next one starts from and
    aligns with (dropped after a zero or non-finite update); with ``warm`` the right subspace for
    the next sketch's warm start, with ``adapt`` the sketch rank (not after a full-spectrum
    measurement)."""
    m, n = shape
    a = min(config.align_k, dec.S.shape[-1])
    adapt = adapt and dec.spectrum is None and config.adaptive_rank
    for i, (state, res) in enumerate(zip(states, results)):
        keep = res.finite and not res.zero
        state.prev_u = dec.U[i, :, :a].clone() if keep else None
        state.prev_v = dec.V[i].clone() if keep and warm else None
        if not keep or not adapt:
            continue
        v = res.values
        if tail_may_continue(res.covered, v["alpha_tail"], v["alpha_ks"], config.alpha_max_ks):
            state.rank = max(state.rank, min(2 * state.rank, config.max_rank, min(m, n) // 4))
