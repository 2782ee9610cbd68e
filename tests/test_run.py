"""MonitorRun: schedule, sinks, alerts, context, early stop and state."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from spectral_monitor.alerts import MetricThreshold, Rank1Collapse
from spectral_monitor.config import MonitorConfig
from spectral_monitor.records import Alert, StepReport
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks.memory import MemorySink

LOGGER = "spectral_monitor"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"q_proj": nn.Linear(12, 16), "v_proj": nn.Linear(12, 16)})


def plant_rank1(model: nn.Module, scale: float = 0.5) -> None:
    """Add scale·u vᵀ (unit u, v) to every weight: each layer's update is exactly rank 1."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.values():
            u = torch.randn(layer.weight.shape[0], generator=gen)
            v = torch.randn(layer.weight.shape[1], generator=gen)
            layer.weight.add_(scale * torch.outer(u / u.norm(), v / v.norm()))


class Recorder(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, report: StepReport) -> None:
        self.calls.append("write")
        super().write(report)


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    def start(self, run_config) -> None:
        pass

    def write(self, report: StepReport) -> None:
        self.calls += 1
        raise RuntimeError("disk full")

    def finish(self) -> None:
        raise AssertionError("a disabled sink is not called again")


def test_schedule_first_every_n_final_and_never_twice():
    sink = MemorySink()
    run = MonitorRun(net(), sinks=[sink], every_n_steps=5, rank=4, rules=[])
    decisions = [run.on_optimizer_step(step, final=step == 12) for step in range(1, 13)]
    assert [d.report.step for d in decisions if d.measured] == [1, 5, 10, 12]
    assert [r.step for r in sink.reports] == [1, 5, 10, 12]
    assert not run.on_optimizer_step(12, final=True).measured  # the final step again
    assert not run.on_optimizer_step(10).measured  # a step at or before the last measured one
    assert not run.should_measure(11, final=True)
    assert run.should_measure(15)
    run.finish()
    run.finish()  # idempotent
    assert sink.finished


def test_final_on_a_scheduled_step_measures_once():
    sink = MemorySink()
    run = MonitorRun(net(), sinks=[sink], every_n_steps=5, measure_first=False, rank=4, rules=[])
    for step in range(1, 11):
        run.on_optimizer_step(step, final=step == 10)
    run.on_optimizer_step(10, final=True)
    assert [r.step for r in sink.reports] == [5, 10]


def test_start_takes_the_base_and_tells_the_sinks():
    model = net()
    sink = MemorySink()
    run = MonitorRun(model, sinks=[sink], every_n_steps=1, rank=4, early_stop=True)
    run.start()
    assert run.monitor.has_base
    assert sink.config["layers_monitored"] == ["q_proj", "v_proj"]
    assert sink.config["base"]["kind"] == "device" and sink.config["early_stop"] is True
    assert sink.config["every_n_steps"] == 1
    plant_rank1(model)
    d = run.on_optimizer_step(1)
    assert d.report.metrics["spectral/update_norm/q_proj"] == pytest.approx(0.5, rel=1e-5)


def test_a_raising_sink_is_disabled_after_one_warning_and_training_goes_on(caplog):
    broken, memory = Broken(), MemorySink()
    run = MonitorRun(net(), sinks=[broken, memory], every_n_steps=1, rank=4, rules=[])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    decisions = [run.on_optimizer_step(step) for step in (1, 2, 3)]
    assert all(d.measured for d in decisions)
    assert broken.calls == 1
    assert [r.step for r in memory.reports] == [1, 2, 3]
    warnings = [rec.getMessage() for rec in caplog.records if "Broken" in rec.getMessage()]
    assert len(warnings) == 1
    assert "write()" in warnings[0] and "disk full" in warnings[0] and "disabled" in warnings[0]
    run.finish()  # the disabled sink's finish is not called
    assert memory.finished


def test_a_raising_sink_raises_in_strict_mode():
    run = MonitorRun(net(), sinks=[Broken()], every_n_steps=1, rank=4, rules=[], strict=True)
    with pytest.raises(RuntimeError, match="disk full"):
        run.on_optimizer_step(1)


def test_sinks_are_not_called_off_the_main_process():
    sink = MemorySink()
    run = MonitorRun(net(), sinks=[sink], every_n_steps=1, rank=4, is_main=False)
    assert run.on_optimizer_step(1).measured
    assert sink.reports == [] and sink.config == {}


def test_a_failing_measurement_is_skipped_unless_strict(monkeypatch, caplog):
    run = MonitorRun(net(), every_n_steps=1, rank=4)

    def boom(step, layers=None):
        raise ValueError("bad layer")

    monkeypatch.setattr(run.monitor, "measure", boom)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    d = run.on_optimizer_step(1)
    assert not d.measured and not d.stop and d.summary() == {}
    assert any("bad layer" in rec.getMessage() for rec in caplog.records)
    strict = MonitorRun(net(), every_n_steps=1, rank=4, strict=True)
    monkeypatch.setattr(strict.monitor, "measure", boom)
    with pytest.raises(ValueError, match="bad layer"):
        strict.on_optimizer_step(1)


def test_decision_summary_holds_only_finite_model_alert_context_keys():
    report = StepReport.from_flat(
        1,
        {
            "spectral/rho1/q_proj": 0.5,
            "spectral/model/rho1_mean": 0.5,
            "spectral/model/alpha_mean": math.nan,
            "spectral/model/gap_max": math.inf,
            "spectral/context/reward": 0.25,
            "spectral/model/measure_s": 0.01,
        },
        alerts=[Alert(rule="rank1_collapse", step=1, reason="r", message="m")],
    )
    assert Decision(report).summary() == {
        "spectral/model/rho1_mean": 0.5,
        "spectral/model/measure_s": 0.01,
        "spectral/alert/rank1_collapse": 1.0,
        "spectral/context/reward": 0.25,
    }
    assert Decision().summary() == {} and not Decision().measured


def test_context_is_recorded_beside_the_spectra():
    model = net()
    run = MonitorRun(model, every_n_steps=2, rank=4, rules=[])
    run.record_context({"reward": 1.5, "kl": 2, "done": True, "bad": math.nan, "name": "x", "inf": math.inf})
    assert run.context == {"reward": 1.5, "kl": 2.0}
    d = run.on_optimizer_step(1)
    assert d.report.metrics["spectral/context/reward"] == 1.5
    assert d.report.metrics["spectral/context/kl"] == 2.0
    assert "spectral/context/done" not in d.report.metrics
    summary = d.summary()
    assert summary["spectral/context/reward"] == 1.5
    assert "spectral/model/update_norm_total" in summary
    assert all(k.startswith(("spectral/model/", "spectral/alert/", "spectral/context/")) for k in summary)
    assert not any(k.startswith("spectral/rho1/") for k in summary)
    run.record_context({"reward": 2.5})
    assert run.on_optimizer_step(2).report.metrics["spectral/context/reward"] == 2.5


def test_alert_fires_into_metrics_and_early_stop(caplog):
    model = net()
    sink = MemorySink()
    run = MonitorRun(
        model, sinks=[sink], every_n_steps=1, rank=4, early_stop=True, rules=[Rank1Collapse(patience=1, stop=True)]
    )
    run.start()
    plant_rank1(model)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    decisions = [run.on_optimizer_step(step) for step in (1, 2, 3)]
    for d in decisions:
        assert d.report.metrics["spectral/alert/rank1_collapse"] == 1.0
        assert d.summary()["spectral/alert/rank1_collapse"] == 1.0
        assert d.stop
        assert len(d.reasons) == 1 and d.reasons[0].startswith("rank1_collapse: ")
        assert "rank-1 share > 0.9" in d.reasons[0]
    assert [a.rule for a in sink.alerts] == ["rank1_collapse"] * 3
    assert sink.reports[0].alerts[0].layers == ("q_proj", "v_proj")
    alert_warnings = [r for r in caplog.records if "rank1_collapse" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(alert_warnings) == 1  # warned when it starts firing, not on every step


def test_alert_without_early_stop_does_not_stop():
    model = net()
    run = MonitorRun(model, every_n_steps=1, rank=4, rules=[Rank1Collapse(patience=1, stop=True)])
    run.start()
    plant_rank1(model)
    d = run.on_optimizer_step(1)
    assert d.report.metrics["spectral/alert/rank1_collapse"] == 1.0
    assert not d.stop and d.reasons == ()
    quiet = MonitorRun(net(), every_n_steps=1, rank=4, rules=[Rank1Collapse(patience=1, stop=True)])
    d = quiet.on_optimizer_step(1)  # ΔW = 0: nothing fires
    assert "spectral/alert/rank1_collapse" not in d.report.metrics and d.report.alerts == []


def test_state_round_trip_keeps_rule_states_context_and_schedule():
    model = net()
    cfg = MonitorConfig(every_n_steps=1, rank=4)

    def rules():
        return [MetricThreshold(name="moved", key="spectral/model/update_norm_total", above=0.1, patience=2)]

    a = MonitorRun(model, cfg, rules=rules())
    a.start()
    plant_rank1(model)
    a.record_context({"reward": 0.75})
    d1 = a.on_optimizer_step(1)
    assert d1.report.alerts == [] and a.rule_states["moved"]["count"] == 1
    state = a.state_dict()

    b = MonitorRun(model, cfg, rules=rules())
    b.monitor.set_base(a.monitor.store)
    b.load_state_dict(state)
    assert b.rule_states == a.rule_states and b.rule_states is not a.rule_states
    assert b.context == {"reward": 0.75}
    assert not b.should_measure(1)
    d2 = b.on_optimizer_step(2)
    assert [x.rule for x in d2.report.alerts] == ["moved"]  # the second consecutive hit, across the resume
    assert d2.report.metrics["spectral/alert/moved"] == 1.0
    assert d2.report.metrics["spectral/context/reward"] == 0.75
    assert "spectral/align_prev/q_proj" in d2.report.metrics


def test_update_norm_blowup_is_quiet_on_a_healthy_run_with_the_default_schedule():
    from spectral_monitor.alerts import UpdateNormBlowup

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    y = (x @ torch.randn(16, 4)).argmax(-1)
    run = MonitorRun(model, rank=4, rules=[UpdateNormBlowup(max_rel=10.0)])  # only the growth part
    run.start()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fired = []
    for step in range(1, 51):
        idx = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        decision = run.on_optimizer_step(step)
        if decision.measured:
            fired += [(step, a.reason) for a in decision.report.alerts]
    assert fired == []


def _step_all(run, model, steps):
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        run.on_optimizer_step(step)


def test_a_zero_based_loop_measures_its_first_step_once():
    model = net()
    sink = MemorySink()
    run = MonitorRun(model, every_n_steps=5, rank=4, sinks=[sink], rules=[])
    run.start()
    _step_all(run, model, range(0, 11))
    assert [r.step for r in sink.reports] == [0, 5, 10]


def test_starting_late_says_where_the_base_was_taken(caplog):
    """Without start(), the first measured step takes the base and says so once; with start()
    after some steps, the first measurement says that ΔW holds only the updates since then."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = net()
    run = MonitorRun(model, every_n_steps=5, rank=4, sinks=[MemorySink()], rules=[])
    _step_all(run, model, range(3, 11))
    [msg] = [r.getMessage() for r in caplog.records if "start() was not called" in r.getMessage()]
    assert "after step 3" in msg
    caplog.clear()
    later = MonitorRun(net(), every_n_steps=5, rank=4, sinks=[MemorySink()], rules=[], measure_first=False)
    later.start()
    _step_all(later, later.monitor.model, range(5, 11))
    [msg] = [r.getMessage() for r in caplog.records if "the first step measured is" in r.getMessage()]
    assert "is 5" in msg


def test_nothing_is_measured_after_finish(caplog):
    model = net()
    sink = MemorySink()
    run = MonitorRun(model, every_n_steps=1, rank=4, sinks=[sink], rules=[])
    run.start()
    _step_all(run, model, [1])
    run.finish()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _step_all(run, model, [2, 3])
    assert [r.step for r in sink.reports] == [1] and sink.finished
    assert len([r for r in caplog.records if "after finish()" in r.getMessage()]) == 1
    run.start()  # an explicit restart measures again
    _step_all(run, model, [4])
    assert [r.step for r in sink.reports] == [1, 4]


def test_starting_after_some_steps_warns_that_earlier_updates_are_not_seen(caplog):
    model = net()
    run = MonitorRun(model, every_n_steps=5, rank=4, rules=[])
    run.start()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _step_all(run, model, [37, 38])
    [msg] = [r.getMessage() for r in caplog.records if "first step measured is 37" in r.getMessage()]
    assert "call start() before the first optimizer step" in msg
    caplog.clear()
    fresh = MonitorRun(net(), every_n_steps=5, rank=4, rules=[])
    fresh.start()
    _step_all(fresh, fresh.monitor.model, [1, 2])
    assert not [r for r in caplog.records if "first step measured" in r.getMessage()]


def test_a_from_scratch_run_is_not_stopped_by_the_default_rules():
    """Random initialisation, large relative updates: the default rules have no trained base to
    compare against and stay quiet, with early_stop on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    sink = MemorySink()
    run = MonitorRun(model, every_n_steps=1, sinks=[sink], early_stop=True)
    run.start()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, 6):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not run.on_optimizer_step(step).stop
    assert sink.reports[-1].aggregate("update_rel", "max") > 0.5  # what update_norm_blowup would have seen
    assert sink.reports[-1].model["base_random_frac"] == 1.0
    assert not sink.alerts
