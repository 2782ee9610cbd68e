"""In-memory sink for tests and notebooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spectral_monitor.records import StepReport

__all__ = ["MemorySink"]


class MemorySink:
    """Keeps every report in ``self.reports``; ``series(key)`` gives ``[(step, value)]``."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []
        self.config: dict[str, Any] = {}
        self.finished = False

    def start(self, run_config: Mapping[str, Any]) -> None:
        self.config = dict(run_config)

    def write(self, report: StepReport) -> None:
        self.reports.append(report)

    def finish(self) -> None:
        self.finished = True

    def series(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` of one metric key over all reports that have it."""
        return [(r.step, r.metrics[key]) for r in self.reports if key in r.metrics]

    @property
    def alerts(self) -> list:
        return [a for r in self.reports for a in r.alerts]
