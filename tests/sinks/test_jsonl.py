"""JsonlSink / read_jsonl: append-only, flushed, crash- and resume-tolerant, strict JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spectral_monitor.records import Alert, StepReport
from spectral_monitor.sinks.jsonl import JsonlSink, read_jsonl


def rep(step: int, value: float = 0.5, **extra: float) -> StepReport:
    return StepReport.from_flat(
        step,
        {"spectral/rho1/a": value, "spectral/model/rho1_mean": value, **extra},
        spectra={"a": torch.tensor([2.0, 1.0])},
        elapsed_s=0.01,
    )


def strict_lines(path) -> list[dict]:
    """Every line parsed as standard JSON (NaN/Infinity tokens rejected)."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_append_only_across_two_sink_instances(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    first = JsonlSink(path)
    first.start({"rank": 8, "layers": ("a",)})
    first.write(rep(1))
    first.write(rep(2))
    first.finish()
    second = JsonlSink(path)  # a resumed run opens the same file
    second.start({"rank": 8})
    second.write(rep(3))
    second.finish()
    second.finish()  # safe twice
    lines = strict_lines(path)
    assert [line.get("event", line.get("step")) for line in lines] == ["start", 1, 2, "start", 3]
    assert lines[0]["config"] == {"rank": 8, "layers": ["a"]}
    assert [r.step for r in read_jsonl(path)] == [1, 2, 3]


def test_each_write_is_flushed_while_the_sink_is_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.start({})
    sink.write(rep(5, 0.25))
    reports = read_jsonl(path)  # read by another reader while the file is still open
    assert [r.step for r in reports] == [5]
    assert reports[0].metrics["spectral/rho1/a"] == 0.25
    sink.write(rep(6))
    assert [r.step for r in read_jsonl(path)] == [5, 6]
    sink.finish()


def test_write_without_start_opens_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, fsync=True)
    sink.write(rep(1))
    sink.finish()
    assert strict_lines(path)[0] == {"event": "start", "config": {}}
    assert [r.step for r in read_jsonl(path)] == [1]


def test_torn_last_line_is_tolerated_but_a_corrupt_middle_line_is_not(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.start({})
    sink.write(rep(1))
    sink.write(rep(2))
    sink.finish()
    full = path.read_text()
    with path.open("a") as fh:
        fh.write('{"step": 3, "metrics": {"spectral/rho1/a": 0.')  # crash mid-write
    assert [r.step for r in read_jsonl(path)] == [1, 2]
    lines = full.splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_dedupe_keeps_the_latest_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlSink(path)
    for step in (1, 5, 10):
        first.write(rep(step, 0.1))
    first.finish()
    resumed = JsonlSink(path)  # resumed from the step-5 checkpoint: 10 is measured again
    resumed.write(rep(10, 0.9))
    resumed.write(rep(15, 0.9))
    resumed.finish()
    deduped = read_jsonl(path)
    assert [r.step for r in deduped] == [1, 5, 10, 15]
    assert deduped[2].metrics["spectral/rho1/a"] == 0.9
    everything = read_jsonl(path, dedupe=False)
    assert [(r.step, r.metrics["spectral/rho1/a"]) for r in everything] == [
        (1, 0.1),
        (5, 0.1),
        (10, 0.1),
        (10, 0.9),
        (15, 0.9),
    ]


def test_non_finite_values_round_trip_as_standard_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.write(rep(1, math.nan, **{"spectral/gap/a": math.inf, "spectral/model/x": -math.inf}))
    sink.finish()
    lines = strict_lines(path)  # valid JSON for any reader: no NaN/Infinity tokens
    assert lines[1]["metrics"]["spectral/rho1/a"] is None
    back = read_jsonl(path)[0]
    assert math.isnan(back.metrics["spectral/rho1/a"]) and math.isnan(back.metrics["spectral/model/rho1_mean"])
    assert back.metrics["spectral/gap/a"] == math.inf  # a rank-1 update's gap stays infinite
    assert back.metrics["spectral/model/x"] == -math.inf


def test_spectra_alerts_and_skipped_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    alert = Alert(rule="rank1_collapse", step=4, reason="rho1>0.9", message="m", layers=("a",), stop=True)
    report = rep(4)
    report.alerts.append(alert)
    report.skipped["b"] = "non-finite weights (NaN/Inf)"
    sink = JsonlSink(path)
    sink.write(report)
    sink.finish()
    back = read_jsonl(path)[0]
    assert back.alerts == [alert]
    assert back.skipped == {"b": "non-finite weights (NaN/Inf)"}
    assert torch.equal(back.spectra["a"], torch.tensor([2.0, 1.0]))
    assert back.elapsed_s == 0.01
