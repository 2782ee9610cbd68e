"""A layer × step heatmap image of one per-layer metric (matplotlib, for the W&B and TensorBoard sinks)."""

from __future__ import annotations

import logging
import math
from typing import Any

from spectral_monitor._imports import is_available
from spectral_monitor.records import PREFIX, StepReport, display_names, layer_sort_key

__all__ = ["can_draw", "heatmap_rgb", "heatmap_values"]


_SAID: set[str] = set()


def can_draw() -> bool:
    """True when matplotlib is installed; says once (per process) that heatmaps are off without it."""
    if is_available("matplotlib"):
        return True
    if "matplotlib" not in _SAID:
        _SAID.add("matplotlib")
        logging.getLogger("spectral_monitor").warning(
            "spectral_monitor: layer x step heatmaps need matplotlib: pip install 'spectral-monitor[report]'"
        )
    return False


def heatmap_values(report: StepReport, metric: str) -> dict[str, float]:
    """One heatmap column: ``{layer: value}`` of ``metric`` in ``report``; for ``alpha`` NaN (a
    blank cell) where the fit is not reliable: an unreliable α is a number without meaning."""
    values = report.layer_values(metric)
    if metric == "alpha":
        values = {k: v if report.layers[k].get("alpha_reliable") == 1.0 else math.nan for k, v in values.items()}
    return values


def heatmap_rgb(metric: str, rows: list[tuple[int, dict[str, float]]]) -> Any:
    """Render ``rows`` (``[(step, {layer: value})]``) as a layer × step heatmap, layers in model order;
    an ``(H, W, 3)`` uint8 array. Needs matplotlib (the ``report`` extra)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [step for step, _ in rows]
    layers = sorted({layer for _, values in rows for layer in values}, key=layer_sort_key)
    grid = np.full((len(layers), len(steps)), np.nan)
    for j, (_, values) in enumerate(rows):
        for i, layer in enumerate(layers):
            grid[i, j] = values.get(layer, np.nan)
    fig = Figure(figsize=(8, min(2 + 0.2 * len(layers), 20)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e8e8e8")  # blank: not measured / no reliable α
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap)
    fig.colorbar(image, ax=ax, label=metric)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 20)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], rotation=90, fontsize=6)
    ax.set_yticks(range(len(layers)), display_names(layers), fontsize=7 if len(layers) <= 48 else 5)
    ax.set_xlabel("step")
    ax.set_title(f"{PREFIX}/{metric} by layer" + (" (reliable fits)" if metric == "alpha" else ""))
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
