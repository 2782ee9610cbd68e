"""Lightning adapter: ``Trainer(callbacks=[SpectralMonitorCallback()])`` (checked against lightning 2.6).

* **Start** (``on_train_start``): build the run and take the base, unless a checkpoint restored one.
  Not ``on_fit_start``: DeepSpeed/FSDP/ModelParallel restore the checkpoint (and call
  ``load_state_dict``) after it; by ``on_train_start`` weights, callback state and
  ``trainer.global_step`` are all restored.
* **Measure** (``on_train_batch_end``): Lightning has no hook after the optimizer step and this one
  fires per micro-batch, so the callback measures when ``trainer.global_step`` changed (once per
  optimizer step with gradient accumulation); ``on_train_end`` measures the last step.
* **Log**: the overview (each aggregate's mean, a few extremes, alert flags, probes) goes to every
  logger with ``logger.log_metrics(step=global_step)`` (immediate, not throttled by
  ``log_every_n_steps``; step = optimizer steps taken, the weights Lightning's own ``self.log``
  values at that x-axis step were computed with); every model-level key goes into
  ``trainer.callback_metrics`` (a dict Lightning clears only before training starts), so
  ``EarlyStopping``/``ModelCheckpoint`` can monitor them. The per-layer table and heatmaps (per-layer
  scalars with ``log_layers=True``) go to the TensorBoard writer / W&B run of the trainer's loggers,
  everything to ``default_root_dir/spectral_monitor/metrics.jsonl``.
* **Stop**: alerts with ``early_stop=True`` set ``trainer.should_stop`` (reduced across ranks), reason logged.
* **Resume**: ``on_save_checkpoint`` writes the base once (rank 0) to a file of its own and stores
  the run state with its path in the checkpoint, so a resumed run compares against the original base.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from spectral_monitor._imports import require
from spectral_monitor.integrations.session import MonitorSession
from spectral_monitor.records import PREFIX
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import Sink

L = require("lightning.pytorch", "spectral_monitor.integrations.lightning")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")


class SpectralMonitorCallback(L.Callback):
    """Spectral monitoring for ``lightning.pytorch.Trainer``.

    ``config`` or its fields as keyword arguments (``SpectralMonitorCallback(every_n_steps=50)``);
    ``sinks``: extra sinks; ``report_to_sinks=False`` turns off the automatic logger/JSONL sinks;
    ``rules`` / ``early_stop`` as in :class:`~spectral_monitor.run.MonitorRun`; ``probe``: held-out
    batches (dicts of tensors the module's ``forward`` takes as keyword arguments, returning logits)
    or a :class:`~spectral_monitor.probes.Probe`, measured against the base for ``knowledge_loss``;
    ``log_layers``: also send per-layer scalars to the loggers (the table and heatmaps go anyway);
    ``substitution``: a :class:`~spectral_monitor.substitution.PeriodicSubstitution`.
    ``last_decision`` holds the latest measurement's :class:`~spectral_monitor.run.Decision`.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        sinks: list[Sink] | None = None,
        rules: list | None = None,
        early_stop: bool = False,
        report_to_sinks: bool = True,
        probe: Any = None,
        log_layers: bool = False,
        substitution: Any = None,
        **kwargs: Any,
    ) -> None:
        self.session = MonitorSession(
            config,
            sinks=sinks,
            rules=rules,
            early_stop=early_stop,
            report_to_sinks=report_to_sinks,
            probe=probe,
            log_layers=log_layers,
            substitution=substitution,
            **kwargs,
        )
        self.config = self.session.config
        self._restored: dict | None = None
        self._last_step = -1

    @property
    def run(self) -> MonitorRun | None:
        return self.session.run

    @property
    def last_decision(self) -> Decision:
        return self.session.last_decision

    def _backend_sinks(self, trainer: Any) -> list[Sink]:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        sinks: list[Sink] = []
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                layers = self.session.log_layers
                sinks.append(TensorBoardSink(writer=logger.experiment, log_model=False, log_layers=layers))
            elif isinstance(logger, WandbLogger):
                from spectral_monitor.sinks.wandb import WandbSink

                step_key, layers = "trainer/global_step", self.session.log_layers
                sinks.append(WandbSink(logger.experiment, step_key=step_key, log_model=False, log_layers=layers))
        return sinks

    # ---------------------------------------------------------------- events
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        restored, self._restored = self._restored, None
        self.session.begin(
            pl_module,
            trainer.default_root_dir,
            fresh=trainer.global_step == 0 and restored is None,
            is_main=trainer.is_global_zero,
            backend_sinks=self._backend_sinks(trainer) if self.session.report_to_sinks else (),
        )
        if restored is not None or trainer.global_step > 0:
            self.session.restore(restored, step=trainer.global_step, where="the checkpoint")
        self.session.start()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.run is None or step == self._last_step:
            return  # a micro-batch without an optimizer step
        self._last_step = step
        self._step(trainer, step, final=trainer.max_steps > 0 and step >= trainer.max_steps)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self._step(trainer, trainer.global_step, final=True)
            self.session.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.finish()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restored = None  # state loaded by validate/test(ckpt_path=...) must not leak into a later fit

    def _step(self, trainer: Any, step: int, final: bool) -> None:
        due = self.run.should_measure(step, final=final)
        if due:  # the trainer's own scalars (loss, ...) logged beside the spectra
            self.run.record_context(
                {
                    k: v.item()
                    for k, v in trainer.callback_metrics.items()
                    if not k.startswith(f"{PREFIX}/") and isinstance(v, torch.Tensor) and v.numel() == 1
                }
            )
        decision = self.session.step(step, final=final)  # every step: the schedule times training
        if not due:
            return
        stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        if decision.measured:
            overview = decision.overview()
            for logger in trainer.loggers:
                logger.log_metrics(overview, step=step)
            metrics = trainer.callback_metrics  # the persistent dict behind the property
            for key, value in decision.summary().items():
                if not key.startswith(f"{PREFIX}/context/"):
                    metrics[key] = torch.tensor(value)
        if stop:
            for reason in decision.reasons or ("an alert fired on another rank",):
                log.warning("spectral_monitor: stopping training at step %d: %s", step, reason)
            trainer.should_stop = True

    # ----------------------------------------------------------------- state
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Persist the base (once) and store the run state with its path under this callback's key."""
        if self.run is not None:
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.session.checkpoint_state(
                is_main=trainer.is_global_zero
            )

    def state_dict(self) -> dict[str, Any]:
        return {}  # written by on_save_checkpoint, which may also write the base file

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
