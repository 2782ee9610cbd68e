"""A concise one-line summary per measurement, through ``logging`` (or ``print``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from spectral_monitor.records import StepReport, model_key

__all__ = ["ConsoleSink", "summarize"]


def _fmt(report: StepReport, name: str, spec: str = ".3g") -> str:
    value = report.metrics.get(model_key(name))
    return "-" if value is None else format(value, spec)


def summarize(report: StepReport) -> str:
    """``step 50 | 24 layers | rho1 0.31 (max 0.52) | alpha 3.1 (75% reliable) | ...``."""
    parts = [
        f"step {report.step}",
        f"{_fmt(report, 'layers', '.0f')} layers",
        f"rho1 {_fmt(report, 'rho1_mean')} (max {_fmt(report, 'rho1_max')})",
        f"erank {_fmt(report, 'erank_mean')}",
        f"alpha {_fmt(report, 'alpha_median')} ({_fmt(report, 'alpha_reliable_frac', '.0%')} reliable)",
        f"|dW|/|W0| {_fmt(report, 'update_rel_max')} max",
        f"align {_fmt(report, 'align_prev_mean')}",
        f"{report.elapsed_s * 1e3:.0f} ms",
    ]
    if report.skipped:
        parts.append(f"{len(report.skipped)} skipped")
    if report.alerts:
        parts.append("ALERTS: " + ", ".join(a.rule for a in report.alerts))
    return " | ".join(parts)


class ConsoleSink:
    """Writes :func:`summarize` lines to stdout; to ``logger`` at INFO when one is given or ``use_print=False``."""

    def __init__(self, *, use_print: bool | None = None, logger: logging.Logger | None = None) -> None:
        self.use_print = logger is None if use_print is None else use_print
        self.logger = logger or logging.getLogger("spectral_monitor")

    def start(self, run_config: Mapping[str, Any]) -> None:
        pass

    def write(self, report: StepReport) -> None:
        line = summarize(report)
        if self.use_print:
            print(line, flush=True)
        else:
            self.logger.info(line)

    def finish(self) -> None:
        pass
