"""The sink protocol: ``start`` once, ``write`` each report, ``finish`` once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from spectral_monitor.records import StepReport

__all__ = ["Sink"]


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
