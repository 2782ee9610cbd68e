"""Lightning adapter: ``Trainer(callbacks=[SpectralMonitorCallback()])``.

Lightning has no hook after the optimizer step, so the callback measures in
``on_train_batch_end`` when ``trainer.global_step`` changed (once per optimizer step, also
with gradient accumulation). Aggregates go to every attached logger
(``logger.log_metrics``, not throttled) and into ``trainer.callback_metrics`` (so
``EarlyStopping``/``ModelCheckpoint`` can watch them); per-layer series go to the sinks
(the TensorBoard writer / W&B run of the trainer's loggers, plus a JSONL log).
Alerts with ``early_stop=True`` set ``trainer.should_stop`` (reduced across ranks).
Checkpoints carry the callback state and the path of the persisted base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from spectral_monitor._imports import require
from spectral_monitor.alerts import Rule
from spectral_monitor.config import MonitorConfig
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import LayerMetricsOnly, Sink
from spectral_monitor.sinks.jsonl import JsonlSink
from spectral_monitor.snapshot import load_store, persist

L = require("lightning.pytorch", "spectral_monitor.integrations.lightning")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")
MONITOR_DIR = "spectral_monitor"


class SpectralMonitorCallback(L.Callback):
    """Spectral monitoring for ``lightning.pytorch.Trainer``.

    ``config`` or its fields as keyword arguments; ``sinks``: extra sinks;
    ``report_to_sinks=False`` turns off the automatic logger/JSONL sinks; ``rules`` /
    ``early_stop`` as in :class:`~spectral_monitor.run.MonitorRun`.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        sinks: list[Sink] | None = None,
        rules: list[Rule] | None = None,
        early_stop: bool = False,
        report_to_sinks: bool = True,
        **kwargs: Any,
    ) -> None:
        if config is not None and kwargs:
            raise TypeError("pass either config=MonitorConfig(...) or keyword arguments, not both")
        self.config = config if config is not None else MonitorConfig(**kwargs)
        self.extra_sinks = list(sinks or [])
        self.rules = rules
        self.early_stop = early_stop
        self.report_to_sinks = report_to_sinks
        self.run: MonitorRun | None = None
        self.last_decision = Decision()
        self._restored: dict | None = None
        self._base_path: Path | None = None
        self._last_step = -1

    def _auto_sinks(self, trainer: Any) -> list[Sink]:
        sinks: list[Sink] = [JsonlSink(Path(trainer.default_root_dir) / MONITOR_DIR / "metrics.jsonl")]
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "TensorBoardLogger":
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                sinks.append(LayerMetricsOnly(TensorBoardSink(writer=logger.experiment)))
            elif name == "WandbLogger":
                from spectral_monitor.sinks.wandb import WandbSink

                sinks.append(LayerMetricsOnly(WandbSink(logger.experiment, step_key="trainer/global_step")))
        return sinks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        sinks = (self._auto_sinks(trainer) if self.report_to_sinks else []) + self.extra_sinks
        self.run = MonitorRun(
            pl_module,
            self.config,
            sinks=sinks,
            rules=self.rules,
            early_stop=self.early_stop,
            is_main=trainer.is_global_zero,
        )
        if self._restored is not None:
            self.run.load_state_dict(self._restored["run"])
            base = self._restored.get("base_path")
            if base is not None:
                self._base_path = Path(base)
                kind = self.config.base_store if self.config.base_store in ("cpu", "disk") else "device"
                self.run.monitor.set_base(load_store(base, kind, self.run.monitor.specs))
            self._last_step = self.run.monitor.last_step or -1
            self.run.start(snapshot=not self.run.monitor.has_base)
        else:
            self.run.start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.run is None or step == self._last_step:
            return
        self._last_step = step
        final = trainer.max_steps > 0 and step >= trainer.max_steps
        self._apply(trainer, self.run.on_optimizer_step(step, final=final))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is None:
            return
        self._apply(trainer, self.run.on_optimizer_step(trainer.global_step, final=True))
        self.run.finish()

    def _apply(self, trainer: Any, decision: Decision) -> None:
        if not decision.measured:
            return
        self.last_decision = decision
        summary = decision.summary()
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=decision.report.step)
        for key, value in summary.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        if stop:
            for reason in decision.reasons:
                log.warning("spectral_monitor: stopping training: %s", reason)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        if self.run is None:
            return {}
        store = self.run.monitor.store
        if store is not None and store.kind != "reference" and self._base_path is None:
            root = Path(self.config.base_dir or Path(self._trainer_root) / MONITOR_DIR)
            self._base_path = persist(store, self.run.monitor.specs, root / "base.safetensors")
        return {"run": self.run.state_dict(), "base_path": str(self._base_path) if self._base_path else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer_root = trainer.default_root_dir
