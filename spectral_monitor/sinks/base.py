"""The sink protocol: ``start`` once, ``write`` each report, ``finish`` once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from spectral_monitor.records import StepReport, split_layer_key

__all__ = ["LayerMetricsOnly", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """A back-end that receives every :class:`StepReport`.

    Sinks may raise; the run object catches and logs sink errors once, so a broken back-end
    never stops training (unless strict mode is on).
    """

    def start(self, run_config: Mapping[str, Any]) -> None:
        """Called once before the first report, with the monitor's config as plain data."""

    def write(self, report: StepReport) -> None:
        """Write one report. Must not keep references to tensors it does not own."""

    def finish(self) -> None:
        """Flush and close. Safe to call twice."""


class LayerMetricsOnly:
    """Wraps a sink so it receives only per-layer keys (``spectral/<metric>/<layer>``).

    Adapters use it for back-ends that already get the model-level aggregates through the
    trainer's own logging path, so no key is written twice under two names.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def start(self, run_config: Mapping[str, Any]) -> None:
        self.sink.start(run_config)

    def write(self, report: StepReport) -> None:
        metrics = {k: v for k, v in report.metrics.items() if split_layer_key(k) is not None}
        self.sink.write(replace(report, metrics=metrics))

    def finish(self) -> None:
        self.sink.finish()
