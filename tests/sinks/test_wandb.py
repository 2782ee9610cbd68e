"""WandbSink: real offline W&B runs, read back from the run's ``.wandb`` file."""

from __future__ import annotations

import sys

import pytest

from spectral_monitor._imports import is_available
from spectral_monitor.errors import ConfigError, MissingDependencyError
from spectral_monitor.records import Alert, StepReport
from spectral_monitor.sinks.wandb import WandbSink
from tests.readers import (
    read_wandb_alerts,
    read_wandb_config,
    read_wandb_history,
    read_wandb_metric_definitions,
    read_wandb_table,
)

wandb = pytest.importorskip("wandb")

LAYERS = ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn"]
STEPS = [5, 10, 20]
ALERT = Alert(
    rule="rho1_collapse",
    step=20,
    reason="rho1 > 0.9 for 2 measurements",
    message="The update collapsed onto one direction.",
    layers=("h.0.mlp.c_fc",),
    stop=True,
)
HF_STEP = "train/global_step"


def make_report(i: int, step: int) -> StepReport:
    """Report ``i`` of three; the last one carries an alert."""
    values = {
        f"spectral/{m}/{layer}": step / 4 + j / 8 + k + 0.1
        for k, m in enumerate(["rho1", "alpha", "update_norm"])
        for j, layer in enumerate(LAYERS)
    }
    values |= {
        "spectral/model/rho1_mean": step / 16 + 0.01,
        "spectral/model/alpha_max": 3.3 + i,
        "spectral/model/measure_s": 0.123,
    }
    report = StepReport.from_flat(step, values, alerts=[ALERT] if i == 2 else [])
    for layer in LAYERS:  # every α fit reliable, so the α heatmap is drawn
        report.layers[layer]["alpha_reliable"] = 1.0
    return report


REPORTS = [make_report(i, s) for i, s in enumerate(STEPS)]


def spectral_rows(rows: list[dict], step_key: str) -> dict[int, dict]:
    """``{step: row}`` of the history rows that carry spectral scalars."""
    return {row[step_key]: row for row in rows if "spectral/model/rho1_mean" in row}


def _written(report: StepReport) -> dict[str, float]:
    """What a sink with the overview and per-layer scalars logs: every key of the report but the
    per-layer bookkeeping (update_norm, alpha_reliable)."""
    skip = ("spectral/update_norm/", "spectral/alpha_reliable/")
    return {k: v for k, v in report.metrics.items() if not k.startswith(skip)}


def test_owned_run_logs_every_value_at_its_step(wandb_dir):
    sink = WandbSink(project="spectral-test", table_every=2, log_layers=True)
    sink.start({"rank": 8, "every": 25})
    for report in REPORTS:
        sink.write(report)
    sink.finish()
    sink.finish()
    assert wandb.run is None  # the sink started the run, so it finished it

    rows = spectral_rows(read_wandb_history(wandb_dir), "_step")
    assert sorted(rows) == STEPS
    for report in REPORTS:
        for key, value in _written(report).items():
            assert rows[report.step][key] == value, (report.step, key)
        assert not any(k.startswith("spectral/update_norm/") for k in rows[report.step])
    assert read_wandb_config(wandb_dir)["spectral_monitor"] == {"rank": 8, "every": 25}
    assert read_wandb_metric_definitions(wandb_dir) == []  # no step_key: plain `step=`

    # per-layer table on reports 1 and 3 (table_every=2), latest values of each layer
    assert [s for s in STEPS if "spectral/layers" in rows[s]] == [5, 20]
    table = read_wandb_table(wandb_dir, rows[20]["spectral/layers"])
    assert [r["layer"] for r in table] == sorted(LAYERS)
    for r in table:
        for metric in ["rho1", "alpha", "update_norm"]:
            assert r[metric] == REPORTS[2].metrics[f"spectral/{metric}/{r['layer']}"]

    # heatmaps: images while training (matplotlib), the long table at finish
    if is_available("matplotlib"):
        assert rows[20]["spectral/heatmap/rho1"]["_type"] == "image-file"
        assert rows[20]["spectral/heatmap/alpha"]["_type"] == "image-file"
    heat = read_wandb_table(wandb_dir, rows[20]["spectral/heatmap_table/rho1"])
    assert heat == [
        {"step": r.step, "layer": layer, "value": r.metrics[f"spectral/rho1/{layer}"]}
        for r in REPORTS
        for layer in sorted(LAYERS)
    ]

    # alerts: a readable table in the history and a W&B alert
    [alert_row] = read_wandb_table(wandb_dir, rows[20]["spectral/alerts"])
    assert alert_row == {
        "step": 20,
        "rule": "rho1_collapse",
        "reason": ALERT.reason,
        "message": ALERT.message,
        "layers": "h.0.mlp.c_fc",
        "stop": True,
    }
    [sent] = read_wandb_alerts(wandb_dir)
    assert sent["title"] == "spectral_monitor: rho1_collapse"
    assert sent["level"] == "ERROR"  # stop=True
    assert sent["text"] == f"step 20: {ALERT.message}"  # said once: no prefix, no repeated reason


def hf_like_run():
    """A run set up the way Hugging Face's WandbCallback does it (step metric for ``*``)."""
    run = wandb.init(project="spectral-test")
    run.define_metric(HF_STEP)
    run.define_metric("*", step_metric=HF_STEP, step_sync=True)
    return run


def log_like_hf_with(sink: WandbSink) -> None:
    """30 optimizer steps, two rows each logged without ``step=`` (so W&B's own step counter
    runs ahead of the optimizer step); the sink writes at steps 5, 10, 20."""
    reports = {r.step: r for r in REPORTS}
    for step in range(1, 31):
        wandb.run.log({"train/loss": 1.0 / step, HF_STEP: step})
        wandb.run.log({"train/reward": float(step), HF_STEP: step})
        if step in reports:
            sink.write(reports[step])


def test_step_key_logs_alongside_an_active_run_and_leaves_it_open(wandb_dir):
    run = hf_like_run()
    sink = WandbSink(step_key=HF_STEP, log_layers=True)
    sink.start({})
    assert sink.run is run
    log_like_hf_with(sink)
    sink.finish()
    assert wandb.run is run  # not the sink's run: still active
    run.log({"train/loss": 0.0, HF_STEP: 31})
    run.finish()

    history = read_wandb_history(wandb_dir)
    rows = spectral_rows(history, HF_STEP)
    assert sorted(rows) == STEPS
    for report in REPORTS:
        for key, value in _written(report).items():
            assert rows[report.step][key] == value, (report.step, key)
    assert [row[HF_STEP] for row in history if "train/loss" in row] == list(range(1, 32))
    assert {"glob_name": "spectral/*", "step_metric": HF_STEP} in read_wandb_metric_definitions(wandb_dir)


def test_explicit_step_behind_the_run_step_is_dropped_by_wandb(wandb_dir):
    """Why ``step_key`` exists: W&B ignores a row whose ``step=`` is below its own counter
    (one ``WARNING Tried to log to step ... less than the current step`` on screen, none
    when ``WANDB_SILENT``)."""
    hf_like_run()
    sink = WandbSink()
    sink.start({})
    log_like_hf_with(sink)
    sink.finish()
    wandb.run.finish()
    assert spectral_rows(read_wandb_history(wandb_dir), HF_STEP) == {}


def test_by_default_only_the_overview_is_scalar(wandb_dir):
    sink = WandbSink(wandb.init(project="spectral-test"), table_every=0, heatmap_metrics=())
    sink.start({})
    sink.write(REPORTS[0])
    sink.finish()
    wandb.run.finish()
    [row] = read_wandb_history(wandb_dir)
    assert {k for k in row if not k.startswith("_")} == {
        "spectral/model/rho1_mean",
        "spectral/model/alpha_max",
        "spectral/model/measure_s",
    }


def test_bad_table_every():
    with pytest.raises(ConfigError, match="-1"):
        WandbSink(table_every=-1)


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingDependencyError, match=r"spectral-monitor\[wandb\]"):
        WandbSink()


def test_tables_and_heatmaps_list_layers_in_model_order(wandb_dir):
    layers = ["h.0.attn", "h.2.attn", "h.10.attn", "h.11.attn"]  # text order would be 0, 10, 11, 2
    report = StepReport(step=1, layers={name: {"rho1": 0.1 * i} for i, name in enumerate(layers)})
    sink = WandbSink(wandb.init(project="spectral-test"), heatmap_metrics=("rho1",))
    sink.start({})
    sink.write(report)
    sink.finish()
    wandb.run.finish()
    history = read_wandb_history(wandb_dir)
    [table] = [row["spectral/layers"] for row in history if "spectral/layers" in row]
    [heat] = [row["spectral/heatmap_table/rho1"] for row in history if "spectral/heatmap_table/rho1" in row]
    assert [r["layer"] for r in read_wandb_table(wandb_dir, table)] == layers
    assert [r["layer"] for r in read_wandb_table(wandb_dir, heat)] == layers
