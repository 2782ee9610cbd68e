"""Alert rules: pure decisions on a :class:`StepReport`.

A rule's :meth:`Rule.condition` says whether the report crosses its threshold (and why);
:func:`evaluate` applies patience (the condition must hold on ``patience`` consecutive
measurements) and returns the fired :class:`Alert` objects together with the new rule
states. No rule keeps hidden state: everything lives in the plain ``dict`` states, which are
checkpointed with the run. An unreliable α never counts.

Two kinds of rules: *hard* ones (non-finite weights, update-norm blow-up, rank-1 collapse) may stop
training when the run has ``early_stop=True``; *heuristic* ones (α leaving its band, intruder
dimensions, effective-rank drop) default to ``stop=False``: on small or noisy runs they fire on
healthy training too, so they warn and log unless you set ``stop=True`` on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spectral_monitor.errors import ConfigError
from spectral_monitor.records import Alert, StepReport

__all__ = [
    "AlphaOutOfBand",
    "Condition",
    "EffectiveRankDrop",
    "IntruderDimensions",
    "MetricThreshold",
    "NonFiniteWeights",
    "Rank1Collapse",
    "Rule",
    "State",
    "UpdateNormBlowup",
    "default_rules",
    "evaluate",
]

State = dict[str, Any]


@dataclass(frozen=True)
class Condition:
    """Outcome of one rule on one report. ``ref`` lets a rule carry a reference value."""

    hit: bool
    reason: str = ""
    message: str = ""
    layers: tuple[str, ...] = ()
    ref: float | None = None


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Base rule: ``name`` (the key in ``spectral/alert/<name>``), ``patience`` (consecutive
    measurements the condition must hold), ``stop`` (may this rule stop training when the run
    has ``early_stop=True``)."""

    name: str = ""
    patience: int = 1
    stop: bool = True

    def condition(self, report: StepReport, ref: float | None) -> Condition:  # pragma: no cover - abstract
        raise NotImplementedError


def _frac(values: dict[str, float], test) -> tuple[float, tuple[str, ...]]:
    hits = tuple(sorted(k for k, v in values.items() if math.isfinite(v) and test(v)))
    return (len(hits) / len(values) if values else 0.0), hits


@dataclass(frozen=True, kw_only=True)
class Rank1Collapse(Rule):
    """ρ₁ (rank-1 energy share of ΔW) above ``rho1`` in at least ``min_frac`` of the layers."""

    name: str = "rank1_collapse"
    rho1: float = 0.9
    min_frac: float = 0.5
    patience: int = 2

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        frac, hits = _frac(report.layer_values("rho1"), lambda v: v > self.rho1)
        hit = bool(hits) and frac >= self.min_frac
        return Condition(
            hit,
            f"rho1>{self.rho1} in {frac:.0%} of layers (>= {self.min_frac:.0%})",
            f"the update collapsed onto one direction in {len(hits)} layers "
            f"(rank-1 energy share > {self.rho1}); the rewarded skill may be kept while other knowledge fades",
            hits,
        )


@dataclass(frozen=True, kw_only=True)
class AlphaOutOfBand(Rule):
    """Heavy-tail α *leaving* its band [low, high]: the share of reliably fitted layers whose α is
    outside the band grew by at least ``min_increase`` since the first measurement with reliable fits.

    Relative to that baseline because ΔW's α early in training is often already outside the band
    HT-SR defines for weights (W); what signals a change is layers moving out.
    """

    name: str = "alpha_out_of_band"
    low: float = 2.0
    high: float = 6.0
    min_increase: float = 0.5
    patience: int = 3
    stop: bool = False

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        reliable = report.layer_values("alpha_reliable")
        alphas = {k: v for k, v in report.layer_values("alpha").items() if reliable.get(k) == 1.0}
        if not alphas:
            return Condition(False, ref=ref)
        frac, hits = _frac(alphas, lambda v: not self.low <= v <= self.high)
        if ref is None:
            return Condition(False, ref=frac)
        return Condition(
            frac - ref >= self.min_increase,
            f"alpha outside [{self.low}, {self.high}] in {frac:.0%} of reliably fitted layers (was {ref:.0%})",
            f"heavy-tail exponent alpha left its band [{self.low}, {self.high}] in {len(hits)} layers "
            "(alpha < 2: very heavy tail / over-fit; alpha > 6: random-like update)",
            hits,
            ref=ref,
        )


@dataclass(frozen=True, kw_only=True)
class IntruderDimensions(Rule):
    """At least ``min_total`` intruder dimensions summed over layers (Shuttleworth et al. 2024)."""

    name: str = "intruder_dimensions"
    min_total: int = 1
    patience: int = 2
    stop: bool = False

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        counts = report.layer_values("intruders")
        total = sum(v for v in counts.values() if math.isfinite(v))
        hits = tuple(sorted(k for k, v in counts.items() if v > 0))
        return Condition(
            total >= self.min_total,
            f"intruders={total:.0f} >= {self.min_total}",
            f"{total:.0f} intruder dimensions (top singular vectors of W_t unlike any of W_0's) "
            "appeared; they are linked to forgetting of the pre-training distribution",
            hits,
        )


@dataclass(frozen=True, kw_only=True)
class EffectiveRankDrop(Rule):
    """Mean effective rank of ΔW fell below ``drop`` × its first non-zero measured value."""

    name: str = "erank_drop"
    drop: float = 0.25
    patience: int = 3
    stop: bool = False

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        value = report.aggregate("erank", "mean")
        if value is None or not math.isfinite(value) or value <= 0:
            return Condition(False, ref=ref)
        if ref is None:
            return Condition(False, ref=value)
        return Condition(
            value < self.drop * ref,
            f"erank_mean={value:.3g} < {self.drop}*{ref:.3g}",
            f"the update's effective rank fell from {ref:.3g} to {value:.3g}: it is concentrating into few directions",
            ref=ref,
        )


@dataclass(frozen=True, kw_only=True)
class UpdateNormBlowup(Rule):
    """‖ΔW‖/‖W_0‖ above ``max_rel`` in any layer, or (when ``growth`` is set) the total ‖ΔW‖ grew
    ``growth``× since the last measurement.

    ``growth`` is off by default: ‖ΔW‖ starts at 0, so early measurements grow by large factors in
    every healthy run (≈15× from step 1 to 25 under AdamW, more under LR warm-up).
    """

    name: str = "update_norm_blowup"
    max_rel: float = 0.5
    growth: float | None = None

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        rel = report.layer_values("update_rel")
        _, hits = _frac(rel, lambda v: v > self.max_rel)
        total = report.model.get("update_norm_total", 0.0)
        grew = self.growth is not None and ref is not None and ref > 0 and total > self.growth * ref
        worst = max(rel.values(), default=0.0)
        return Condition(
            bool(hits) or grew,
            f"update_rel max={worst:.3g} > {self.max_rel}"
            if hits
            else f"update norm grew {total / ref:.3g}x > {self.growth}x"
            if grew
            else "",
            f"the weight update blew up (largest relative update {worst:.3g}); "
            "check the learning rate, or whether the base snapshot is from another model",
            hits,
            ref=total if total > 0 else ref,
        )


@dataclass(frozen=True, kw_only=True)
class NonFiniteWeights(Rule):
    """Any monitored layer holds NaN/Inf."""

    name: str = "nonfinite_weights"

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        _, hits = _frac(report.layer_values("nonfinite"), lambda v: v > 0)
        return Condition(
            bool(hits),
            f"NaN/Inf in {len(hits)} layers",
            f"NaN/Inf weights in {list(hits)[:3]}{'...' if len(hits) > 3 else ''}",
            hits,
        )


@dataclass(frozen=True, kw_only=True)
class MetricThreshold(Rule):
    """Any metric key (e.g. a probe's ``spectral/probe/kl``) above ``above`` or below ``below``.

    The hook for probe-based rules: probes write their values into the report's metrics.
    """

    key: str
    above: float | None = None
    below: float | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if self.above is None and self.below is None:
            raise ConfigError(f"MetricThreshold(key={self.key!r}) needs above= or below=, got neither")
        if not self.name:  # rule states and alert keys are per name: derive a distinct one from the key
            object.__setattr__(self, "name", self.key.removeprefix("spectral/").replace("/", "_"))

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        value = report.metrics.get(self.key)
        if value is None or not math.isfinite(value):
            return Condition(False)
        hit = (self.above is not None and value > self.above) or (self.below is not None and value < self.below)
        bound = f"> {self.above}" if self.above is not None and value > self.above else f"< {self.below}"
        return Condition(hit, f"{self.key}={value:.4g} {bound}", self.message or f"{self.key} = {value:.4g} {bound}")


def default_rules() -> list[Rule]:
    """The spectral rules with their documented defaults."""
    return [
        Rank1Collapse(),
        AlphaOutOfBand(),
        IntruderDimensions(),
        EffectiveRankDrop(),
        UpdateNormBlowup(),
        NonFiniteWeights(),
    ]


def evaluate(
    rules: Sequence[Rule], states: dict[str, State], report: StepReport, *, early_stop: bool = False
) -> tuple[list[Alert], dict[str, State]]:
    """Judge ``report``: returns the alerts fired now and the new states (inputs untouched).

    A rule fires when its condition has held on ``patience`` consecutive measurements; it
    fires again on each further consecutive hit. ``Alert.stop`` is ``early_stop and rule.stop``.
    """
    alerts: list[Alert] = []
    new_states: dict[str, State] = {}
    for rule in rules:
        old = states.get(rule.name, {"count": 0, "ref": None})
        cond = rule.condition(report, old["ref"])
        count = old["count"] + 1 if cond.hit else 0
        new_states[rule.name] = {"count": count, "ref": cond.ref if cond.ref is not None else old["ref"]}
        if cond.hit and count >= rule.patience:
            alerts.append(
                Alert(
                    rule=rule.name,
                    step=report.step,
                    reason=cond.reason,
                    message=f"[spectral_monitor] step {report.step}: {rule.name}: {cond.message} ({cond.reason})",
                    layers=cond.layers,
                    stop=early_stop and rule.stop,
                )
            )
    return alerts, new_states
