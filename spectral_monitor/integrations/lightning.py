"""Lightning adapter: ``Trainer(callbacks=[SpectralMonitorCallback()])`` (checked against lightning 2.6).

* **Start** (``on_train_start``): build the run and take the base, unless a checkpoint restored one.
  Not ``on_fit_start``: DeepSpeed/FSDP/ModelParallel restore the checkpoint (and call
  ``load_state_dict``) after it; by ``on_train_start`` weights, callback state and
  ``trainer.global_step`` are all restored.
* **Measure** (``on_train_batch_end``): Lightning has no hook after the optimizer step and this one
  fires per micro-batch, so the callback measures when ``trainer.global_step`` changed (once per
  optimizer step with gradient accumulation); ``on_train_end`` measures the last step.
* **Log**: model-level aggregates go to every logger with ``logger.log_metrics(step=global_step)``
  (immediate, not throttled by ``log_every_n_steps``; step = optimizer steps taken, the weights
  Lightning's own ``self.log`` values at that x-axis step were computed with) and into
  ``trainer.callback_metrics`` (a dict Lightning clears only before training starts), so
  ``EarlyStopping``/``ModelCheckpoint`` can monitor them. Per-layer series go to the sinks: the
  TensorBoard writer / W&B run of the trainer's loggers and ``default_root_dir/spectral_monitor/metrics.jsonl``.
* **Stop**: alerts with ``early_stop=True`` set ``trainer.should_stop`` (reduced across ranks), reason logged.
* **Resume**: ``state_dict`` carries the run state and the path of the base, written once (rank 0)
  at the first checkpoint to a file of its own, so a resumed run compares against the original base.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import torch

from spectral_monitor._imports import require
from spectral_monitor.alerts import Rule
from spectral_monitor.config import MonitorConfig
from spectral_monitor.records import PREFIX
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import LayerMetricsOnly, Sink
from spectral_monitor.sinks.jsonl import JsonlSink
from spectral_monitor.snapshot import load_store, persist

L = require("lightning.pytorch", "spectral_monitor.integrations.lightning")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")
MONITOR_DIR = "spectral_monitor"
_CONTEXT = f"{PREFIX}/context/"


class SpectralMonitorCallback(L.Callback):
    """Spectral monitoring for ``lightning.pytorch.Trainer``.

    ``config`` or its fields as keyword arguments (``SpectralMonitorCallback(every_n_steps=50)``);
    ``sinks``: extra sinks; ``report_to_sinks=False`` turns off the automatic logger/JSONL sinks;
    ``rules`` / ``early_stop`` as in :class:`~spectral_monitor.run.MonitorRun`.
    ``last_decision`` holds the latest measurement's :class:`~spectral_monitor.run.Decision`.
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
        self._base_dir = Path(MONITOR_DIR)
        self._is_main = True
        self._last_step = -1

    def _auto_sinks(self, trainer: Any) -> list[Sink]:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        sinks: list[Sink] = [JsonlSink(Path(trainer.default_root_dir) / MONITOR_DIR / "metrics.jsonl")]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                sinks.append(LayerMetricsOnly(TensorBoardSink(writer=logger.experiment)))
            elif isinstance(logger, WandbLogger):
                from spectral_monitor.sinks.wandb import WandbSink

                sinks.append(LayerMetricsOnly(WandbSink(logger.experiment, step_key="trainer/global_step")))
        return sinks

    # ---------------------------------------------------------------- events
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        sinks = (self._auto_sinks(trainer) if self.report_to_sinks else []) + self.extra_sinks
        self.run = MonitorRun(
            pl_module,
            self.config,
            sinks=sinks,
            rules=self.rules,
            early_stop=self.early_stop,
            is_main=trainer.is_global_zero,
        )
        self._is_main = trainer.is_global_zero
        self._base_dir = Path(self.config.base_dir or Path(trainer.default_root_dir) / MONITOR_DIR).resolve()
        self._base_path, restored, self._restored = None, self._restored, None
        if restored:
            self.run.load_state_dict(restored["run"])
            if restored.get("base_path"):
                self._reopen_base(restored["base_path"])
        elif trainer.global_step > 0:
            log.warning(
                "spectral_monitor: resumed at step %d without monitor state in the checkpoint; the base is taken "
                "NOW, so updates are measured from the resume point, not the original base",
                trainer.global_step,
            )
        self.run.start(snapshot=not self.run.monitor.has_base)
        self._last_step = trainer.global_step

    def _reopen_base(self, path: str) -> None:
        kind = self.config.base_store if self.config.base_store in ("cpu", "disk") else "device"
        try:
            self.run.monitor.set_base(load_store(path, kind, self.run.monitor.specs))
            self._base_path = Path(path)
        except Exception as exc:
            if self.config.strict:
                raise
            log.warning(
                "spectral_monitor: cannot reopen the base %s (%s: %s); the base is taken NOW, so updates are "
                "measured from the resume point, not the original base",
                path,
                type(exc).__name__,
                exc,
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.run is None or step == self._last_step:
            return  # a micro-batch without an optimizer step
        self._last_step = step
        self._step(trainer, step, final=trainer.max_steps > 0 and step >= trainer.max_steps)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self._step(trainer, trainer.global_step, final=True)
            self.run.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.run is not None:
            self.run.finish()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restored = None  # state loaded by validate/test(ckpt_path=...) must not leak into a later fit

    def _step(self, trainer: Any, step: int, final: bool) -> None:
        # should_measure depends only on the schedule and the step, so every rank takes the same branch
        if not self.run.should_measure(step, final=final):
            return
        context = trainer.callback_metrics  # the trainer's own scalars (loss, ...) logged beside the spectra
        self.run.record_context(
            {
                k: v.item()
                for k, v in context.items()
                if not k.startswith(f"{PREFIX}/") and isinstance(v, torch.Tensor) and v.numel() == 1
            }
        )
        decision = self.run.on_optimizer_step(step, final=final)
        stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        if decision.measured:
            self.last_decision = decision
            summary = {k: v for k, v in decision.summary().items() if not k.startswith(_CONTEXT)}
            for logger in trainer.loggers:
                logger.log_metrics(summary, step=step)
            metrics = trainer.callback_metrics  # the persistent dict behind the property
            for key, value in summary.items():
                metrics[key] = torch.tensor(value)
        if stop:
            for reason in decision.reasons or ("an alert fired on another rank",):
                log.warning("spectral_monitor: stopping training at step %d: %s", step, reason)
            trainer.should_stop = True

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.run is None:
            return {}
        store = self.run.monitor.store
        if store is not None and store.kind != "reference" and self._base_path is None and self._is_main:
            # a file per run: a second run in the same root must not overwrite this run's base
            path = self._base_dir / f"base-{uuid.uuid4().hex[:12]}.safetensors"
            try:
                self._base_path = persist(store, self.run.monitor.specs, path)
            except Exception as exc:  # never fail the checkpoint; a resume then warns and re-snapshots
                if self.config.strict:
                    raise
                log.warning("spectral_monitor: could not write the base to %s: %s: %s", path, type(exc).__name__, exc)
        return {"run": self.run.state_dict(), "base_path": str(self._base_path) if self._base_path else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
