"""StepReport / Alert records and the key schema helpers."""

from __future__ import annotations

import json
import math

import torch

from spectral_monitor.records import Alert, StepReport, alert_key, layer_key, model_key, split_layer_key


def test_key_helpers_follow_the_schema():
    assert layer_key("rho1", "transformer.h.0.attn.c_attn") == "spectral/rho1/transformer.h.0.attn.c_attn"
    assert model_key("rho1_mean") == "spectral/model/rho1_mean"
    assert alert_key("rank1_collapse") == "spectral/alert/rank1_collapse"


def test_split_layer_key_inverts_layer_key_only():
    for metric, layer in [("rho1", "h.0.attn"), ("alpha_ks", "a/b/c"), ("erank", "0")]:
        assert split_layer_key(layer_key(metric, layer)) == (metric, layer)
    for key in (
        "spectral/model/rho1_mean",
        "spectral/model/rho1_mean/q",
        "spectral/alert/rank1_collapse",
        "spectral/monitor/measure_s",
        "spectral/context/reward",
        "other/rho1/h.0",
        "spectral/rho1",
        "loss",
    ):
        assert split_layer_key(key) is None, key


def make_report() -> StepReport:
    alert = Alert(rule="rank1_collapse", step=7, reason="rho1>0.9", message="collapsed", layers=("a",), stop=True)
    return StepReport(
        step=7,
        metrics={
            "spectral/rho1/a": 0.95,
            "spectral/rho1/b": 0.5,
            "spectral/update_norm/b": 2.0,
            "spectral/update_norm/a": 1.0,
            "spectral/model/rho1_mean": 0.725,
            "spectral/alert/rank1_collapse": 1.0,
            "spectral/context/reward": 0.3,
        },
        spectra={"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([0.25])},
        alerts=[alert],
        skipped={"c": "non-finite weights (NaN/Inf)"},
        elapsed_s=0.125,
    )


def test_layer_values_and_layers():
    r = make_report()
    assert r.layer_values("rho1") == {"a": 0.95, "b": 0.5}
    assert r.layer_values("alert") == {} and r.layer_values("context") == {}
    assert r.layer_values("missing") == {}
    assert r.layers == ["a", "b"]  # sorted, from update_norm


def test_record_round_trip_through_json():
    r = make_report()
    rec = json.loads(json.dumps(r.to_record()))
    assert rec["spectra"] == {"a": [3.0, 1.0], "b": [0.25]}
    back = StepReport.from_record(rec)
    assert back.step == 7 and back.metrics == r.metrics and back.skipped == r.skipped
    assert back.elapsed_s == 0.125
    assert back.alerts == r.alerts and back.alerts[0].layers == ("a",)
    assert set(back.spectra) == {"a", "b"}
    assert back.spectra["a"].dtype == torch.float32 and torch.equal(back.spectra["a"], r.spectra["a"])


def test_from_record_defaults_and_alert_as_dict():
    back = StepReport.from_record({"step": "3"})
    assert back.step == 3 and back.metrics == {} and back.alerts == [] and back.skipped == {}
    alert = Alert(rule="r", step=1, reason="x", message="y")
    assert alert.as_dict() == {"rule": "r", "step": 1, "reason": "x", "message": "y", "layers": [], "stop": False}
    assert math.isnan(StepReport.from_record({"step": 1, "metrics": {"k": float("nan")}}).metrics["k"])
