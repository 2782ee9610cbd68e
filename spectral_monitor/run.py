"""The run object adapters talk to: engine + alert rules + sinks behind one call.

``run.on_optimizer_step(step) -> Decision`` measures when the schedule says so, judges the
report with the alert rules, writes it to every sink, and tells the adapter what to log and
whether to stop. Nothing in here raises into the training loop unless ``strict=True``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from spectral_monitor.alerts import KnowledgeLoss, Rule, State, default_rules, evaluate
from spectral_monitor.config import MonitorConfig, build_config
from spectral_monitor.distributed import all_reduce_max
from spectral_monitor.engine import SpectralMonitor
from spectral_monitor.errors import BaseMismatchError
from spectral_monitor.probes import Probe
from spectral_monitor.records import StepReport
from spectral_monitor.schedule import Schedule
from spectral_monitor.sinks.base import Sink
from spectral_monitor.substitution import PeriodicSubstitution

__all__ = ["Decision", "MonitorRun"]

log = logging.getLogger("spectral_monitor")


@dataclass(frozen=True)
class Decision:
    """What the adapter should do after an optimizer step.

    ``report`` is None when nothing was measured. ``stop``: early stopping was requested by an
    alert; ``reasons``: the fired alerts' messages.
    """

    report: StepReport | None = None
    stop: bool = False
    reasons: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        return self.report is not None

    def overview(self) -> dict[str, float]:
        """The report's compact overview keys (:meth:`StepReport.overview`), finite values only."""
        if self.report is None:
            return {}
        return {k: v for k, v in self.report.overview().items() if math.isfinite(v)}

    def summary(self) -> dict[str, float]:
        """Model-level aggregates and alert flags only (small enough for ``Trainer.log``)."""
        if self.report is None:
            return {}
        return {k: v for k, v in self.report.model_level().items() if math.isfinite(v)}


class MonitorRun:
    """Composes :class:`SpectralMonitor`, alert rules and sinks.

    ``sinks``: where reports go (written on the main process only, ``is_main``: by default rank 0
    of a distributed job);
    ``rules``: alert rules (default :func:`~spectral_monitor.alerts.default_rules`);
    ``early_stop``: let fired rules request a stop; ``probe``: a held-out
    :class:`~spectral_monitor.probes.Probe` (or its batches) measured against the base at every
    measurement, into ``report.probes`` (what ``knowledge_loss`` judges); ``substitution``: a
    :class:`~spectral_monitor.substitution.PeriodicSubstitution` (rank-k substitution on the
    measurement steps, kept or evaluated and restored). Other keyword arguments
    build the :class:`MonitorConfig` when ``config`` is not given.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MonitorConfig | None = None,
        *,
        sinks: Sequence[Sink] = (),
        rules: Sequence[Rule] | None = None,
        early_stop: bool = False,
        reference: nn.Module | None = None,
        is_main: bool | None = None,
        probe: Probe | Sequence[Mapping[str, Any]] | None = None,
        substitution: PeriodicSubstitution | None = None,
        **kwargs: Any,
    ) -> None:
        self.monitor = SpectralMonitor(model, build_config(config, kwargs, owner="MonitorRun"), reference=reference)
        self.config = self.monitor.config
        self.sinks = list(sinks)
        self.rules = list(default_rules() if rules is None else rules)
        self.probe = probe if probe is None or isinstance(probe, Probe) else Probe(probe)
        self.substitution = substitution
        self.early_stop = early_stop
        self.is_main = (self.monitor.group is None or dist.get_rank() == 0) if is_main is None else is_main
        self.schedule = Schedule(self.config, len(self.monitor.specs))
        self.rule_states: dict[str, State] = {}
        self.context: dict[str, float] = {}
        self._started = False
        self._finished = False
        self._fresh_base = False  # the base was taken by start(), not restored from a checkpoint
        self._disabled: str | None = None  # why the monitor is off for this run
        self._warned: set[str] = set()
        self._broken: set[int] = set()

    # -------------------------------------------------------------- lifecycle
    def start(self, *, snapshot: bool = True, resumed: bool = False) -> None:
        """Take the base (unless one is set or ``snapshot=False``) and start the sinks (also after
        :meth:`finish`, which stops measuring until the next ``start``). ``resumed``: a resumed
        training run (its base, when one is taken now, is late on purpose). A base that cannot be
        taken (e.g. an unwritable ``base_dir``) turns the monitor off for the run, with one warning."""
        if snapshot and not self.monitor.has_base:
            try:
                self.monitor.snapshot()
            except Exception as exc:
                if self.config.strict:
                    raise
                self._disabled = f"the base could not be taken ({type(exc).__name__}: {exc})"
                log.warning("spectral_monitor: %s; the monitor is off for this run", self._disabled)
                return
            self._fresh_base = self.monitor.measurements == 0 and not resumed
        self._start_probe()
        self.schedule.begin(time.perf_counter())
        self._finished = False
        if not self._started:
            self._started = True
            self._each_sink(
                "start",
                {
                    **self.config.to_dict(),
                    "early_stop": self.early_stop,
                    "layers_monitored": [s.name for s in self.monitor.specs],
                    "base": self.monitor.store.describe() if self.monitor.store else {"kind": "lora"},
                    "probe_base": self.probe.base.as_dict() if self.probe is not None and self.probe.base else None,
                },
            )

    def should_measure(self, step: int, *, final: bool = False) -> bool:
        """True when ``step`` was not measured yet and is the first step seen (``measure_first``), on
        the schedule, or ``final``; never after :meth:`finish`. The answer depends only on the steps
        and the schedule, so every rank of a distributed run gets the same one."""
        if self._finished or (self.monitor.last_step is not None and step <= self.monitor.last_step):
            return False
        return self.schedule.due(step, first=self.monitor.measurements == 0, final=final)

    def record_context(self, values: Mapping[str, Any]) -> None:
        """Remember the trainer's latest scalars (reward, kl, loss, ...) to log beside the spectra.

        Plain names are context (``spectral/context/<name>``); keys already in the schema keep their
        place (e.g. :func:`~spectral_monitor.rank_k_probe`'s ``spectral/probe/...`` keys are probes).
        """
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.context[key] = float(value)

    def on_optimizer_step(self, step: int, *, final: bool = False) -> Decision:
        """Call after every optimizer step with the step's number (counted from 1, or from 0)."""
        t0 = time.perf_counter()
        if self._disabled is not None:
            return Decision()
        self.schedule.tick(t0)
        if self._finished:
            self._warn_once("finished", "spectral_monitor: on_optimizer_step() after finish(): not measured")
            return Decision()
        if not self.should_measure(step, final=final):
            return Decision()
        if self._fresh_base and self.monitor.measurements == 0 and step > 1:
            self._warn_once(
                "late",
                f"spectral_monitor: the base was taken at start(), and the first step measured is {step}: ΔW holds "
                "only the updates since start(); call start() before the first optimizer step to see them all",
            )
        if not self._started:
            if not self.monitor.has_base:
                log.warning(
                    "spectral_monitor: MonitorRun.start() was not called before training; the base is taken now, "
                    "after step %d, so the updates of the steps before it are not seen",
                    step,
                )
            self.start()
        everything = final or self.monitor.measurements == 0
        group = self.schedule.group(everything=everything)
        names = None if group is None else [s.name for s in self.monitor.specs[group :: self.schedule.groups]]
        try:
            report = self.monitor.measure(step, names)
        except Exception as exc:
            if self.config.strict:
                raise
            log.warning(
                "spectral_monitor: measurement at step %d failed and was skipped: %s: %s", step, type(exc).__name__, exc
            )
            return Decision()
        for key, value in self.context.items():
            report.put(key, value)
        self._measure_probe(report)
        if self.substitution is not None and self.substitution.due(step, final=final):
            self._substitute(report)
        report.alerts, self.rule_states = evaluate(self.rules, self.rule_states, report, early_stop=self.early_stop)
        patience = {r.name: r.patience for r in self.rules}
        for alert in report.alerts:
            # warn when a rule starts firing; while it keeps firing, the metric and sinks carry it
            newly = self.rule_states[alert.rule]["count"] == patience[alert.rule]
            log.log(logging.WARNING if newly else logging.DEBUG, alert.line())
        measured = len(set(report.layers) | set(report.skipped))
        now = time.perf_counter()
        self.schedule.spent(now - t0, now)
        self.schedule.measured(step, now - t0, layers=measured)
        if self.monitor.group is not None:  # every rank must measure at the same steps
            self.schedule.agree(lambda values: all_reduce_max(values, self.monitor.group))
        if self.schedule.expected > 1.5 * self.config.overhead:
            self._warn_once(
                "budget",
                f"spectral_monitor: a measurement costs {self.schedule.expected:.1%} of training time even "
                f"measuring {1 / self.schedule.groups:.0%} of the layers every {self.schedule.gap} steps "
                f"(budget {self.config.overhead:.1%}): raise max_every, or measure less "
                "(rank, intruders=False, layers=)",
            )
        report.model["overhead"] = self.schedule.overhead
        report.model["coverage"] = measured / max(1, len(self.monitor.specs))
        self._each_sink("write", report)
        stop = any(a.stop for a in report.alerts)
        return Decision(report, stop, tuple(f"{a.rule}: {a.message}" for a in report.alerts if a.stop))

    def finish(self) -> None:
        """Flush and close every sink, and stop measuring (idempotent)."""
        self._finished = True
        if self._started:
            self._each_sink("finish")
            self._started = False

    def _start_probe(self) -> None:
        """Cache the probe's base distribution (unless restored); say once what it costs, or that
        ``knowledge_loss`` has nothing to judge without one."""
        if self.probe is None:
            if any(isinstance(rule, KnowledgeLoss) for rule in self.rules):
                self._warn_once(
                    "no probe",
                    "spectral_monitor: no held-out probe (probe=...): knowledge_loss alerts need one; the spectra "
                    "alone do not detect forgetting",
                )
            return
        if self.probe.has_base:
            return
        try:
            base = self.probe.start(self.monitor.model)
        except Exception as exc:
            if self.config.strict:
                raise
            self._warn_once("probe", f"spectral_monitor: the probe failed and is off: {type(exc).__name__}: {exc}")
            self.probe = None
            return
        log.info(
            "spectral_monitor: probe of %d tokens: base cache %.1f KiB, %.3f s per pass",
            base.tokens,
            self.probe.cache_bytes / 1024,
            base.seconds,
        )

    def _measure_probe(self, report: StepReport) -> None:
        if self.probe is None or not self.probe.has_base:
            return
        try:
            report.probes.update(self.probe.measure(self.monitor.model).as_dict())
        except Exception as exc:
            if self.config.strict:
                raise
            self._warn_once(
                f"probe:{type(exc).__name__}",
                f"spectral_monitor: probe skipped at step {report.step}: {type(exc).__name__}: {exc}",
            )

    def _substitute(self, report: StepReport) -> None:
        try:
            report.probes.update(self.substitution.apply(self.monitor))
        except Exception as exc:
            if self.config.strict:
                raise
            self._warn_once(
                f"substitution:{type(exc).__name__}",
                f"spectral_monitor: substitution skipped at step {report.step}: {type(exc).__name__}: {exc}",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _each_sink(self, method: str, *args: Any) -> None:
        if not self.is_main:
            return
        for sink in self.sinks:
            if id(sink) in self._broken:
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                if self.config.strict:
                    raise
                self._broken.add(id(sink))
                if method != "finish":
                    with contextlib.suppress(Exception):
                        sink.finish()  # release its files; it gets nothing more
                log.warning(
                    "spectral_monitor: sink %s failed in %s() and is disabled for this run: %s: %s",
                    type(sink).__name__,
                    method,
                    type(exc).__name__,
                    exc,
                )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Engine state (may hold tensors), rule states and context."""
        state = {
            "monitor": self.monitor.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rules": self.rule_states,
            "context": dict(self.context),
        }
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a probe built from other batches is retaken, with a warning)."""
        self.monitor.load_state_dict(state["monitor"])
        if state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.rule_states = {k: dict(v) for k, v in state.get("rules", {}).items()}
        self.context = dict(state.get("context", {}))
        if self.probe is not None and state.get("probe") is not None:
            try:
                self.probe.load_state_dict(state["probe"])
            except BaseMismatchError as exc:
                log.warning("spectral_monitor: the saved probe cannot be used (%s); its base is taken anew", exc)
