"""TensorBoard sink: the overview scalars, heatmap images, alert text and a custom-scalars layout.

What :meth:`TensorBoardSink.write` writes at ``global_step=report.step``:

=========================================  =================================================
tag                                        written with
=========================================  =================================================
the overview keys                          ``add_scalar`` (:meth:`StepReport.overview`;
                                           ``log_model=True``)
``spectral/<metric>/<layer>``              ``add_scalar``, only with ``log_layers=True``
                                           (the metrics in ``LAYER_SCALARS``)
``spectral/heatmap/<metric>``              ``add_image``: layer × step heatmap so far
                                           (matplotlib; every ``heatmap_every`` reports)
``spectral/singular_values/<layer>``       ``add_histogram`` of the layer's top-k σ of ΔW
                                           (``histograms=True``)
``spectral/alerts``                        ``add_text``: one Markdown line per alert of the step
``custom_scalars__config__``               ``add_custom_scalars``: category ``spectral overview``
                                           with one multiline chart per overview metric (all
                                           its statistics; tags under ``model_prefix`` too, e.g.
                                           ``train/`` for the keys the HF Trainer logs), category
                                           ``spectral layers`` with one chart per per-layer
                                           metric (every layer in one chart) when ``log_layers``
=========================================  =================================================

TensorBoard's Custom Scalars dashboard reads the newest layout of each run (one layout per run:
a writer shared with other code that also writes a layout keeps whichever came last); the sink
rewrites it when a report brings a new chart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from spectral_monitor._imports import require
from spectral_monitor.records import LAYER_SCALARS, PREFIX, Alert, StepReport
from spectral_monitor.sinks.heatmap import can_draw, heatmap_rgb, heatmap_values

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write each :class:`StepReport` to TensorBoard event files.

    Args:
        log_dir: where a writer the sink creates puts its event files (``None``: torch's
            default ``runs/<date>_<host>``).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with
            ``add_scalar``; ``add_histogram``/``add_text``/``add_custom_scalars``/``flush``
            are used when present) to write to instead, e.g. Lightning's
            ``TensorBoardLogger.experiment``. The sink never closes a writer it was given.
        histograms: write the singular-value histograms.
        flush: flush after every report, so a crash loses nothing already written.
        log_layers: also write per-layer scalars (one tag per layer and metric).
        log_model: write the overview scalars (off when they reach the same writer through the
            trainer's own logging, as in the Hugging Face and Lightning adapters).
        model_prefix: the prefix the overview tags carry when the trainer writes them (``"train/"``
            for the HF Trainer), so the layout's charts find them.
        heatmap_every: write the heatmap images every this many reports (0: never).
        heatmap_metrics: per-layer metrics drawn as layer × step heatmaps.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        writer: Any = None,
        histograms: bool = False,
        flush: bool = True,
        log_layers: bool = False,
        log_model: bool = True,
        model_prefix: str = "",
        heatmap_every: int = 1,
        heatmap_metrics: Sequence[str] = ("rho1", "alpha", "erank"),
    ) -> None:
        if writer is None:
            require("tensorboard", "TensorBoardSink")
        self.log_dir = log_dir
        self.histograms = histograms
        self.log_layers = log_layers
        self.log_model = log_model
        self.model_prefix = model_prefix
        self.heatmap_every = heatmap_every
        self._flush_each_write = flush
        self._writer = writer
        self._owns_writer = False
        self._layout: dict = {}
        self._reports = 0
        self._history: dict[str, list[tuple[int, dict[str, float]]]] = {m: [] for m in heatmap_metrics}

    @property
    def writer(self) -> Any:
        """The writer in use (None before :meth:`start` when none was given)."""
        return self._writer

    def start(self, run_config: Mapping[str, Any]) -> None:
        """Create the writer at ``log_dir`` unless one was given."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
            self._owns_writer = True

    def write(self, report: StepReport) -> None:
        """Write one report's scalars, heatmaps, histograms and alerts at ``report.step``."""
        self._reports += 1
        self._update_layout(report)
        scalars = {
            **(report.overview() if self.log_model else {}),
            **(report.layer_scalars() if self.log_layers else {}),
        }
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), report.step)
        self._write_heatmaps(report)
        if self.histograms and hasattr(self._writer, "add_histogram"):
            for layer, spectrum in report.spectra.items():
                finite = spectrum[torch.isfinite(spectrum)]
                if finite.numel():  # add_histogram raises on empty or non-finite input
                    self._writer.add_histogram(f"{PREFIX}/singular_values/{layer}", finite, report.step)
        if report.alerts and hasattr(self._writer, "add_text"):
            self._writer.add_text(f"{PREFIX}/alerts", _alerts_markdown(report.alerts), report.step)
        if self._flush_each_write:
            self._flush()

    def _write_heatmaps(self, report: StepReport) -> None:
        for metric, rows in self._history.items():
            if report.layers:  # a blank column where no layer has a value (e.g. no reliable α)
                rows.append((report.step, heatmap_values(report, metric)))
        due = self.heatmap_every and (self._reports - 1) % self.heatmap_every == 0
        if not due or not hasattr(self._writer, "add_image") or not can_draw():
            return
        for metric, rows in self._history.items():
            if any(values for _, values in rows):
                image = heatmap_rgb(metric, rows)
                self._writer.add_image(f"{PREFIX}/heatmap/{metric}", image, report.step, dataformats="HWC")

    def finish(self) -> None:
        """Flush; close the writer only if the sink created it. Safe to call twice."""
        if self._writer is None:
            return
        self._flush()
        if self._owns_writer:
            self._writer.close()
            self._writer, self._owns_writer = None, False

    def _flush(self) -> None:
        if hasattr(self._writer, "flush"):
            self._writer.flush()

    def _update_layout(self, report: StepReport) -> None:
        """(Re)write the custom-scalars layout when the report has a chart not in it yet."""
        layout = _custom_scalars_layout(
            sorted(report.aggregates) if self.log_model or self.model_prefix else [],
            [m for m in LAYER_SCALARS if report.layer_values(m)] if self.log_layers else [],
            self.model_prefix,
            probes=bool(report.probes),
        )
        merged = {category: {**self._layout.get(category, {}), **charts} for category, charts in layout.items()}
        merged = {**self._layout, **merged}
        merged = {category: dict(sorted(charts.items(), key=_chart_order)) for category, charts in merged.items()}
        if merged != self._layout and hasattr(self._writer, "add_custom_scalars"):
            self._writer.add_custom_scalars(merged)
            self._layout = merged


#: the custom-scalars charts a person looks at first, in this order; the rest follow by name
_FIRST = ("rho1", "erank", "alpha", "probe", "update_rel", "stable_rank", "intruders", "align_prev", "align_base")


def _chart_order(item: tuple[str, Any]) -> tuple[int, str]:
    name = item[0]
    return (_FIRST.index(name) if name in _FIRST else len(_FIRST), name)


def _custom_scalars_layout(
    model_metrics: Sequence[str], layer_metrics: Sequence[str], prefix: str, *, probes: bool = False
) -> dict:
    """The ``add_custom_scalars`` layout: one multiline chart per metric (tags are regexes)."""
    pre = f"({re.escape(prefix)})?" if prefix else ""
    overview = {
        m: ["Multiline", [f"^{pre}{PREFIX}/model/{re.escape(m)}_(mean|median|min|max)$"]] for m in model_metrics
    }
    if probes:
        overview["probe"] = ["Multiline", [f"^{pre}{PREFIX}/probe/(kl|loss_rel)$"]]
    layers = {m: ["Multiline", [f"^{PREFIX}/{re.escape(m)}/.*"]] for m in layer_metrics}
    return {name: charts for name, charts in (("spectral overview", overview), ("spectral layers", layers)) if charts}


def _alerts_markdown(alerts: list[Alert]) -> str:
    """One Markdown line per alert: rule, reason, message, layers, whether it stops training."""
    lines = []
    for a in alerts:
        layers = f" — layers: {', '.join(a.layers)}" if a.layers else ""
        stop = " — **stops training**" if a.stop else ""
        lines.append(f"- **{a.rule}** (`{a.reason}`): {a.message}{layers}{stop}")
    return "\n".join(lines)
