"""Alert rules: pure decisions on a :class:`StepReport`.

A rule's :meth:`Rule.condition` says whether the report crosses its threshold (and what was
measured); :func:`evaluate` applies patience (the condition must hold on ``patience``
consecutive measurements) and returns the fired :class:`Alert` objects together with the new rule
states. No rule keeps hidden state: everything lives in the plain ``dict`` states, which are
checkpointed with the run. An unreliable α never counts.

:func:`default_rules` are the ones that mean what they say: ``nonfinite_weights``,
``update_norm_blowup`` (only against a trained base: relative to a random initialisation the
update is large by nature) and ``knowledge_loss``, which is anchored in a held-out probe measured
against the base (it needs a probe, see :mod:`spectral_monitor.probes`). The spectral shape rules
(:func:`spectral_rules`: ρ₁ collapse, α leaving its band, intruder dimensions, effective-rank drop)
are opt-in: measured on controlled fine-tunes they did not detect forgetting (silent or late;
``docs/knowledge-loss.md``); they describe the update, they do not judge the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spectral_monitor.errors import ConfigError
from spectral_monitor.records import Alert, StepReport

__all__ = [
    "AlphaOutOfBand",
    "Condition",
    "EffectiveRankDrop",
    "IntruderDimensions",
    "KnowledgeLoss",
    "MetricThreshold",
    "NonFiniteWeights",
    "Rank1Collapse",
    "Rule",
    "State",
    "UpdateNormBlowup",
    "default_rules",
    "evaluate",
    "spectral_rules",
]

State = dict[str, Any]

#: a base counts as a random initialisation when at least this share of its layers look random
#: (``spectral/model/base_random_frac``); rules relative to the base stay quiet then
RANDOM_BASE = 0.5


@dataclass(frozen=True)
class Condition:
    """Outcome of one rule on one report: ``reason`` (short, stable: the measured value against the
    threshold), ``message`` (the sentence a person reads), ``ref`` (a reference value the rule keeps)."""

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


def _hits(values: dict[str, float], test: Callable[[float], bool]) -> tuple[float, tuple[str, ...]]:
    """Share of ``values`` passing ``test`` (finite values only) and their layers, model order."""
    hits = tuple(k for k, v in values.items() if math.isfinite(v) and test(v))
    return (len(hits) / len(values) if values else 0.0), hits


def _names(layers: Sequence[str], most: int = 3) -> str:
    return ", ".join(layers[:most]) + (f" and {len(layers) - most} more" if len(layers) > most else "")


def _random_base(report: StepReport) -> bool:
    return report.model.get("base_random_frac", 0.0) >= RANDOM_BASE


# ----------------------------------------------------------------------------- default rules
@dataclass(frozen=True, kw_only=True)
class NonFiniteWeights(Rule):
    """Any monitored layer holds NaN/Inf."""

    name: str = "nonfinite_weights"

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        _, hits = _hits(report.layer_values("nonfinite"), lambda v: v > 0)
        return Condition(bool(hits), f"NaN/Inf in {len(hits)} layers", f"NaN/Inf weights in {_names(hits)}", hits)


@dataclass(frozen=True, kw_only=True)
class UpdateNormBlowup(Rule):
    """‖ΔW‖/‖W_0‖ above ``max_rel`` in any layer, or (``growth`` set) the total ‖ΔW‖ grew ``growth``×
    since the last measurement.

    Quiet when the base looks like a random initialisation (``base_random_frac``): from random
    weights the first updates are as large as the weights themselves. ``growth`` is off by default:
    ‖ΔW‖ starts at 0, so early measurements grow by large factors in every healthy run.
    """

    name: str = "update_norm_blowup"
    max_rel: float = 0.5
    growth: float | None = None

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        total = report.model.get("update_norm_total", 0.0)
        new_ref = total if total > 0 else ref
        if _random_base(report):
            return Condition(False, ref=new_ref)
        rel = report.layer_values("update_rel")
        _, hits = _hits(rel, lambda v: v > self.max_rel)
        grew = self.growth is not None and ref is not None and ref > 0 and total > self.growth * ref
        if hits:
            worst = max(hits, key=lambda k: rel[k])
            reason = f"update_rel {rel[worst]:.3g} > {self.max_rel}"
            message = (
                f"the update of {worst} is {rel[worst]:.3g} of its base weight's norm (threshold {self.max_rel}), "
                f"in {len(hits)} layers in all; check the learning rate, or whether the base is from another model"
            )
        elif grew:
            reason = f"update norm grew {total / ref:.3g}x > {self.growth}x"
            message = f"the total update norm grew {total / ref:.3g}x since the last measurement"
        else:
            return Condition(False, ref=new_ref)
        return Condition(True, reason, message, hits, ref=new_ref)


@dataclass(frozen=True, kw_only=True)
class KnowledgeLoss(Rule):
    """The held-out probe moved away from the base: KL(π_base ‖ π_t) per token above ``kl`` nats, or
    the held-out loss ``loss_rise`` (relative) above its value at the base.

    Needs a probe (``probe=`` on the run or callback); without one it never fires. Its message names
    the probe values and what the spectra say about the update at that step (largest relative
    updates, intruder directions, rank-1 share), as explanation, not as evidence.
    """

    name: str = "knowledge_loss"
    kl: float | None = 0.2
    loss_rise: float | None = 0.2
    patience: int = 2

    def __post_init__(self) -> None:
        if self.kl is None and self.loss_rise is None:
            raise ConfigError("KnowledgeLoss needs kl= or loss_rise= (or both), got neither")

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        kl, rise = report.probes.get("kl"), report.probes.get("loss_rel")
        parts = []
        if self.kl is not None and kl is not None and math.isfinite(kl) and kl > self.kl:
            parts.append(f"KL {kl:.3g} > {self.kl}")
        if self.loss_rise is not None and rise is not None and math.isfinite(rise) and rise > self.loss_rise:
            parts.append(f"held-out loss {rise:+.0%} > +{self.loss_rise:.0%}")
        if not parts:
            return Condition(False)
        measured = [f"KL to the base {kl:.3g} nats/token"] if kl is not None else []
        if rise is not None:
            measured.append(f"held-out loss {rise:+.1%} against the base")
        message = f"the model drifted from the base on the held-out probe: {', '.join(measured)}"
        explanation = _spectral_explanation(report)
        return Condition(True, "; ".join(parts), message + (f"; {explanation}" if explanation else ""))


def _spectral_explanation(report: StepReport) -> str:
    """What the spectra say about the update at this step, in a few words."""
    rel = {k: v for k, v in report.layer_values("update_rel").items() if math.isfinite(v)}
    out = []
    if rel:
        top = sorted(rel, key=rel.get, reverse=True)[:2]
        out.append("largest updates in " + ", ".join(f"{k} ({rel[k]:.2g} of ‖W₀‖)" for k in top))
    intruders = sum(v for v in report.layer_values("intruders").values() if math.isfinite(v))
    if intruders:
        out.append(f"{intruders:.0f} intruder directions")
    rho1 = report.aggregate("rho1")
    if rho1 is not None:
        out.append(f"mean rank-1 share {rho1:.2f}")
    return ", ".join(out)


# ----------------------------------------------------------------------------- opt-in shape rules
@dataclass(frozen=True, kw_only=True)
class Rank1Collapse(Rule):
    """ρ₁ (rank-1 energy share of ΔW) above ``rho1`` in at least ``min_frac`` of the layers."""

    name: str = "rank1_collapse"
    rho1: float = 0.9
    min_frac: float = 0.5
    patience: int = 2
    stop: bool = False

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        frac, hits = _hits(report.layer_values("rho1"), lambda v: v > self.rho1)
        return Condition(
            bool(hits) and frac >= self.min_frac,
            f"rho1>{self.rho1} in {frac:.0%} of layers (>= {self.min_frac:.0%})",
            f"the update is concentrated in one direction (rank-1 share > {self.rho1}) in {len(hits)} layers",
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
        frac, hits = _hits(alphas, lambda v: not self.low <= v <= self.high)
        if ref is None:
            return Condition(False, ref=frac)
        return Condition(
            frac - ref >= self.min_increase,
            f"alpha outside [{self.low}, {self.high}] in {frac:.0%} of reliably fitted layers (was {ref:.0%})",
            f"the heavy-tail exponent α of the update left [{self.low}, {self.high}] in {len(hits)} layers "
            f"({frac:.0%} of the reliably fitted ones, {ref:.0%} at the first reliable measurement)",
            hits,
            ref=ref,
        )


@dataclass(frozen=True, kw_only=True)
class IntruderDimensions(Rule):
    """At least ``min_total`` intruder dimensions summed over layers (Shuttleworth et al. 2024).
    Quiet against a random-initialisation base, whose singular vectors mean nothing."""

    name: str = "intruder_dimensions"
    min_total: int = 1
    patience: int = 2
    stop: bool = False

    def condition(self, report: StepReport, ref: float | None) -> Condition:
        if _random_base(report):
            return Condition(False)
        counts = report.layer_values("intruders")
        total = sum(v for v in counts.values() if math.isfinite(v))
        hits = tuple(k for k, v in counts.items() if v > 0)
        return Condition(
            total >= self.min_total,
            f"intruders={total:.0f} >= {self.min_total}",
            f"{total:.0f} of W_t's top singular vectors are unlike any of W_0's (intruder dimensions), "
            f"in {_names(hits)}",
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
            f"the update's mean effective rank fell from {ref:.3g} to {value:.3g}",
            ref=ref,
        )


@dataclass(frozen=True, kw_only=True)
class MetricThreshold(Rule):
    """Any key of the schema (e.g. a probe's ``spectral/probe/kl``) above ``above`` or below ``below``."""

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
    """The rules a run uses unless told otherwise (module doc)."""
    return [NonFiniteWeights(), UpdateNormBlowup(), KnowledgeLoss()]


def spectral_rules() -> list[Rule]:
    """The opt-in spectral shape rules, warning only (``stop=False``)."""
    return [Rank1Collapse(), AlphaOutOfBand(), IntruderDimensions(), EffectiveRankDrop()]


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
                    message=cond.message,
                    layers=cond.layers,
                    stop=early_stop and rule.stop,
                )
            )
    return alerts, new_states
