"""ConsoleSink's one-line summary and the in-memory sink."""

from __future__ import annotations

import logging

from spectral_monitor.records import Alert, StepReport
from spectral_monitor.sinks.base import Sink
from spectral_monitor.sinks.console import ConsoleSink, summarize
from spectral_monitor.sinks.memory import MemorySink

ALERT = Alert(rule="rank1_collapse", step=50, reason="rho1>0.9 in 100% of layers", message="collapsed")


def report(step: int = 50, alerts=(), skipped=None, **model: float) -> StepReport:
    metrics = {f"spectral/model/{k}": v for k, v in model.items()}
    metrics["spectral/rho1/a"] = 0.5
    return StepReport.from_flat(step, metrics, alerts=list(alerts), skipped=dict(skipped or {}), elapsed_s=0.0123)


def test_summary_line_has_step_rho1_and_alerts():
    r = report(
        alerts=[ALERT, Alert(rule="erank_drop", step=50, reason="r", message="m")],
        skipped={"c": "non-finite"},
        layers=24.0,
        rho1_mean=0.3125,
        rho1_max=0.52,
        erank_mean=7.5,
        alpha_median=3.1,
        alpha_reliable_frac=0.75,
        update_rel_max=0.0123,
        align_prev_mean=0.9,
    )
    line = summarize(r)
    assert "\n" not in line
    assert line.startswith("step 50 | 24 layers | rho1 0.312 (max 0.52)")
    for part in ("erank 7.5", "alpha 3.1 (75% reliable)", "|dW|/|W0| 0.0123 max", "align 0.9", "12 ms", "1 skipped"):
        assert part in line, part
    assert "ALERTS: rank1_collapse, erank_drop" in line


def test_summary_of_an_empty_report_uses_dashes():
    line = summarize(StepReport(step=1))
    assert line.startswith("step 1 | - layers | rho1 - (max -)")
    assert "ALERT" not in line and "skipped" not in line


def test_console_sink_prints_or_logs(capsys, caplog):
    printer = ConsoleSink(use_print=True)
    printer.start({"rank": 8})
    printer.write(report(7, rho1_mean=0.25))
    printer.finish()
    out = capsys.readouterr().out
    assert out.startswith("step 7 |") and "rho1 0.25" in out
    caplog.set_level(logging.INFO, logger="spectral_monitor")
    ConsoleSink(use_print=False).write(report(8, alerts=[ALERT], rho1_mean=0.95))
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "spectral_monitor"]
    assert len(messages) == 1 and messages[0].startswith("step 8 |") and "ALERTS: rank1_collapse" in messages[0]
    custom = logging.getLogger("my.logger")
    caplog.set_level(logging.INFO, logger="my.logger")
    ConsoleSink(logger=custom).write(report(9))
    assert any(rec.name == "my.logger" and "step 9" in rec.getMessage() for rec in caplog.records)


def test_memory_sink_keeps_reports_series_and_alerts():
    sink = MemorySink()
    assert isinstance(sink, Sink) and isinstance(ConsoleSink(), Sink)
    sink.start({"rank": 4})
    sink.write(report(1, rho1_mean=0.1))
    sink.write(report(2, alerts=[ALERT]))
    sink.write(report(3, rho1_mean=0.3))
    sink.finish()
    assert sink.config == {"rank": 4} and sink.finished
    assert [r.step for r in sink.reports] == [1, 2, 3]
    assert sink.series("spectral/model/rho1_mean") == [(1, 0.1), (3, 0.3)]
    assert sink.series("spectral/rho1/a") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert sink.alerts == [ALERT]
