"""Hugging Face ``Trainer`` adapter: ``callbacks=[SpectralMonitorCallback()]``.

* Base snapshot in ``on_train_begin`` (fresh run) or read back from the checkpoint (resume).
* Measures in ``on_step_end`` (once per optimizer step, weights updated; steps are optimizer
  steps); the last step (``max_steps``, or a stop set by an earlier callback) is always measured.
* The overview (:meth:`~spectral_monitor.records.StepReport.overview`: each aggregate's mean, a few
  extremes, alert flags, probes) goes through the base ``transformers.Trainer.log`` (a TRL
  override would steal its buffered reward metrics; ``control.should_log`` is restored so the
  step's loss line is kept): every ``report_to`` backend shows it as ``train/spectral/...``.
  The per-layer table and layer × step heatmaps (and per-layer scalars with ``log_layers=True``) go to
  the trainer's W&B run / TensorBoard writer through the sinks; every key,
  plus ``spectral/context/*`` (the trainer's latest loss, reward, ...), to
  ``output_dir/spectral_monitor/metrics.jsonl``.
* Alerts with ``early_stop=True`` set ``control.should_training_stop`` (and ``should_save`` unless
  ``save_strategy="no"``) and log the reason.
* Resume: ``on_save`` writes ``checkpoint-N/spectral_monitor.pt`` and, once, the base to
  ``output_dir/spectral_monitor/base-<run id>.safetensors``; a resumed run reads them back itself (no
  ``restore_callback_states_from_checkpoint`` needed): ΔW stays relative to the original base.

The trainer: pass ``trainer=`` or call :meth:`SpectralMonitorCallback.attach`; without either, the
callback finds the ``Trainer`` that calls it by looking up the call stack in ``on_train_begin``.
The checkpoint a run resumes from: ``args.resume_from_checkpoint`` when set, else
``output_dir/checkpoint-<global_step>``, else the ``resume_from_checkpoint`` passed to ``train()``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectral_monitor._imports import require
from spectral_monitor.integrations.session import MonitorSession
from spectral_monitor.records import PREFIX
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import Sink

transformers = require("transformers", "spectral_monitor.integrations.hf")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")

STATE_FILE = "spectral_monitor.pt"


def _calling_trainer() -> tuple[Any | None, str | None]:
    """The ``Trainer`` whose callback handler calls us and the ``resume_from_checkpoint`` passed to its
    ``train()`` (the fallback when no trainer was attached: a walk up the call stack)."""
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
    whether they may stop training; ``save_on_stop``: save a checkpoint at that step. ``probe``:
    held-out data measured against the base at every measurement, for ``knowledge_loss`` — strings or
    ``(prompt, reference)`` pairs (tokenized with the trainer's ``processing_class``), dataset rows
    (text fields, or examples collated with the trainer's data collator), batches of tensors, or a
    :class:`~spectral_monitor.probes.Probe`. ``log_layers``: also send per-layer scalars (hundreds
    of keys) to W&B/TensorBoard; the per-layer table and heatmaps go there anyway. ``substitution``:
    a :class:`~spectral_monitor.substitution.PeriodicSubstitution` (the paper's periodic rank-1
    substitution while training, or an evaluation of the rank-k model). ``trainer``:
    the trainer (optional, see the module doc). After training, ``run`` holds the
    :class:`MonitorRun` and ``last_decision`` the last measurement.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        sinks: list[Sink] | None = None,
        rules: list | None = None,
        early_stop: bool = False,
        report_to_sinks: bool = True,
        save_on_stop: bool = True,
        trainer: Any = None,
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
        self.save_on_stop = save_on_stop
        self.trainer = trainer

    @property
    def run(self) -> MonitorRun | None:
        """The :class:`MonitorRun` of the current (or last) training run."""
        return self.session.run

    @property
    def last_decision(self) -> Decision:
        """The latest measurement's :class:`Decision`."""
        return self.session.last_decision

    def attach(self, trainer: Any) -> SpectralMonitorCallback:
        """Give the callback its trainer explicitly (recommended where the stack walk cannot see it)."""
        self.trainer = trainer
        return self

    def reference_model(self, model: nn.Module) -> nn.Module | None:
        """The module holding the base weights, if the trainer keeps one (the TRL adapter overrides this)."""
        return None

    def _backend_sinks(self) -> list[Sink]:
        """Per-layer series to the trainer's own W&B run and TensorBoard writer (the overview reaches them
        through ``Trainer.log``)."""
        sinks: list[Sink] = []
        for cb in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            name = type(cb).__name__
            wandb = sys.modules.get("wandb")
            if name == "WandbCallback" and wandb is not None and wandb.run is not None:
                from spectral_monitor.sinks.wandb import WandbSink

                layers = self.session.log_layers
                sinks.append(WandbSink(wandb.run, step_key="train/global_step", log_model=False, log_layers=layers))
            elif name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                from spectral_monitor.sinks.tensorboard import TensorBoardSink

                layers = self.session.log_layers
                sinks.append(
                    TensorBoardSink(writer=cb.tb_writer, log_model=False, model_prefix="train/", log_layers=layers)
                )
        return sinks

    def _checkpoints(self, args: Any, state: Any, passed: str | None) -> list[Path]:
        """Where a resumed run's checkpoint may be, most documented first."""
        out = []
        if isinstance(args.resume_from_checkpoint, str):
            out.append(Path(args.resume_from_checkpoint))
        out.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if passed:
            out.append(Path(passed))
        return out

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        found, passed = (None, None) if self.trainer is not None else _calling_trainer()
        self.trainer = self.trainer or found
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        tokenizer = processing_class or getattr(self.trainer, "processing_class", None)
        self.session.begin(
            model,
            args.output_dir,
            fresh=state.global_step == 0,
            is_main=state.is_world_process_zero,
            backend_sinks=self._backend_sinks(),
            reference=self.reference_model(model),
            tokenizer=getattr(tokenizer, "tokenizer", tokenizer),  # a processor wraps its tokenizer
            collate=getattr(self.trainer, "data_collator", None),
            batch_size=args.per_device_eval_batch_size,
        )
        if state.global_step > 0:
            candidates = self._checkpoints(args, state, passed)
            saved_at = next((c for c in candidates if (c / STATE_FILE).exists()), None)
            where, saved = str(saved_at or candidates[0]), None
            if saved_at is not None:
                try:
                    saved = torch.load(saved_at / STATE_FILE, map_location="cpu", weights_only=True)
                except Exception as exc:  # a corrupt or truncated state file must not stop the resume
                    if self.config.strict:
                        raise
                    where = f"{saved_at / STATE_FILE} (unreadable: {type(exc).__name__}: {exc})"
            self.session.restore(saved, step=state.global_step, where=where)
        self.session.start()  # snapshots only when no base was restored
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is not None and logs:
            self.run.record_context({k: v for k, v in logs.items() if not k.startswith(f"{PREFIX}/")})
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.run is None:
            return control
        final = control.should_training_stop or (state.max_steps > 0 and state.global_step >= state.max_steps)
        decision = self.session.step(state.global_step, final=final)
        if not decision.measured:
            return control
        logs = decision.overview()
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
        saved = self.session.checkpoint_state(is_main=True)
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            torch.save(saved, ckpt / STATE_FILE)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.session.finish()
        return control
