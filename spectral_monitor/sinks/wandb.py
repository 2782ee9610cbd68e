"""Weights & Biases sink: scalars, a per-layer table, layer × step heatmaps and alerts.

What one :meth:`WandbSink.write` logs, in a single ``run.log`` call (one history row):

=============================  ===========================================================
key                            value
=============================  ===========================================================
the overview keys              floats (:meth:`StepReport.overview`: ``spectral/model/rho1_mean``,
                               alert flags, probe values, ...; ``log_model=True``)
``spectral/<metric>/<layer>``  floats, only with ``log_layers=True``
``spectral/layers``            ``wandb.Table``: one row per layer, columns ``layer`` + each
                               per-layer metric (latest values); every ``table_every`` reports
``spectral/heatmap/<metric>``  ``wandb.Image`` of the layer × step heatmap of ``<metric>``
                               (matplotlib only; skipped when it is not installed); same cadence
``spectral/alerts``            ``wandb.Table`` of every alert so far, when a report has alerts
=============================  ===========================================================

:meth:`WandbSink.finish` logs ``spectral/heatmap_table/<metric>``, a long-format
``wandb.Table`` (``step``, ``layer``, ``value``) of the whole run, for custom charts.
Each alert is also sent with ``run.alert`` (``notify=True``); offline runs store it in the
run file and it is sent on ``wandb sync``.

**Steps.** By default the row is logged with ``run.log(..., step=report.step)``, which W&B
keeps open until a later step is logged, so other values logged at the same step join it.
W&B drops (one warning, none when ``WANDB_SILENT``) a row whose ``step`` is below its own
step counter, and merges the next ``log`` without ``step=`` into a row whose ``step`` is ahead.
Both happen when another integration logs to the same run without ``step=`` (Hugging Face's
``WandbCallback``, Lightning's ``WandbLogger``): each of their calls advances the counter by
one, unrelated to the optimizer step. Then pass ``step_key``, the integration's step metric
(``"train/global_step"`` for Hugging Face, ``"trainer/global_step"`` for Lightning): the sink
then logs ``{**metrics, step_key: report.step}`` without ``step=`` and defines ``spectral/*``
to be plotted against ``step_key``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from spectral_monitor._imports import require
from spectral_monitor.errors import ConfigError
from spectral_monitor.records import PREFIX, Alert, StepReport, layer_sort_key
from spectral_monitor.sinks.heatmap import can_draw, heatmap_rgb, heatmap_values

__all__ = ["WandbSink"]

_ALERT_COLUMNS = ["step", "rule", "reason", "message", "layers", "stop"]
_TITLE_MAX = 63  # wandb.alert: title must be shorter than 64 characters


class WandbSink:
    """Log each :class:`StepReport` to a W&B run (see the module docstring for the keys).

    Args:
        run: the run to log to. Default: ``wandb.run`` if a run is active when :meth:`start`
            is called (e.g. the one Hugging Face's ``WandbCallback`` started), else a new
            ``wandb.init(project=project, **init_kwargs)``. Only a run the sink started is
            finished by :meth:`finish`.
        project: W&B project for a run the sink starts.
        log_layers: also log per-layer scalars ``spectral/<metric>/<layer>`` of the metrics in
            :data:`~spectral_monitor.records.LAYER_SCALARS` (hundreds of keys on a real model; the
            per-layer table and the heatmaps carry them without it).
        log_model: log the overview (:meth:`~spectral_monitor.records.StepReport.overview`); off
            when it reaches the run through the trainer's own logging (Hugging Face, Lightning).
        step_key: log the step as this metric instead of ``step=`` (see module docstring).
        table_every: log the per-layer table and heatmap images every this many reports
            (the first report included); 0 turns them off.
        heatmap_metrics: per-layer metrics drawn as layer × step heatmaps (images while
            training, the long-format table at :meth:`finish`); empty turns both off.
        notify: also send each alert with ``run.alert`` (W&B e-mail / Slack notifications).
        init_kwargs: passed to ``wandb.init`` (``dir``, ``name``, ``mode``, ``config``, ...).
    """

    def __init__(
        self,
        run: Any = None,
        *,
        project: str | None = None,
        log_layers: bool = False,
        log_model: bool = True,
        step_key: str | None = None,
        table_every: int = 1,
        heatmap_metrics: Sequence[str] = ("rho1", "alpha", "erank"),
        notify: bool = True,
        **init_kwargs: Any,
    ) -> None:
        if table_every < 0:
            raise ConfigError(f"table_every must be >= 0 (0 turns tables off), got {table_every!r}")
        self._wandb = require("wandb", "WandbSink")
        self._run = run
        self._owns_run = False
        self._project = project
        self._init_kwargs = init_kwargs
        self.log_layers = log_layers
        self.log_model = log_model
        self.step_key = step_key
        self.table_every = table_every
        self.heatmap_metrics = tuple(heatmap_metrics)
        self.notify = notify
        self._reports = 0
        self._last_step: int | None = None
        self._alerts: list[Alert] = []
        # metric -> [(step, {layer: value})], the heatmap history
        self._history: dict[str, list[tuple[int, dict[str, float]]]] = {m: [] for m in self.heatmap_metrics}

    @property
    def run(self) -> Any:
        """The W&B run in use (None before :meth:`start` when none was given)."""
        return self._run

    def start(self, run_config: Mapping[str, Any]) -> None:
        """Attach to (or start) the run, record ``run_config`` under ``config.spectral_monitor``."""
        if self._run is None:
            self._run = self._wandb.run
        if self._run is None:
            self._run = self._wandb.init(project=self._project, **self._init_kwargs)
            self._owns_run = True
        if run_config:
            self._run.config.update({"spectral_monitor": dict(run_config)}, allow_val_change=True)
        if self.step_key is not None:
            self._run.define_metric(self.step_key)
            self._run.define_metric(f"{PREFIX}/*", step_metric=self.step_key)

    def write(self, report: StepReport) -> None:
        """Log one report as one history row (scalars, and tables/images when due)."""
        self._reports += 1
        self._last_step = report.step
        self._record_heatmaps(report)
        scalars = {
            **(report.overview() if self.log_model else {}),
            **(report.layer_scalars() if self.log_layers else {}),
        }
        payload: dict[str, Any] = {k: float(v) for k, v in scalars.items()}
        if self.table_every and (self._reports - 1) % self.table_every == 0:
            payload.update(self._tables(report))
        if report.alerts:
            payload.update(self._alert_rows(report.alerts))
        self._log(payload, report.step)

    def finish(self) -> None:
        """Log the heatmap tables, then finish the run if the sink started it. Safe to call twice."""
        if self._run is None:
            return
        tables = self._heatmap_tables()
        if tables and self._last_step is not None:
            self._log(tables, self._last_step)
        if self._owns_run:
            self._run.finish()
        self._run, self._owns_run = None, False

    def _log(self, payload: dict[str, Any], step: int) -> None:
        if self.step_key is None:
            self._run.log(payload, step=step)
        else:
            self._run.log({**payload, self.step_key: step})

    def _record_heatmaps(self, report: StepReport) -> None:
        for metric, rows in self._history.items():
            if report.layers:  # a blank column where no layer has a value (e.g. no reliable α)
                rows.append((report.step, heatmap_values(report, metric)))

    def _tables(self, report: StepReport) -> dict[str, Any]:
        """The per-layer table of this report and the heatmap images so far."""
        out: dict[str, Any] = {}
        if report.layers:
            metrics = sorted({m for values in report.layers.values() for m in values})
            data = [[layer, *(values.get(m) for m in metrics)] for layer, values in report.layers.items()]
            out[f"{PREFIX}/layers"] = self._wandb.Table(columns=["layer", *metrics], data=data)
        if self._history and can_draw():
            for metric, rows in self._history.items():
                if any(values for _, values in rows):
                    out[f"{PREFIX}/heatmap/{metric}"] = self._wandb.Image(heatmap_rgb(metric, rows))
        return out

    def _alert_rows(self, alerts: list[Alert]) -> dict[str, Any]:
        """Send new alerts (``run.alert``) and return the cumulative alert table."""
        self._alerts.extend(alerts)
        if self.notify:
            for alert in alerts:
                self._run.alert(
                    title=f"spectral_monitor: {alert.rule}"[:_TITLE_MAX],
                    text=f"step {alert.step}: {alert.message}",
                    level="ERROR" if alert.stop else "WARN",
                )
        data = [[a.step, a.rule, a.reason, a.message, ", ".join(a.layers), a.stop] for a in self._alerts]
        return {f"{PREFIX}/alerts": self._wandb.Table(columns=_ALERT_COLUMNS, data=data)}

    def _heatmap_tables(self) -> dict[str, Any]:
        out = {}
        for metric, rows in self._history.items():
            data = [
                [step, layer, values[layer]]
                for step, values in rows
                for layer in sorted(values, key=layer_sort_key)
                if math.isfinite(values[layer])
            ]
            if data:
                out[f"{PREFIX}/heatmap_table/{metric}"] = self._wandb.Table(
                    columns=["step", "layer", "value"], data=data
                )
        return out
