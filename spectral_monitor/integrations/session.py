"""What every framework adapter shares: :class:`MonitorSession`.

An adapter translates its framework's events into calls on one session: ``begin`` (build the
run, its run folder and sinks), ``restore`` (a resumed run reopens the original base and the
monitor's state), ``step`` (measure when due; returns the :class:`~spectral_monitor.run.Decision`),
``checkpoint_state`` (persist the base once, return the state to store), ``finish``. Everything
in here is framework-free; the adapters add only their framework's hooks, logging and stop flag.

Run folder: ``<root>/spectral_monitor/`` holds ``metrics.jsonl`` (a fresh run first moves an
older run's log aside, to ``metrics.<time_ns>.jsonl``) and, from the first checkpoint on, the base
``base-<run id>.safetensors`` (one file per fresh run, so a later run never overwrites it).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from spectral_monitor.alerts import Rule
from spectral_monitor.config import MonitorConfig, build_config
from spectral_monitor.probes import make_probe
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.base import Sink
from spectral_monitor.sinks.jsonl import JsonlSink
from spectral_monitor.snapshot import load_store, persist
from spectral_monitor.substitution import PeriodicSubstitution

__all__ = ["MONITOR_DIR", "MonitorSession"]

log = logging.getLogger("spectral_monitor")

MONITOR_DIR = "spectral_monitor"


class MonitorSession:
    """The framework-free half of an adapter (see the module doc).

    ``config``: a :class:`MonitorConfig`, or its fields as keyword arguments. ``sinks``: extra
    sinks; ``report_to_sinks=False`` turns the automatic JSONL and backend sinks off;
    ``rules``/``early_stop`` as in :class:`MonitorRun`; ``probe``: anything
    :func:`~spectral_monitor.probes.make_probe` takes (texts, rows, batches, a dataset, a ``Probe``);
    ``log_layers``: also send per-layer scalars to W&B/TensorBoard (tables and heatmaps always go);
    ``substitution``: a :class:`~spectral_monitor.substitution.PeriodicSubstitution`.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        sinks: Sequence[Sink] | None = None,
        rules: Sequence[Rule] | None = None,
        early_stop: bool = False,
        report_to_sinks: bool = True,
        probe: Any = None,
        log_layers: bool = False,
        substitution: PeriodicSubstitution | None = None,
        **kwargs: Any,
    ) -> None:
        self.probe_spec = probe
        self.substitution = substitution
        self.log_layers = log_layers
        self.config = build_config(config, kwargs, owner="SpectralMonitorCallback")
        self.extra_sinks = list(sinks or [])
        self.rules = rules
        self.early_stop = early_stop
        self.report_to_sinks = report_to_sinks
        self.run: MonitorRun | None = None
        self.last_decision = Decision()
        self.folder = Path(MONITOR_DIR)
        self.base_path: Path | None = None
        self._resumed = False
        self._base_unwritable = False  # said once: a later checkpoint does not repeat it

    def begin(
        self,
        model: nn.Module,
        root: str | Path,
        *,
        fresh: bool,
        is_main: bool,
        backend_sinks: Sequence[Sink] = (),
        reference: nn.Module | None = None,
        tokenizer: Any = None,
        collate: Any = None,
        batch_size: int = 16,
    ) -> MonitorRun:
        """Build the run for ``model`` with its folder under ``root`` (a fresh run on the main process
        moves an older ``metrics.jsonl`` aside). ``backend_sinks``: the framework's W&B/TensorBoard sinks;
        ``tokenizer``, ``collate``, ``batch_size``: how the framework turns the probe into batches."""
        self.folder = Path(root).resolve() / MONITOR_DIR
        self.base_path = None
        self._resumed = False
        sinks: list[Sink] = []
        if self.report_to_sinks:
            path = self.folder / "metrics.jsonl"
            if fresh and is_main and path.exists():
                path.rename(path.with_name(f"metrics.{time.time_ns()}.jsonl"))
            sinks = [JsonlSink(path), *backend_sinks]
        probe = None
        if self.probe_spec is not None:
            probe = make_probe(self.probe_spec, tokenizer=tokenizer, collate=collate, batch_size=batch_size)
        self.run = MonitorRun(
            model,
            self.config,
            sinks=sinks + self.extra_sinks,
            rules=self.rules,
            early_stop=self.early_stop,
            reference=reference,
            is_main=is_main,
            probe=probe,
            substitution=self.substitution,
        )
        return self.run

    def restore(self, saved: Mapping[str, Any] | None, *, step: int, where: str) -> bool:
        """Reopen the base and the monitor's state saved by :meth:`checkpoint_state` (``saved``;
        None when ``where`` had none). False, with one warning naming what is missing, when the run
        must measure from the resume point instead (the base is then taken at :meth:`start`)."""
        self._resumed = True
        missing = f"no monitor state in {where}"
        if saved:
            recorded = saved.get("base_path")
            if recorded is None:  # reference model or LoRA factors: the base is still in the trainer
                self.run.load_state_dict(saved["run"])
                return True
            recorded = Path(recorded)
            found = [p for p in (recorded, self.folder / recorded.name) if p.exists()]
            missing = f"the base file {recorded} (and {self.folder / recorded.name}) is missing"
            if found:
                try:
                    kind = self.config.base_store if self.config.base_store in ("cpu", "disk") else "device"
                    self.run.monitor.set_base(load_store(found[0], kind, self.run.monitor.specs))
                    self.base_path = found[0]
                    self.run.load_state_dict(saved["run"])  # after set_base, which drops cached base facts
                    log.info("spectral_monitor: resumed at step %d against the base %s", step, found[0])
                    return True
                except Exception as exc:
                    if self.config.strict:
                        raise
                    missing = f"the base {found[0]} cannot be used ({type(exc).__name__}: {exc})"
        log.warning(
            "spectral_monitor: resumed at step %d, but %s; the base is taken NOW, so updates are measured "
            "from the resume point, not from the original base",
            step,
            missing,
        )
        return False

    def start(self) -> None:
        """Take the base unless :meth:`restore` reopened one, and start the sinks."""
        self.run.start(resumed=self._resumed)

    def step(self, step: int, *, final: bool) -> Decision:
        """Measure when due; the decision is kept as ``last_decision`` when something was measured."""
        decision = self.run.on_optimizer_step(step, final=final)
        if decision.measured:
            self.last_decision = decision
        return decision

    def checkpoint_state(self, *, is_main: bool) -> dict[str, Any]:
        """The state to store in a checkpoint; on the main process the base is written once first
        (a failure to write it is logged, never raised: the checkpoint itself must not fail)."""
        store = self.run.monitor.store
        persistable = store is not None and store.kind not in ("reference", "sharded")
        if is_main and persistable and self.base_path is None and not self._base_unwritable:
            path = self.folder / f"base-{uuid.uuid4().hex[:12]}.safetensors"
            try:
                self.base_path = persist(store, self.run.monitor.specs, path)
            except Exception as exc:
                if self.config.strict:
                    raise
                self._base_unwritable = True
                log.warning(
                    "spectral_monitor: could not write the base to %s (%s: %s); a resumed run will measure from "
                    "its resume point",
                    path,
                    type(exc).__name__,
                    exc,
                )
        return {"run": self.run.state_dict(), "base_path": str(self.base_path) if self.base_path else None}

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
