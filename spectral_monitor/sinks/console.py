"""A concise one-line summary per measurement, through ``logging`` (or ``print``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from spectral_monitor.records import StepReport

__all__ = ["ConsoleSink", "summarize"]


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def summarize(report: StepReport) -> str:
    """``step 50 | 24 layers | rho1 0.31 (max 0.52) | alpha 3.1 (75% reliable) | ...``."""
    agg = report.aggregate
    parts = [
        f"step {report.step}",
        f"{_fmt(report.model.get('layers'), '.0f')} layers",
        f"rho1 {_fmt(agg('rho1'))} (max {_fmt(agg('rho1', 'max'))})",
        f"erank {_fmt(agg('erank'))}",
        f"alpha {_fmt(agg('alpha', 'median'))} ({_fmt(report.model.get('alpha_reliable_frac'), '.0%')} reliable)",
        f"|dW|/|W0| {_fmt(agg('update_rel', 'max'))} max",
        f"align {_fmt(agg('align_prev'))}",
        f"{report.elapsed_s * 1e3:.0f} ms",
    ]
    if "kl" in report.probes:
        parts.append(f"probe KL {report.probes['kl']:.3g}, loss {report.probes.get('loss_rel', math.nan):+.1%}")
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
