"""The report's figures, drawn with matplotlib's object API (no pyplot, no global state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`png` renders one to PNG bytes.
Sizes are in inches at :data:`SCALE` CSS pixels per inch on the page (the HTML shows each PNG at
``width / DPI * SCALE`` pixels, so text keeps its point size and stays sharp on high-DPI screens).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spectral_monitor._imports import require
from spectral_monitor.records import StepReport
from spectral_monitor.report import data

__all__ = ["DPI", "SCALE", "alert_timeline", "heatmaps", "png", "spectra", "trend_panels", "trends"]

#: PNG resolution (dots per figure inch)
DPI = 150
#: CSS pixels per figure inch on the page
SCALE = 100
#: colour of a cell without a value (not measured, or α without a reliable fit)
BLANK = "#f0f0f0"
ALERT = "#d62728"
#: metrics of the heatmaps: (metric, title, colormap)
HEATMAPS = (
    ("rho1", "ρ₁  rank-1 energy share", "viridis"),
    ("alpha", "α  power-law exponent (reliable fits)", "magma"),
    ("erank", "effective rank", "plasma"),
)
#: trainer context shown first when logged (others follow alphabetically)
CONTEXT_FIRST = ("loss", "reward", "kl", "entropy", "eval_loss")
#: at most this many context and probe panels each
MAX_SERIES = 12


def _figure(width: float, height: float) -> Any:
    """A free-standing figure (Agg canvas, constrained layout), never registered with pyplot."""
    require("matplotlib", "spectral-monitor report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> bytes:
    """The figure as PNG bytes at :data:`DPI`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Log-axis ticks over ``[lo, hi]`` labelled as plain numbers (``0.02``, ``50``): at 1, 2 and 5
    times powers of ten when the axis spans at most two decades, else at powers of ten (at most
    eight labels); minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8 if decades > 8 else 12))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _span(lo: float, hi: float, least: float) -> tuple[float, float]:
    """``(lo, hi)`` widened around its centre to at least ``least`` times the centre's magnitude (a
    near-constant series then shows as flat instead of magnifying float noise into full scale)."""
    centre, half = (lo + hi) / 2, max(hi - lo, least * abs(lo + hi) / 2, 1e-12) / 2
    return centre - half, centre + half


def _step_ticks(steps: Sequence[int], most: int) -> tuple[list[int], list[str]]:
    """Column positions and labels for at most ``most`` evenly spread step labels."""
    if not steps:
        return [], []
    idx = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), most)).round().astype(int))
    return idx.tolist(), [str(steps[i]) for i in idx]


def heatmaps(reports: Sequence[StepReport], layers: Sequence[str]) -> Any:
    """Layer × measurement heatmaps of ρ₁, α (reliable fits only) and effective rank, side by side.

    Rows are ``layers`` in the given (model) order, each labelled, with the common name prefix
    removed; blocks (the ``0`` of ``0.attn.c_attn``) are separated by white lines and named on the right.
    Columns are the measurements in step order. Cells without a value are light grey.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    steps = [r.step for r in reports]
    names = data.display_names(layers)
    blocks = data.block_runs(names)
    n = len(layers)
    font = 8.0 if n <= 40 else 7.0 if n <= 100 else 6.5
    row = font * 1.5 / 72  # inches per layer row
    label_w = min(4.0, 0.3 + 0.065 * font * max((len(s) for s in names), default=4))
    panel_w = float(np.clip(1.6 + 0.05 * len(steps), 2.8, 5.5))
    fig = _figure(label_w + 3 * panel_w + (0.6 if blocks else 0.2), 1.6 + n * row)
    axes = fig.subplots(1, 3, sharey=True)
    ticks, labels = _step_ticks(steps, max(2, int(panel_w * 2.2)))
    for k, (ax, (metric, title, cmap_name)) in enumerate(zip(axes, HEATMAPS)):
        values = data.grid(reports, layers, metric)
        finite = values[np.isfinite(values)]
        cmap = colormaps[cmap_name].with_extremes(bad=BLANK)
        if metric == "rho1":
            norm = Normalize(0.0, 1.0)
        elif finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
            norm = LogNorm(finite.min(), finite.max())
        elif finite.size:
            norm = Normalize(*_span(*np.percentile(finite, [2, 98]), 0.1))
        else:
            norm = Normalize(0.0, 1.0)
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        bar = fig.colorbar(image, ax=ax, location="top", shrink=0.9, aspect=30, pad=0.01)
        if isinstance(norm, LogNorm):
            _log_ticks(bar.ax.xaxis, norm.vmin, norm.vmax)
        else:
            bar.ax.xaxis.get_major_formatter().set_useOffset(False)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(title, fontsize=9)
        if not finite.size:
            empty = "no reliable fit" if metric == "alpha" else "not logged"
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555555")
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.tick_params(axis="x", top=n > 40, labeltop=n > 40, length=2)  # tall: steps on both ends
        ax.set_xlabel("step", fontsize=8)
        for _, start, _ in blocks[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=0.9)
        if k == 0:
            ax.set_yticks(range(n), names, fontsize=font)
            ax.tick_params(axis="y", length=2, pad=2)
        if k == 2 and blocks:
            right = ax.twinx()
            right.set_ylim(ax.get_ylim())
            right.set_yticks([(a + b - 1) / 2 for _, a, b in blocks], [key for key, _, _ in blocks], fontsize=font)
            right.tick_params(axis="y", length=0, pad=2)
            right.set_ylabel("block", fontsize=8)
    return fig


def _series(reports: Sequence[StepReport], get) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a per-report scalar, NaN where absent."""
    steps = np.array([r.step for r in reports], dtype=np.float64)
    values = np.array([_finite(get(r)) for r in reports], dtype=np.float64)
    return steps, values


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.nan


def trend_panels(reports: Sequence[StepReport]) -> list[tuple[str, str, Any, Any]]:
    """The trend panels that have data, as ``(group, title, getter, band_getter)``: model aggregates
    (group ``spectral``), then the trainer's context, then the probe. ``band_getter`` returns
    ``(lo, hi)`` for a shaded min–max band, or is None."""

    def agg(metric: str, stat: str):
        return lambda r: r.aggregate(metric, stat)

    def band(metric: str):
        return lambda r: (r.aggregate(metric, "min"), r.aggregate(metric, "max"))

    panels: list[tuple[str, str, Any, Any]] = [
        ("spectral", "ρ₁ mean (min–max)", agg("rho1", "mean"), band("rho1")),
        ("spectral", "effective rank mean (min–max)", agg("erank", "mean"), band("erank")),
        ("spectral", "α mean, reliable fits (min–max)", agg("alpha", "mean"), band("alpha")),
        ("spectral", "‖ΔW‖/‖W₀‖ mean (min–max)", agg("update_rel", "mean"), band("update_rel")),
        ("spectral", "‖ΔW‖_F total", lambda r: r.model.get("update_norm_total"), None),
        ("spectral", "share of reliable α fits", lambda r: r.model.get("alpha_reliable_frac"), None),
        ("spectral", "intruder dimensions (max)", agg("intruders", "max"), None),
    ]
    keep = [p for p in panels if any(not math.isnan(_finite(p[2](r))) for r in reports)]
    if not any(_finite(r.aggregate("intruders", "max")) > 0 for r in reports):  # all 0 or absent: a flat line
        keep = [p for p in keep if not p[1].startswith("intruder")]

    def ordered(names: set[str]) -> list[str]:
        return [n for n in CONTEXT_FIRST if n in names] + sorted(names - set(CONTEXT_FIRST))

    context = ordered({k for r in reports for k in r.context})
    probes = ordered({k for r in reports for k in r.probes})
    keep += [("context", k, (lambda r, k=k: r.context.get(k)), None) for k in context[:MAX_SERIES]]
    keep += [("probe", k, (lambda r, k=k: r.probes.get(k)), None) for k in probes[:MAX_SERIES]]
    return keep


_GROUP_COLOURS = {"spectral": "#1f77b4", "context": "#2ca02c", "probe": "#9467bd"}
_GROUP_TITLES = {"spectral": "", "context": "trainer: ", "probe": "probe: "}


def trends(reports: Sequence[StepReport], panels: Sequence[tuple[str, str, Any, Any]]) -> Any:
    """Small multiples over steps: the model aggregates beside the trainer's context and the
    probe (title colour: blue spectral, green trainer, purple probe). Red lines: steps with alerts
    (dashed: an alert that asked to stop)."""
    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = _figure(3.2 * cols, 0.3 + 2.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    alert_steps = {r.step: any(a.stop for a in r.alerts) for r in reports if r.alerts}
    for ax, (group, title, get, band) in zip(axes, panels):
        steps, values = _series(reports, get)
        colour = _GROUP_COLOURS[group]
        for step, stop in alert_steps.items():
            ax.axvline(step, color=ALERT, alpha=0.35, linewidth=1.0, linestyle="--" if stop else "-")
        shown = values
        if band is not None:
            bounds = np.array([[_finite(v) for v in band(r)] for r in reports], dtype=np.float64)
            ax.fill_between(steps, bounds[:, 0], bounds[:, 1], color=colour, alpha=0.15, linewidth=0)
            shown = np.concatenate([values, bounds.ravel()])
        ax.plot(steps, values, color=colour, linewidth=1.5, marker="o" if len(steps) <= 40 else None, markersize=3)
        shown = shown[np.isfinite(shown)]
        if shown.size and np.ptp(shown) < 0.02 * np.abs(shown).max():  # flat: do not magnify float noise
            ax.set_ylim(*_span(shown.min(), shown.max(), 0.1))
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_title(_GROUP_TITLES[group] + title, fontsize=9, color=colour, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.set_xlabel("step", fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


def spectra(reports: Sequence[StepReport], chosen: Sequence[tuple[str, str]]) -> Any:
    """Log–log rank plots of the chosen layers' last top-k spectrum, λ_i = σ_i² against i, with the
    fitted power law (:func:`data.rank_fit`) over the tail λ ≥ x_min (dashed when the fit is not
    reliable) and x_min as a dotted line."""
    cols = 4 if len(chosen) == 4 else min(3, max(1, len(chosen)))
    rows = math.ceil(max(1, len(chosen)) / cols)
    fig = _figure(3.5 * cols, 0.3 + 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    short = dict(zip(data.layer_order(reports), data.display_names(data.layer_order(reports))))
    for ax, (layer, why) in zip(axes, chosen):
        report, sigma = data.last_spectrum(reports, layer)
        lam = np.sort(sigma[np.isfinite(sigma) & (sigma > 0)] ** 2)[::-1]
        ranks = np.arange(1, len(lam) + 1)
        if not len(lam):  # a zero update: nothing to draw on a log scale
            ax.text(0.5, 0.5, f"{short.get(layer, layer)}: no update", transform=ax.transAxes, ha="center")
            ax.set_axis_off()
            continue
        values = report.layers.get(layer, {})
        alpha, xmin = values.get("alpha", math.nan), values.get("alpha_xmin", math.nan)
        n_tail = int(values.get("alpha_tail", 0) or 0)
        reliable = values.get("alpha_reliable") == 1.0
        fitted = math.isfinite(alpha) and math.isfinite(xmin) and alpha > 1 and n_tail > 0
        # the fit's tail is its n_tail largest values (comparing with x_min would trip over the log's rounding)
        tail = ranks <= (n_tail if fitted else 0)
        if (~tail).any():
            below = "below x_min" if fitted else "λ (no fit)"
            ax.loglog(ranks[~tail], lam[~tail], "o", color="#9a9a9a", markersize=3, label=below)
        if fitted:
            shown = f"{int(tail.sum())} of {n_tail}" if tail.sum() < n_tail else str(n_tail)
            ax.loglog(ranks[tail], lam[tail], "o", color="#1f77b4", markersize=3.5, label=f"tail ({shown})")
            r, line = data.rank_fit(alpha, xmin, n_tail)
            keep = r <= max(len(lam), 1)
            label = f"α = {alpha:.2f}" + ("" if reliable else " (not reliable)")
            ax.loglog(r[keep], line[keep], "-" if reliable else "--", color=ALERT, linewidth=1.5, label=label)
            ax.axhline(xmin, color="#555555", linestyle=":", linewidth=1, label=f"x_min = {xmin:.3g}")
        ax.set_title(f"{short.get(layer, layer)}\n{why} · step {report.step}", fontsize=8, loc="left")
        _log_ticks(ax.xaxis, *ax.get_xlim())
        _log_ticks(ax.yaxis, *ax.get_ylim())
        ax.set_xlabel("rank i", fontsize=7)
        ax.set_ylabel("λᵢ = σᵢ²", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", linewidth=0.4)
        ax.legend(fontsize=7, loc="upper right", framealpha=0.85, edgecolor="none")
    if not chosen:
        axes[0].text(0.5, 0.5, "no spectra logged", transform=axes[0].transAxes, ha="center", va="center")
        axes[0].set_axis_off()
    for ax in axes[max(1, len(chosen)) :]:
        ax.set_visible(False)
    return fig


def alert_timeline(reports: Sequence[StepReport]) -> Any | None:
    """Which rule fired when: one row per rule, a mark per fired alert (a cross when it asked to
    stop), over the measured steps (grey ticks). None when no alert fired."""
    fired = [a for r in reports for a in r.alerts]
    if not fired:
        return None
    rules = list(dict.fromkeys(a.rule for a in sorted(fired, key=lambda a: a.step)))
    fig = _figure(10.0, 0.9 + 0.32 * len(rules))
    ax = fig.subplots()
    steps = [r.step for r in reports]
    ax.plot(steps, [-0.7] * len(steps), "|", color="#9a9a9a", markersize=6)
    for y, rule in enumerate(rules):
        mine = [a for a in fired if a.rule == rule]
        warn = [a.step for a in mine if not a.stop]
        stop = [a.step for a in mine if a.stop]
        ax.plot(warn, [y] * len(warn), "o", color="#ff7f0e", markersize=5)
        ax.plot(stop, [y] * len(stop), "X", color=ALERT, markersize=7)
    ax.set_yticks([-0.7, *range(len(rules))], ["measured", *rules], fontsize=8)
    ax.set_ylim(len(rules) - 0.4, -1.2)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3, linewidth=0.5)
    return fig
