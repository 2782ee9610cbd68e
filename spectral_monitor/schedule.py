"""When to measure, and which layers, so the monitor stays within its share of training time.

With ``every_n_steps`` (or a ``schedule`` callable) the cadence is fixed. Otherwise the monitor
keeps its wall time within ``overhead`` × the training time: after each measurement it sets the
gap to the next one from the measurement's cost and the time of a training step,

    gap = ceil(cost / (overhead × step_time)),

so the measurements' share of the wall time stays at ``overhead``; a longer gap pays back a debt
(the first, cold measurement costs more), always keeping room for the final measurement. When that gap would exceed
``max_every`` steps the layers are split into round-robin groups (every group spans all depths and
layer types) and each measurement covers one group: a layer is then measured every ``groups``
measurements and each measurement costs about 1/groups as much. The first step seen and the
last step are always measured, with every layer.

Times are process wall times (``time.perf_counter``). A training step's time is what passes
between two calls minus the monitor's own time, averaged over the steps since the last
measurement, so a slow data loader or evaluation counts as training time, as a user sees it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spectral_monitor.config import MonitorConfig

__all__ = ["MAX_GROUPS", "Schedule"]

#: at most this many layer groups (a layer is measured at least every MAX_GROUPS measurements)
MAX_GROUPS = 8
#: weight of the newest measurement's cost in the running estimate
_SMOOTHING = 0.5


@dataclass
class _Timing:
    """Wall time of training and of the monitor, in seconds, since the start and since the last measurement."""

    train_total: float = 0.0
    monitor_total: float = 0.0
    train_since: float = 0.0
    steps_since: int = 0
    last_call: float | None = None
    cost: float | None = None  # running estimate of one full measurement's cost (all layers)


class Schedule:
    """The measurement schedule of one run (see the module doc). ``n_layers``: monitored layers."""

    def __init__(self, config: MonitorConfig, n_layers: int) -> None:
        self.config = config
        self.n_layers = n_layers
        self.gap = 1
        self.groups = 1
        self.next_step: int | None = None  # budget mode: the next step to measure
        self.measurements = 0
        self.expected = 0.0  # the share of training time the current cadence costs (steady state)
        self.timing = _Timing()

    @property
    def adaptive(self) -> bool:
        """True when the budget sets the cadence (no ``every_n_steps`` and no ``schedule``)."""
        return self.config.every_n_steps is None and self.config.schedule is None

    @property
    def overhead(self) -> float:
        """The monitor's wall time so far over the training's (0 before any training time)."""
        t = self.timing
        return t.monitor_total / t.train_total if t.train_total > 0 else 0.0

    # ------------------------------------------------------------------ time
    def begin(self, now: float) -> None:
        """Training starts (or resumes) at ``now``."""
        self.timing.last_call = now

    def tick(self, now: float) -> None:
        """An optimizer step ended at ``now``: the time since the previous call was training."""
        t = self.timing
        if t.last_call is not None:
            t.train_total += now - t.last_call
            t.train_since += now - t.last_call
            t.steps_since += 1
        t.last_call = now

    def spent(self, seconds: float, now: float) -> None:
        """The monitor worked ``seconds`` up to ``now`` (not training time)."""
        self.timing.monitor_total += seconds
        self.timing.last_call = now

    # ------------------------------------------------------------------ decisions
    def due(self, step: int, *, first: bool, final: bool) -> bool:
        """Measure at ``step``? ``first``: no measurement yet (``measure_first`` applies)."""
        if final or (first and self.config.measure_first):
            return True
        if not self.adaptive:
            return self.config.is_scheduled(step)
        return self.next_step is not None and step >= self.next_step

    def group(self, *, everything: bool) -> int | None:
        """Which round-robin group of layers this measurement covers (None: all of them)."""
        if everything or self.groups == 1:
            return None
        return self.measurements % self.groups

    def measured(self, step: int, seconds: float, *, layers: int) -> None:
        """A measurement of ``layers`` layers at ``step`` took ``seconds``: set the next step."""
        t = self.timing
        self.measurements += 1
        full = seconds * self.n_layers / max(layers, 1)
        t.cost = full if t.cost is None else _SMOOTHING * full + (1 - _SMOOTHING) * t.cost
        step_time = t.train_since / t.steps_since if t.steps_since else None
        t.train_since, t.steps_since = 0.0, 0
        if not self.adaptive or step_time is None or step_time <= 0:
            self.next_step = step + 1 if self.adaptive else None
            return
        need = t.cost / (self.config.overhead * step_time)  # steps one full measurement must be spread over
        self.groups = min(MAX_GROUPS, self.n_layers, max(1, _ceil(need / self.config.max_every)))
        self.gap = max(1, min(self.config.max_every, _ceil(need / self.groups)))
        # pay back a debt (the cold first measurement costs more), keeping room for the next
        # measurement and the final one, which is always taken with every layer
        reserve = t.monitor_total + t.cost / self.groups + t.cost
        behind = _ceil((reserve / self.config.overhead - t.train_total) / step_time)
        self.gap = max(self.gap, min(self.config.max_every, behind))
        self.next_step = step + self.gap
        self.expected = self.config.overhead * need / (self.groups * self.gap)

    def agree(self, reduce_max: Callable[[list[float]], list[float]]) -> None:
        """Take the ranks' most conservative choice (every rank's timings differ a little; all must
        measure at the same steps): the latest next step, the most groups, the widest gap."""
        if self.next_step is None:
            return
        next_step, groups, gap = reduce_max([self.next_step, self.groups, self.gap])
        self.next_step, self.groups, self.gap = int(next_step), int(groups), int(gap)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        t = self.timing
        return {
            "gap": self.gap,
            "groups": self.groups,
            "next_step": self.next_step,
            "measurements": self.measurements,
            "train_total": t.train_total,
            "monitor_total": t.monitor_total,
            "cost": t.cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gap, self.groups = int(state["gap"]), int(state["groups"])
        self.next_step, self.measurements = state["next_step"], int(state["measurements"])
        self.timing = _Timing(
            train_total=state["train_total"], monitor_total=state["monitor_total"], cost=state["cost"]
        )


def _ceil(x: float) -> int:
    """``ceil`` that does not round 600.0000001 (a float quotient of 600) up to 601."""
    return math.ceil(x - 1e-9)
