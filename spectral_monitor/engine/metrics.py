"""Per-layer metrics of a decomposed batch, and model-level aggregates: pure functions.

:func:`layer_values` turns a :class:`Decomposition` (dense, streamed and LoRA alike) into each
layer's metrics (``docs/metrics.md``) with one host transfer; :func:`aggregate` summarises the
layers of a measurement.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from spectral_monitor.config import MonitorConfig
from spectral_monitor.functional import (
    abs_cosine,
    base_alignment,
    effective_rank,
    energy_share,
    fit_power_law,
    intruder_count,
    spectral_gap,
    stable_rank,
    subspace_overlap,
)

__all__ = ["AGGREGATED", "BY_TYPE", "Decomposition", "LayerResult", "aggregate", "layer_values"]

#: per-layer metrics that get model-level aggregates (mean/median/min/max)
AGGREGATED = (
    "rho1",
    "topk_energy",
    "stable_rank",
    "erank",
    "gap",
    "alpha",
    "update_norm",
    "update_rel",
    "align_prev",
    "overlap_prev",
    "align_base",
    "intruders",
    "sparsity",
)
#: metrics also aggregated per layer type (q/k/v/o/up/down/gate)
BY_TYPE = ("rho1", "alpha", "erank", "update_rel")


@dataclass
class Decomposition:
    """What the decomposition of a batch of b layers of shape (m, n) gives (compute device).

    ``U (b, m, k)``, ``S (b, k)``, ``V (b, n, k)``: top-k SVD of ΔW; ``fro (b,)``: ‖ΔW‖_F²;
    ``sparsity (b,)`` or None; ``spectrum (b, r)`` every non-zero-able singular value (a
    full-spectrum measurement, or an exact LoRA SVD) or None; ``Ut (b, m, top)``: top left vectors of
    W_t for the intruder test, or None.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    fro: Tensor
    sparsity: Tensor | None
    spectrum: Tensor | None
    Ut: Tensor | None


@dataclass
class LayerResult:
    """One layer's outcome: ``values`` (metric -> value; ``{"nonfinite": 1.0}`` for a layer with
    NaN/Inf), whether its update is finite and zero, and whether its α tail is covered by the
    top k (else a larger sketch may pay off)."""

    values: dict[str, float]
    finite: bool = True
    zero: bool = False
    covered: bool = True


def _batched(
    dec: Decomposition,
    base_u: Tensor | None,
    prev_u: Sequence[Tensor | None],
    shape: tuple[int, int],
    cfg: MonitorConfig,
) -> dict[str, Tensor]:
    """Every metric as a ``(b,)`` tensor on the compute device (alignment to the previous
    measurement has placeholders where a layer has none)."""
    U, S, fro = dec.U, dec.S, dec.fro
    m, n = shape
    device = S.device
    if dec.spectrum is not None:
        erank = effective_rank(dec.spectrum)
        fit = fit_power_law(dec.spectrum**2, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks)
    else:
        top_sq = (S.double() ** 2).sum(-1).float()
        erank = effective_rank(S, residual_sq=(fro - top_sq).clamp_min(0), total=min(m, n))
        fit = fit_power_law(S**2, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks, total=min(m, n))
    out: dict[str, Tensor] = {
        "sigma1": S[:, 0],
        "rho1": energy_share(S, fro, 1),
        "topk_energy": energy_share(S, fro),
        "stable_rank": stable_rank(S, fro),
        "erank": erank,
        "gap": spectral_gap(S),
        "alpha": fit.alpha,
        "alpha_ks": fit.ks,
        "alpha_xmin": fit.xmin,
        "alpha_tail": fit.n_tail.float(),
        "alpha_reliable": fit.reliable.float(),
        "alpha_hat": fit.alpha * torch.log10(S[:, 0].clamp_min(1e-30) ** 2),
        "update_norm": fro.sqrt(),
        "_covered": fit.covered.float(),
    }
    if dec.sparsity is not None:
        out["sparsity"] = dec.sparsity
    if any(p is not None for p in prev_u):
        a = min([cfg.align_k, S.shape[-1]] + [p.shape[-1] for p in prev_u if p is not None])
        prev = torch.stack([U[j, :, :a] if p is None else p[:, :a].to(device) for j, p in enumerate(prev_u)])
        out["align_prev"] = abs_cosine(U[:, :, 0], prev[:, :, 0])
        out["overlap_prev"] = subspace_overlap(U[:, :, :a], prev)
    if base_u is not None:
        out["align_base"] = base_alignment(base_u, U[:, :, 0])
    if dec.Ut is not None and base_u is not None:
        out["intruders"] = intruder_count(
            dec.Ut,
            base_u,
            threshold=cfg.intruder_threshold,
            top=dec.Ut.shape[-1],
            truncated=base_u.shape[-1] < min(m, n),
        ).float()
    return out


def layer_values(
    dec: Decomposition,
    *,
    finite: Sequence[bool],
    base_u: Tensor | None,
    base_fro: Sequence[float],
    prev_u: Sequence[Tensor | None],
    shape: tuple[int, int],
    config: MonitorConfig,
) -> list[LayerResult]:
    """Each layer's metrics from its decomposition (one host transfer for the whole batch).

    ``base_u (b, m, K)``: W_0's top-K left singular vectors (None: no ``align_base``, no intruders);
    ``base_fro``: ‖W_0‖_F per layer;
    ``prev_u``: the previous measurement's top left vectors per layer (None: no previous
    direction). Alignments are left out where they are undefined: ``align_prev``/``overlap_prev``
    without a previous direction, every alignment of a zero update (its directions are arbitrary).
    """
    batched = _batched(dec, base_u, prev_u, shape, config)
    keys = list(batched)
    columns = dict(zip(keys, torch.stack([batched[key].float() for key in keys]).cpu().tolist()))
    k = dec.S.shape[-1]
    results = []
    for i, ok in enumerate(finite):
        if not ok:
            results.append(LayerResult({"nonfinite": 1.0}, finite=False))
            continue
        vals = {key: column[i] for key, column in columns.items() if not key.startswith("_")}
        zero = vals["update_norm"] == 0.0
        if prev_u[i] is None or zero:
            vals.pop("align_prev", None)
            vals.pop("overlap_prev", None)
        if zero:
            vals.pop("align_base", None)
        vals["update_rel"] = vals["update_norm"] / base_fro[i] if base_fro[i] else 0.0
        vals["erank_exact"] = 1.0 if dec.spectrum is not None else 0.0
        vals["rank"] = float(k)
        vals["nonfinite"] = 0.0
        results.append(LayerResult(vals, zero=zero, covered=columns["_covered"][i] == 1.0))
    return results


def _usable(metric: str, values: Mapping[str, float]) -> bool:
    """A finite value that may enter an aggregate (an α only when its fit is reliable)."""
    if metric not in values or not math.isfinite(values[metric]):
        return False
    return metric != "alpha" or values.get("alpha_reliable") == 1.0


def aggregate(
    layers: Mapping[str, Mapping[str, float]], types: Mapping[str, str], skipped: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, float]]:
    """Model-level summaries of one measurement.

    ``layers``: layer -> metrics (non-finite layers carry ``nonfinite=1``); ``types``: layer ->
    type; ``skipped``: layers not measured. Returns ``(aggregates, by_type, model)``:
    metric -> {mean, median, min, max} over the layers whose update is finite and non-zero (a
    zero update has no spectrum to summarise), metric -> type -> mean, and ``update_norm_total``
    (‖ΔW‖_F of all layers together), ``alpha_reliable_frac``, ``layers`` (those summarised),
    ``zero_update``, ``skipped``, ``nonfinite``.
    """
    finite = {name: v for name, v in layers.items() if v.get("nonfinite", 0.0) == 0.0}
    measured = {name: v for name, v in finite.items() if v.get("update_norm", 0.0) > 0.0}
    aggregates: dict[str, dict[str, float]] = {}
    for metric in AGGREGATED:
        xs = [v[metric] for v in measured.values() if _usable(metric, v)]
        if xs:
            aggregates[metric] = {
                "mean": statistics.fmean(xs),
                "median": statistics.median(xs),
                "min": min(xs),
                "max": max(xs),
            }
    by_type: dict[str, dict[str, float]] = {}
    for metric in BY_TYPE:
        groups: dict[str, list[float]] = defaultdict(list)
        for name, v in measured.items():
            if _usable(metric, v):
                groups[types[name]].append(v[metric])
        if groups:
            by_type[metric] = {typ: statistics.fmean(xs) for typ, xs in groups.items()}
    model = {
        "update_norm_total": math.sqrt(sum(v["update_norm"] ** 2 for v in measured.values() if "update_norm" in v))
    }
    if measured:
        fitted = [v["alpha_reliable"] for v in measured.values() if "alpha_reliable" in v]
        model["alpha_reliable_frac"] = sum(fitted) / max(1, len(fitted))
    model["layers"] = float(len(measured))
    model["zero_update"] = float(len(finite) - len(measured))
    model["skipped"] = float(skipped)
    model["nonfinite"] = float(sum(v.get("nonfinite", 0.0) for v in layers.values()))
    return aggregates, by_type, model
