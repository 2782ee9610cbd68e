"""Alert rules on hand-built StepReports: thresholds, patience, references, purity."""

from __future__ import annotations

import copy
import math

import pytest

from spectral_monitor.alerts import (
    AlphaOutOfBand,
    EffectiveRankDrop,
    IntruderDimensions,
    KnowledgeLoss,
    MetricThreshold,
    NonFiniteWeights,
    Rank1Collapse,
    UpdateNormBlowup,
    default_rules,
    evaluate,
    spectral_rules,
)
from spectral_monitor.errors import ConfigError
from spectral_monitor.records import StepReport

NAN = math.nan


def report(step: int, layers: dict[str, dict[str, float]] | None = None, **model: float) -> StepReport:
    """``layers``: {metric: {layer: value}}; keyword args: model-level ``spectral/model/<name>``."""
    metrics = {f"spectral/{metric}/{layer}": v for metric, vals in (layers or {}).items() for layer, v in vals.items()}
    metrics.update({f"spectral/model/{k}": v for k, v in model.items()})
    return StepReport.from_flat(step, metrics)


def run(rule, reports, *, early_stop=False):
    """Evaluate ``rule`` on each report in turn; returns the fired alerts per step and the final states."""
    states: dict = {}
    fired = []
    for r in reports:
        alerts, states = evaluate([rule], states, r, early_stop=early_stop)
        fired.append(alerts)
    return fired, states


def rho1(step: int, *values: float) -> StepReport:
    return report(step, {"rho1": {f"l{i}": v for i, v in enumerate(values)}})


# ------------------------------------------------------------------ Rank1Collapse
def test_rank1_collapse_patience_and_reset():
    rule = Rank1Collapse(rho1=0.9, min_frac=0.5, patience=2)
    hit, miss = (0.95, 0.92, 0.1), (0.95, 0.1, 0.1)  # 2/3 vs 1/3 of the layers above 0.9
    fired, states = run(rule, [rho1(1, *hit), rho1(2, *hit), rho1(3, *hit), rho1(4, *miss), rho1(5, *hit)])
    assert [len(a) for a in fired] == [0, 1, 1, 0, 0]
    assert states["rank1_collapse"]["count"] == 1  # reset by the miss at step 4, one hit since
    alert = fired[1][0]
    assert alert.rule == "rank1_collapse" and alert.step == 2
    assert "0.9" in alert.reason and "67%" in alert.reason and "50%" in alert.reason
    assert alert.layers == ("l0", "l1")
    assert "rank-1 share > 0.9" in alert.message and "2 layers" in alert.message
    assert alert.line() == f"[spectral_monitor] step 2: rank1_collapse: {alert.message}"
    assert alert.stop is False


def test_rank1_collapse_threshold_is_strict_and_ignores_nan():
    rule = Rank1Collapse(rho1=0.9, min_frac=0.5, patience=1)
    fired, _ = run(rule, [rho1(1, 0.9, 0.9), rho1(2, NAN, NAN), rho1(3, NAN, 0.99), report(4)])
    assert [len(a) for a in fired] == [0, 0, 1, 0]  # NaN counts as a measured layer below threshold


# ------------------------------------------------------------------ AlphaOutOfBand
def alpha(step: int, values: dict[str, float], reliable: dict[str, float]) -> StepReport:
    return report(step, {"alpha": values, "alpha_reliable": reliable})


def test_unreliable_alpha_never_counts():
    rule = AlphaOutOfBand(low=2.0, high=6.0, min_increase=0.25, patience=1)
    unreliable = alpha(1, {"a": 1.1, "b": 40.0}, {"a": 0.0, "b": 0.0})
    fired, states = run(rule, [unreliable, unreliable, unreliable])
    assert fired == [[], [], []]
    assert states["alpha_out_of_band"]["ref"] is None  # no reliable fit: no baseline either
    # baseline 1/4 out of band; then an unreliable layer leaves the band: still 1/3 of the reliable ones
    base = alpha(1, {"a": 3.0, "b": 3.0, "c": 3.0, "d": 7.0}, dict.fromkeys("abcd", 1.0))
    noisy = alpha(2, {"a": 1.1, "b": 3.0, "c": 3.0, "d": 7.0}, {"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0})
    fired, states = run(rule, [base, noisy, noisy])
    assert fired == [[], [], []]
    assert states["alpha_out_of_band"]["ref"] == 0.25


def test_alpha_leaving_the_band_relative_to_the_first_reliable_share():
    rule = AlphaOutOfBand(low=2.0, high=6.0, min_increase=0.25, patience=2)
    reliable = dict.fromkeys("abcd", 1.0)
    reports = [
        alpha(1, {"a": 3.0, "b": 3.0, "c": 3.0, "d": 7.0}, reliable),  # baseline: 25% outside
        alpha(2, {"a": 1.5, "b": 3.0, "c": 3.0, "d": 7.0}, reliable),  # 50%: +25 points, hit 1 of 2
        alpha(3, {"a": 1.5, "b": 3.0, "c": 3.0, "d": 7.0}, reliable),  # hit 2 of 2: fires
        alpha(4, {"a": 2.0, "b": 6.0, "c": 3.0, "d": 7.0}, reliable),  # the band is closed: back to 25%
        alpha(5, {"a": 1.5, "b": 3.0, "c": 3.0, "d": 7.0}, reliable),  # hit 1 again after the reset
    ]
    fired, states = run(rule, reports)
    assert [len(a) for a in fired] == [0, 0, 1, 0, 0]
    alert = fired[2][0]
    assert "[2.0, 6.0]" in alert.reason and "50%" in alert.reason and "was 25%" in alert.reason
    assert alert.layers == ("a", "d")
    assert states["alpha_out_of_band"] == {"count": 1, "ref": 0.25}


# ------------------------------------------------------------------ IntruderDimensions
def test_intruder_dimensions_total_over_layers():
    rule = IntruderDimensions(min_total=3, patience=1)
    fired, _ = run(
        rule, [report(1, {"intruders": {"a": 1.0, "b": 1.0}}), report(2, {"intruders": {"a": 2.0, "b": 1.0}})]
    )
    assert [len(a) for a in fired] == [0, 1]
    assert fired[1][0].reason == "intruders=3 >= 3"
    assert fired[1][0].layers == ("a", "b")


# ------------------------------------------------------------------ EffectiveRankDrop
def test_erank_drop_reference_is_the_first_positive_value():
    rule = EffectiveRankDrop(drop=0.5, patience=1)
    reports = [
        report(1, erank_mean=0.0),  # ΔW = 0 at the first step: no reference yet
        report(2),  # nothing measured
        report(3, erank_mean=NAN),
        report(4, erank_mean=20.0),  # reference
        report(5, erank_mean=11.0),
        report(6, erank_mean=9.0),  # < 0.5 * 20
        report(7, erank_mean=30.0),
        report(8, erank_mean=9.9),  # the reference stays 20, not 30
    ]
    fired, states = run(rule, reports)
    assert [len(a) for a in fired] == [0, 0, 0, 0, 0, 1, 0, 1]
    assert states["erank_drop"]["ref"] == 20.0
    assert fired[5][0].reason == "erank_mean=9 < 0.5*20"
    assert "20" in fired[5][0].message and "9" in fired[5][0].message


def test_erank_drop_reference_survives_a_state_round_trip():
    rule = EffectiveRankDrop(drop=0.5, patience=1)
    _, states = run(rule, [report(1, erank_mean=10.0)])
    alerts, _ = evaluate([rule], copy.deepcopy(states), report(2, erank_mean=4.0))
    assert len(alerts) == 1


# ------------------------------------------------------------------ UpdateNormBlowup
def test_update_norm_blowup_relative_and_growth():
    rule = UpdateNormBlowup(max_rel=0.5, growth=10.0)
    reports = [
        report(1, {"update_rel": {"a": 0.0}}, update_norm_total=0.0),  # no reference from a zero update
        report(2, {"update_rel": {"a": 0.01}}, update_norm_total=1.0),  # reference 1.0
        report(3, {"update_rel": {"a": 0.05}}, update_norm_total=9.0),  # 9x: fine
        report(4, {"update_rel": {"a": 0.4}}, update_norm_total=95.0),  # > 10 * 9
        report(5, {"update_rel": {"a": 0.6, "b": 0.1}}, update_norm_total=100.0),  # rel > 0.5
    ]
    fired, states = run(rule, reports)
    assert [len(a) for a in fired] == [0, 0, 0, 1, 1]
    assert "grew" in fired[3][0].reason and "10" in fired[3][0].reason  # growth and its threshold
    assert fired[4][0].reason == "update_rel 0.6 > 0.5"
    assert "the update of a is 0.6 of its base weight's norm" in fired[4][0].message
    assert fired[4][0].layers == ("a",)
    assert states["update_norm_blowup"]["ref"] == 100.0


# ------------------------------------------------------------------ NonFiniteWeights
def test_nonfinite_weights_fires_at_once():
    rule = NonFiniteWeights()
    fired, _ = run(rule, [report(1, {"nonfinite": {"a": 0.0, "b": 1.0}}), report(2, {"nonfinite": {"a": 0.0}})])
    assert [len(a) for a in fired] == [1, 0]
    assert fired[0][0].layers == ("b",) and "1 layers" in fired[0][0].reason


# ------------------------------------------------------------------ MetricThreshold
def test_metric_threshold_above_and_below():
    above = MetricThreshold(name="kl", key="spectral/probe/kl", above=0.5, patience=1)
    below = MetricThreshold(name="acc", key="spectral/probe/acc", below=0.2, patience=1)
    steps = [
        StepReport.from_flat(1, {"spectral/probe/kl": 0.5, "spectral/probe/acc": 0.2}),  # at the bounds
        StepReport.from_flat(2, {"spectral/probe/kl": 0.7, "spectral/probe/acc": 0.1}),
        StepReport.from_flat(3, {"spectral/probe/kl": NAN}),  # NaN / missing never fire
        StepReport.from_flat(4, {}),
    ]
    fired_above, _ = run(above, steps)
    fired_below, _ = run(below, steps)
    assert [len(a) for a in fired_above] == [0, 1, 0, 0]
    assert [len(a) for a in fired_below] == [0, 1, 0, 0]
    assert fired_above[1][0].reason == "spectral/probe/kl=0.7 > 0.5"
    assert fired_below[1][0].reason == "spectral/probe/acc=0.1 < 0.2"
    band = MetricThreshold(name="band", key="spectral/context/x", above=1.0, below=-1.0, patience=1)
    assert [
        len(a)
        for a in run(
            band,
            [
                StepReport.from_flat(1, {"spectral/context/x": 2.0}),
                StepReport.from_flat(2, {"spectral/context/x": -2.0}),
            ],
        )[0]
    ] == [1, 1]
    custom = MetricThreshold(
        name="kl", key="spectral/probe/k", above=0.0, message="KL to the base is rising", patience=1
    )
    assert (
        "KL to the base is rising" in run(custom, [StepReport.from_flat(1, {"spectral/probe/k": 1.0})])[0][0][0].message
    )


def test_metric_thresholds_without_names_do_not_share_state():
    kl = MetricThreshold(key="spectral/probe/kl", above=1.0, patience=2)
    loss = MetricThreshold(key="spectral/probe/loss", above=1.0, patience=2)
    assert kl.name and loss.name and kl.name != loss.name
    r1 = StepReport.from_flat(1, {"spectral/probe/kl": 2.0, "spectral/probe/loss": 0.0})
    r2 = StepReport.from_flat(2, {"spectral/probe/kl": 0.0, "spectral/probe/loss": 2.0})
    _, states = evaluate([kl, loss], {}, r1)
    alerts, _ = evaluate([kl, loss], states, r2)
    assert alerts == []  # each rule hit once: neither reached its patience of 2


def test_metric_threshold_without_bounds_is_a_config_error():
    with pytest.raises(ConfigError, match="above"):
        MetricThreshold(key="spectral/probe/kl")


# ------------------------------------------------------------------ evaluate
def test_evaluate_is_pure():
    rules = default_rules() + spectral_rules()
    r = report(
        3,
        {"rho1": {"a": 0.99, "b": 0.95}, "update_rel": {"a": 0.9}, "nonfinite": {"a": 1.0}},
        erank_mean=2.0,
        update_norm_total=5.0,
    )
    states = {"rank1_collapse": {"count": 1, "ref": None}, "erank_drop": {"count": 0, "ref": 10.0}}
    states_before, metrics_before = copy.deepcopy(states), copy.deepcopy(r.metrics)
    alerts, new_states = evaluate(rules, states, r, early_stop=True)
    assert states == states_before and r.metrics == metrics_before and r.alerts == []
    assert new_states is not states
    assert {a.rule for a in alerts} == {"rank1_collapse", "update_norm_blowup", "nonfinite_weights"}
    assert new_states["erank_drop"] == {"count": 1, "ref": 10.0}  # 2 < 0.25 * 10, patience 3
    assert set(new_states) == {r.name for r in rules}
    # the same inputs give the same outputs
    again, again_states = evaluate(rules, states, r, early_stop=True)
    assert [a.as_dict() for a in again] == [a.as_dict() for a in alerts] and again_states == new_states


def test_early_stop_sets_alert_stop_only_for_rules_that_may_stop():
    may, may_not = Rank1Collapse(patience=1, stop=True), Rank1Collapse(name="soft", patience=1)
    r = rho1(1, 0.99)
    alerts, _ = evaluate([may, may_not], {}, r, early_stop=True)
    assert [(a.rule, a.stop) for a in alerts] == [("rank1_collapse", True), ("soft", False)]
    alerts, _ = evaluate([may, may_not], {}, r, early_stop=False)
    assert [a.stop for a in alerts] == [False, False]


def test_default_rules_are_the_hard_ones_and_the_probe_rule():
    assert [r.name for r in default_rules()] == ["nonfinite_weights", "update_norm_blowup", "knowledge_loss"]
    assert all(r.stop for r in default_rules())
    shape = spectral_rules()
    assert [r.name for r in shape] == ["rank1_collapse", "alpha_out_of_band", "intruder_dimensions", "erank_drop"]
    assert not any(r.stop for r in shape)


def test_relative_rules_stay_quiet_against_a_random_initialisation():
    """A from-scratch run: the first updates are as large as the random weights; no alert."""
    layers = {"update_rel": {"a": 0.6}, "intruders": {"a": 26.0}}
    for rule in (UpdateNormBlowup(), IntruderDimensions(patience=1)):
        fired, _ = run(rule, [report(5, layers, base_random_frac=1.0, update_norm_total=3.0)])
        assert fired == [[]], rule.name
        fired, _ = run(rule, [report(5, layers, base_random_frac=0.0, update_norm_total=3.0)])
        assert len(fired[0]) == 1, rule.name


def test_knowledge_loss_fires_on_the_probe_and_explains_with_the_spectra():
    rule = KnowledgeLoss(kl=0.2, loss_rise=0.2, patience=2)
    quiet = StepReport.from_flat(1, {"spectral/probe/kl": 0.1, "spectral/probe/loss_rel": 0.05})
    layers = {"spectral/update_rel/h.0.mlp": 0.01, "spectral/update_rel/h.2.mlp": 0.05, "spectral/intruders/h.2.mlp": 3}
    loud = {"spectral/probe/kl": 0.41, "spectral/probe/loss_rel": 0.38, "spectral/model/rho1_mean": 0.3, **layers}
    fired, _ = run(rule, [quiet, StepReport.from_flat(2, loud), StepReport.from_flat(3, loud)])
    assert [len(a) for a in fired] == [0, 0, 1]  # patience 2
    alert = fired[2][0]
    assert alert.reason == "KL 0.41 > 0.2; held-out loss +38% > +20%"
    assert "KL to the base 0.41 nats/token" in alert.message and "+38.0%" in alert.message
    assert "largest updates in h.2.mlp (0.05 of ‖W₀‖), h.0.mlp" in alert.message
    assert "3 intruder directions" in alert.message and "0.30" in alert.message
    # without a probe there is nothing to judge
    assert run(rule, [report(1, {"update_rel": {"a": 0.9}}), report(2, {"update_rel": {"a": 0.9}})])[0] == [[], []]
    with pytest.raises(ConfigError):
        KnowledgeLoss(kl=None, loss_rise=None)
