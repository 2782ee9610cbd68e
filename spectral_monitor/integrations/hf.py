"""Hugging Face ``Trainer`` adapter: ``callbacks=[SpectralMonitorCallback()]``.

* Base snapshot in ``on_train_begin`` (a fresh run) or restored from the checkpoint (resume).
* Measures in ``on_step_end`` (weights updated under every backend; once per optimizer step).
* Model-level aggregates go through the trainer's own logging path (``Trainer.log``), so every
  ``report_to`` backend receives them as ``train/spectral/model/...``; per-layer series go to the
  monitor's sinks: a JSONL log in ``output_dir/spectral_monitor/`` always, and the W&B run /
  TensorBoard writer the trainer already uses.
* Alerts with ``early_stop=True`` set ``control.should_training_stop`` (and save a checkpoint).
* Resume: the callback writes ``checkpoint-N/spectral_monitor.pt`` in ``on_save`` and the base
  once to ``output_dir/spectral_monitor/base.safetensors``; a resumed run reads them back
  itself, so it works without ``restore_callback_states_from_checkpoint``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectral_monitor._imports import require
from spectral_monitor.alerts import Rule
from spectral_monitor.config import MonitorConfig
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import LayerMetricsOnly, Sink
from spectral_monitor.sinks.jsonl import JsonlSink
from spectral_monitor.snapshot import load_store, persist

transformers = require("transformers", "spectral_monitor.integrations.hf")
TrainerCallback = transformers.TrainerCallback

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")

STATE_FILE = "spectral_monitor.pt"
MONITOR_DIR = "spectral_monitor"


def find_trainer() -> Any | None:
    """The ``transformers.Trainer`` whose callback handler is calling us (walks the call stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer):
            return obj
        frame = frame.f_back
    return None


class SpectralMonitorCallback(TrainerCallback):
    """Spectral monitoring for ``transformers.Trainer`` (and every TRL trainer built on it).

    ``config``: a :class:`MonitorConfig`, or its fields as keyword arguments
    (``SpectralMonitorCallback(every_n_steps=50)``). ``sinks``: extra sinks beyond the automatic
    ones; ``report_to_sinks=False`` turns the automatic W&B/TensorBoard/JSONL sinks off.
    ``rules`` / ``early_stop``: alert rules and whether they may stop training.
    ``trainer``: optional; found automatically when training starts.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        sinks: list[Sink] | None = None,
        rules: list[Rule] | None = None,
        early_stop: bool = False,
        report_to_sinks: bool = True,
        save_on_stop: bool = True,
        trainer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.config = config if config is not None else MonitorConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("pass either config=MonitorConfig(...) or keyword arguments, not both")
        self.extra_sinks = list(sinks or [])
        self.rules = rules
        self.early_stop = early_stop
        self.report_to_sinks = report_to_sinks
        self.save_on_stop = save_on_stop
        self.trainer = trainer
        self.run: MonitorRun | None = None
        self.last_decision = Decision()
        self._base_path: Path | None = None

    # ------------------------------------------------------------- plumbing
    def attach(self, trainer: Any) -> SpectralMonitorCallback:
        """Give the callback its trainer explicitly (optional)."""
        self.trainer = trainer
        return self

    def reference_model(self, model: nn.Module) -> nn.Module | None:
        """The module holding the base weights, if the trainer already keeps one (TRL overrides)."""
        return None

    def _unwrap(self, model: nn.Module) -> nn.Module:
        return (
            getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        )

    def _auto_sinks(self, args: Any) -> list[Sink]:
        sinks: list[Sink] = [JsonlSink(Path(args.output_dir) / MONITOR_DIR / "metrics.jsonl")]
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if "wandb" in report_to:
            wandb = sys.modules.get("wandb")
            if wandb is not None and wandb.run is not None:
                from spectral_monitor.sinks.wandb import WandbSink

                sinks.append(LayerMetricsOnly(WandbSink(wandb.run, step_key="train/global_step")))
        handler = getattr(self.trainer, "callback_handler", None)
        for cb in getattr(handler, "callbacks", []):
            writer = getattr(cb, "tb_writer", None)
            if type(cb).__name__ == "TensorBoardCallback" and writer is not None:
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                sinks.append(LayerMetricsOnly(TensorBoardSink(writer=writer)))
        return sinks

    def _log(self, control: Any, metrics: dict[str, float]) -> None:
        """Emit through ``transformers.Trainer.log`` without losing the step's own log line.

        The base method is called (TRL's override would swallow its buffered reward metrics),
        and ``control.should_log`` is restored (``on_log`` resets it, which would drop the loss).
        """
        if not metrics or self.trainer is None:
            return
        should_log = control.should_log
        transformers.Trainer.log(self.trainer, dict(metrics))
        control.should_log = should_log

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            self.trainer = find_trainer()
        model = self._unwrap(model)
        sinks = (self._auto_sinks(args) if self.report_to_sinks else []) + self.extra_sinks
        self.run = MonitorRun(
            model,
            self.config,
            sinks=sinks,
            rules=self.rules,
            early_stop=self.early_stop,
            reference=self.reference_model(model),
            is_main=state.is_world_process_zero,
        )
        if state.global_step > 0 and self._resume(args, state):
            self.run.start(snapshot=False)
        else:
            if state.global_step > 0:
                log.warning(
                    "spectral_monitor: resumed at step %d but found no %s in the checkpoint; the base "
                    "is taken NOW, so updates are measured from the resume point, not the original base",
                    state.global_step,
                    STATE_FILE,
                )
            self.run.start()
        return control

    def _resume(self, args, state) -> bool:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if not path.exists():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.run.load_state_dict(saved["run"])
        base = saved.get("base_path")
        if base is not None:
            self._base_path = Path(base)
            kind = (
                "disk"
                if self.config.base_store == "disk"
                else "device"
                if self.config.base_store == "auto"
                else self.config.base_store
            )
            self.run.monitor.set_base(load_store(base, kind, self.run.monitor.specs))
        elif not self.run.monitor.has_base:
            self.run.monitor.snapshot()  # reference model or LoRA: the base is still in the model
        log.info("spectral_monitor: resumed from %s (base %s)", path, base or "reference/LoRA")
        return True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is not None and logs:
            self.run.record_context({k: v for k, v in logs.items() if not k.startswith("spectral/")})
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.run is None:
            return control
        final = state.max_steps > 0 and state.global_step >= state.max_steps
        decision = self.run.on_optimizer_step(state.global_step, final=final)
        if not decision.measured:
            return control
        self.last_decision = decision
        self._log(control, decision.summary())
        if decision.stop:
            for reason in decision.reasons:
                log.warning("spectral_monitor: stopping training: %s", reason)
            control.should_training_stop = True
            if self.save_on_stop:
                control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.run is None or not state.is_world_process_zero:
            return control
        store = self.run.monitor.store
        if store is not None and store.kind != "reference" and self._base_path is None:
            self._base_path = persist(
                store, self.run.monitor.specs, Path(args.output_dir) / MONITOR_DIR / "base.safetensors"
            )
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            torch.save(
                {"run": self.run.state_dict(), "base_path": str(self._base_path) if self._base_path else None},
                ckpt / STATE_FILE,
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.finish()
        return control
