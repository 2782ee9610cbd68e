"""Hugging Face ``Trainer`` adapter: ``callbacks=[SpectralMonitorCallback()]``.

* Base snapshot in ``on_train_begin`` (fresh run) or read back from the checkpoint (resume).
* Measures in ``on_step_end`` (once per optimizer step, weights updated; steps are optimizer
  steps); the last step (``max_steps``, or a stop set by an earlier callback) is always measured.
* Compact model-level keys (every ``spectral/model/<metric>_mean``, a few ``_max``/``_min``,
  ``spectral/alert/<rule>``) go through the base ``transformers.Trainer.log`` (a TRL override would
  steal its buffered reward metrics; ``control.should_log`` is restored so the step's loss line is
  kept): every ``report_to`` backend shows them as ``train/spectral/...``. The rest (per-layer
  ``spectral/<metric>/<layer>``, other aggregates) goes to the trainer's W&B run / TensorBoard
  writer through the sinks; every key, plus ``spectral/context/*`` (the trainer's latest loss,
  reward, ...), to ``output_dir/spectral_monitor/metrics.jsonl`` (a fresh run first moves an older
  run's log there aside, to ``metrics.<time_ns>.jsonl``).
* Alerts with ``early_stop=True`` set ``control.should_training_stop`` (and ``should_save`` unless
  ``save_strategy="no"``) and log the reason.
* Resume: ``on_save`` writes ``checkpoint-N/spectral_monitor.pt`` and, once, the base to
  ``output_dir/spectral_monitor/base-<run id>.safetensors``; a resumed run reads them back itself (no
  ``restore_callback_states_from_checkpoint`` needed): ΔW stays relative to the original base.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectral_monitor._imports import require
from spectral_monitor.alerts import Rule
from spectral_monitor.config import MonitorConfig
from spectral_monitor.records import PREFIX, StepReport
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import LayerMetricsOnly, Sink
from spectral_monitor.sinks.jsonl import JsonlSink
from spectral_monitor.snapshot import load_store, persist

transformers = require("transformers", "spectral_monitor.integrations.hf")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")

STATE_FILE = "spectral_monitor.pt"
MONITOR_DIR = "spectral_monitor"
#: model-level keys besides every ``<metric>_mean`` that go through ``Trainer.log``
TRAINER_EXTRA = {"rho1_max", "alpha_min", "alpha_max", "update_rel_max", "intruders_max", "update_norm_total"}
TRAINER_EXTRA |= {"alpha_reliable_frac", "measure_s"}
CONTEXT = f"{PREFIX}/context/"


def to_trainer_log(key: str) -> bool:
    """True for the compact keys sent through ``Trainer.log`` (the rest go to the sinks)."""
    name = key.removeprefix(f"{PREFIX}/model/")
    if key.startswith(f"{PREFIX}/alert/"):
        return True
    return name != key and "/" not in name and (name.endswith("_mean") or name in TRAINER_EXTRA)


class _NotTrainerKeys(LayerMetricsOnly):
    """Wraps a backend sink: drops the keys that reach that backend through ``Trainer.log``, and the context."""

    def write(self, report: StepReport) -> None:
        keep = {k: v for k, v in report.metrics.items() if not (to_trainer_log(k) or k.startswith(CONTEXT))}
        self.sink.write(replace(report, metrics=keep))


def _calling_trainer() -> tuple[Any | None, str | None]:
    """The ``Trainer`` whose callback handler calls us, and its ``resume_from_checkpoint`` (stack walk)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer):
            resume = frame.f_locals.get("resume_from_checkpoint")
            return obj, resume if isinstance(resume, str) else None
        frame = frame.f_back
    return None, None


class SpectralMonitorCallback(transformers.TrainerCallback):
    """Spectral monitoring for ``transformers.Trainer`` (and every TRL trainer built on it).

    ``config``: a :class:`MonitorConfig`, or its fields as keyword arguments
    (``SpectralMonitorCallback(every_n_steps=50)``). ``sinks``: extra sinks; ``report_to_sinks=False``
    turns the automatic W&B/TensorBoard/JSONL sinks off. ``rules`` / ``early_stop``: alert rules and
    whether they may stop training; ``save_on_stop``: save a checkpoint at that step. ``trainer``:
    optional, found automatically when training starts. After training, ``run`` holds the
    :class:`MonitorRun` and ``last_decision`` the last measurement.
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
        if config is not None and kwargs:
            raise TypeError("pass either config=MonitorConfig(...) or keyword arguments, not both")
        self.config = config if config is not None else MonitorConfig(**kwargs)
        self.extra_sinks = list(sinks or [])
        self.rules = rules
        self.early_stop = early_stop
        self.report_to_sinks = report_to_sinks
        self.save_on_stop = save_on_stop
        self.trainer = trainer
        self.run: MonitorRun | None = None
        self.last_decision = Decision()
        self._base_path: Path | None = None

    def attach(self, trainer: Any) -> SpectralMonitorCallback:
        """Give the callback its trainer explicitly (optional)."""
        self.trainer = trainer
        return self

    def reference_model(self, model: nn.Module) -> nn.Module | None:
        """The module holding the base weights, if the trainer keeps one (the TRL adapter overrides this)."""
        return None

    def _auto_sinks(self, args: Any, fresh: bool) -> list[Sink]:
        path = Path(args.output_dir) / MONITOR_DIR / "metrics.jsonl"
        if fresh and path.exists():  # an earlier run in this output_dir: keep its log, start a new one
            path.rename(path.with_name(f"metrics.{time.time_ns()}.jsonl"))
        sinks: list[Sink] = [JsonlSink(path)]
        for cb in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            name = type(cb).__name__
            wandb = sys.modules.get("wandb")
            if name == "WandbCallback" and wandb is not None and wandb.run is not None:
                from spectral_monitor.sinks.wandb import WandbSink

                sinks.append(_NotTrainerKeys(WandbSink(wandb.run, step_key="train/global_step")))
            elif name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                sinks.append(_NotTrainerKeys(TensorBoardSink(writer=cb.tb_writer)))
        return sinks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer, resume_path = _calling_trainer()
        self.trainer = trainer or self.trainer
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        self._base_path = None
        fresh = state.global_step == 0 and state.is_world_process_zero
        self.run = MonitorRun(
            model,
            self.config,
            sinks=(self._auto_sinks(args, fresh) if self.report_to_sinks else []) + self.extra_sinks,
            rules=self.rules,
            early_stop=self.early_stop,
            reference=self.reference_model(model),
            is_main=state.is_world_process_zero,
        )
        ckpt = Path(resume_path or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if state.global_step > 0 and not self._resume(ckpt):
            log.warning(
                "spectral_monitor: resumed at step %d without %s; the base is taken NOW, so updates are "
                "measured from the resume point, not from the original base",
                state.global_step,
                ckpt / STATE_FILE,
            )
        self.run.start()  # snapshots only when no base was restored
        return control

    def _resume(self, ckpt: Path) -> bool:
        if not (ckpt / STATE_FILE).exists():
            return False
        saved = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        if saved.get("base_path") is not None:  # else: reference model or LoRA factors, still in the trainer
            recorded = Path(saved["base_path"])  # else: the same file beside a moved output_dir
            found = [p for p in (recorded, ckpt.parent / MONITOR_DIR / recorded.name) if p.exists()]
            if not found:
                return False
            kind = "device" if self.config.base_store in ("auto", "reference") else self.config.base_store
            self.run.monitor.set_base(load_store(found[0], kind, self.run.monitor.specs))
            self._base_path = found[0]
        self.run.load_state_dict(saved["run"])  # after set_base, which would drop the cached base facts
        log.info("spectral_monitor: resumed from %s (base %s)", ckpt, self._base_path or "reference/LoRA")
        return True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is not None and logs:
            self.run.record_context({k: v for k, v in logs.items() if not k.startswith(f"{PREFIX}/")})
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.run is None:
            return control
        final = control.should_training_stop or (state.max_steps > 0 and state.global_step >= state.max_steps)
        decision = self.run.on_optimizer_step(state.global_step, final=final)
        if not decision.measured:
            return control
        self.last_decision = decision
        logs = {k: v for k, v in decision.summary().items() if to_trainer_log(k)}
        if logs and self.trainer is not None:
            should_log = control.should_log  # Trainer.log -> on_log resets it: the loss line would be lost
            transformers.Trainer.log(self.trainer, logs)
            control.should_log = should_log
        if decision.stop:
            for reason in decision.reasons:
                log.warning("spectral_monitor: stopping training at step %d: %s", state.global_step, reason)
            control.should_training_stop = True
            control.should_save = control.should_save or (self.save_on_stop and args.save_strategy != "no")
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.run is None or not state.is_world_process_zero:
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        store = self.run.monitor.store
        if store is not None and store.kind != "reference" and self._base_path is None:
            name = f"base-{uuid.uuid4().hex[:12]}.safetensors"  # per run: a later fresh run never replaces it
            self._base_path = persist(store, self.run.monitor.specs, Path(args.output_dir) / MONITOR_DIR / name)
        if ckpt.is_dir():
            base = str(self._base_path) if self._base_path else None
            torch.save({"run": self.run.state_dict(), "base_path": base}, ckpt / STATE_FILE)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.finish()
        return control
