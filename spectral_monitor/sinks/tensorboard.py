"""TensorBoard sink: scalars, singular-value histograms, alert text and a custom-scalars layout.

What :meth:`TensorBoardSink.write` writes at ``global_step=report.step``:

=========================================  =================================================
tag                                        written with
=========================================  =================================================
every ``report.metrics`` key               ``add_scalar`` (float)
``spectral/singular_values/<layer>``       ``add_histogram`` of the layer's top-k σ of ΔW
                                           (finite values; ``histograms=True``)
``spectral/alerts``                        ``add_text``: one Markdown line per alert of the step
``custom_scalars__config__``               ``add_custom_scalars``: category ``spectral`` with one
                                           multiline chart per per-layer metric (regex
                                           ``spectral/<metric>/.*``, every layer in one chart),
                                           category ``spectral model`` with one chart per
                                           aggregated metric (``spectral/model/<metric>_<agg>``)
=========================================  =================================================

The layout needs the metric names, so it is written with the first report and rewritten
when a report brings a new metric; TensorBoard's Custom Scalars dashboard reads the newest
layout of each run (one layout per run: a writer shared with other code that also writes a
layout keeps whichever came last).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from spectral_monitor._imports import require
from spectral_monitor.records import PREFIX, Alert, StepReport

__all__ = ["TensorBoardSink"]

# model keys: spectral/model/<metric>_<agg>[/<layer type>]
_MODEL = f"{PREFIX}/model/"
_AGG_SUFFIX = r"(_(mean|median|min|max))?(/.*)?$"


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
        log_layers: write the per-layer scalars ``spectral/<metric>/<layer>``.
        log_model: write the model-level scalars (off when they reach the same writer through
            the trainer's own logging, as in the Hugging Face and Lightning adapters).
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        writer: Any = None,
        histograms: bool = True,
        flush: bool = True,
        log_layers: bool = True,
        log_model: bool = True,
    ) -> None:
        if writer is None:
            require("tensorboard", "TensorBoardSink")
        self.log_dir = log_dir
        self.histograms = histograms
        self.log_layers = log_layers
        self.log_model = log_model
        self._flush_each_write = flush
        self._writer = writer
        self._owns_writer = False
        self._layout: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

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
        """Write one report's scalars, histograms and alerts at ``report.step``."""
        self._update_layout(report)
        for key, value in report.flat(layers=self.log_layers, model=self.log_model).items():
            self._writer.add_scalar(key, float(value), report.step)
        if self.histograms and hasattr(self._writer, "add_histogram"):
            for layer, spectrum in report.spectra.items():
                finite = spectrum[torch.isfinite(spectrum)]
                if finite.numel():  # add_histogram raises on empty or non-finite input
                    self._writer.add_histogram(f"{PREFIX}/singular_values/{layer}", finite, report.step)
        if report.alerts and hasattr(self._writer, "add_text"):
            self._writer.add_text(f"{PREFIX}/alerts", _alerts_markdown(report.alerts), report.step)
        if self._flush_each_write:
            self._flush()

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
        layer_metrics = set(self._layout[0]) | (
            {m for v in report.layers.values() for m in v} if self.log_layers else set()
        )
        model_metrics = set(self._layout[1])
        if self.log_model:
            model_metrics |= set(report.aggregates) | set(report.model)
        layout = (tuple(sorted(layer_metrics)), tuple(sorted(model_metrics)))
        if layout != self._layout and hasattr(self._writer, "add_custom_scalars"):
            self._writer.add_custom_scalars(_custom_scalars_layout(*layout))
            self._layout = layout


def _custom_scalars_layout(layer_metrics: tuple[str, ...], model_metrics: tuple[str, ...]) -> dict:
    """The ``add_custom_scalars`` layout: one multiline chart per metric (tags are regexes)."""
    spectral = {m: ["Multiline", [f"{PREFIX}/{re.escape(m)}/.*"]] for m in layer_metrics}
    model = {m: ["Multiline", [f"{_MODEL}{re.escape(m)}{_AGG_SUFFIX}"]] for m in model_metrics}
    return {name: charts for name, charts in (("spectral", spectral), ("spectral model", model)) if charts}


def _alerts_markdown(alerts: list[Alert]) -> str:
    """One Markdown line per alert: rule, reason, message, layers, whether it stops training."""
    lines = []
    for a in alerts:
        layers = f" — layers: {', '.join(a.layers)}" if a.layers else ""
        stop = " — **stops training**" if a.stop else ""
        lines.append(f"- **{a.rule}** (`{a.reason}`): {a.message}{layers}{stop}")
    return "\n".join(lines)
