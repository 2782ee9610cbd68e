"""StepReport / Alert records: the structured fields and the one flat key schema."""

from __future__ import annotations

import json
import math

import torch

from spectral_monitor.records import Alert, StepReport, layer_sort_key


def make_report() -> StepReport:
    alert = Alert(rule="rank1_collapse", step=7, reason="rho1>0.9", message="collapsed", layers=("a",), stop=True)
    return StepReport(
        step=7,
        layers={"a": {"rho1": 0.95, "update_norm": 1.0}, "b": {"rho1": 0.5, "update_norm": 2.0}},
        aggregates={"rho1": {"mean": 0.725, "max": 0.95}},
        by_type={"rho1": {"q": 0.725}},
        model={"update_norm_total": 2.236, "layers": 2.0},
        context={"reward": 0.3},
        probes={"kl": 0.1, "rank1/acc": 0.5},
        spectra={"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([0.25])},
        alerts=[alert],
        skipped={"c": "non-finite weights (NaN/Inf)"},
        elapsed_s=0.125,
    )


def test_flat_keys_follow_the_schema():
    assert make_report().flat() == {
        "spectral/rho1/a": 0.95,
        "spectral/update_norm/a": 1.0,
        "spectral/rho1/b": 0.5,
        "spectral/update_norm/b": 2.0,
        "spectral/model/rho1_mean": 0.725,
        "spectral/model/rho1_max": 0.95,
        "spectral/model/rho1_mean/q": 0.725,
        "spectral/model/update_norm_total": 2.236,
        "spectral/model/layers": 2.0,
        "spectral/alert/rank1_collapse": 1.0,
        "spectral/context/reward": 0.3,
        "spectral/probe/kl": 0.1,
        "spectral/probe/rank1/acc": 0.5,
    }
    r = make_report()
    assert r.metrics == r.flat()
    assert set(r.flat(model=False)) == {
        "spectral/rho1/a",
        "spectral/update_norm/a",
        "spectral/rho1/b",
        "spectral/update_norm/b",
    }
    assert not any(k.split("/")[1] in ("rho1", "update_norm") for k in r.flat(layers=False))


def test_fields_are_read_without_keys():
    r = make_report()
    assert r.layer_values("rho1") == {"a": 0.95, "b": 0.5}
    assert r.layer_values("missing") == {}
    assert r.layer_names == ["a", "b"]
    assert r.aggregate("rho1", "max") == 0.95 and r.aggregate("alpha") is None


def test_a_probe_key_with_slashes_is_not_read_as_a_layer_metric():
    back = StepReport.from_flat(1, {"spectral/probe/rank1/acc": 0.5, "spectral/rho1/h.0.attn": 0.3})
    assert back.probes == {"rank1/acc": 0.5}
    assert back.layers == {"h.0.attn": {"rho1": 0.3}}


def test_overview_is_the_compact_model_level_view():
    overview = make_report().overview()
    assert overview == {
        "spectral/model/rho1_mean": 0.725,
        "spectral/model/rho1_max": 0.95,
        "spectral/model/update_norm_total": 2.236,
        "spectral/alert/rank1_collapse": 1.0,
        "spectral/probe/kl": 0.1,
        "spectral/probe/rank1/acc": 0.5,
    }


def test_record_round_trip_through_json_restores_every_field():
    r = make_report()
    rec = json.loads(json.dumps(r.to_record()))
    assert rec["spectra"] == {"a": [3.0, 1.0], "b": [0.25]}
    back = StepReport.from_record(rec)
    for name in ("step", "layers", "aggregates", "by_type", "model", "context", "probes", "skipped", "elapsed_s"):
        assert getattr(back, name) == getattr(r, name), name
    assert back.alerts == r.alerts and back.alerts[0].layers == ("a",)
    assert back.layer_names == ["a", "b"]  # model order survives
    assert back.spectra["a"].dtype == torch.float32 and torch.equal(back.spectra["a"], r.spectra["a"])


def test_from_record_defaults_and_alert_as_dict():
    back = StepReport.from_record({"step": "3"})
    assert back.step == 3 and back.metrics == {} and back.alerts == [] and back.skipped == {}
    alert = Alert(rule="r", step=1, reason="x", message="y")
    assert alert.as_dict() == {"rule": "r", "step": 1, "reason": "x", "message": "y", "layers": [], "stop": False}
    nan = StepReport.from_record({"step": 1, "metrics": {"spectral/model/alpha_mean": float("nan")}})
    assert math.isnan(nan.aggregate("alpha"))


def test_layer_sort_key_is_model_order():
    names = ["h.10.attn", "h.2.mlp", "h.2.attn", "h.0.attn", "h.1.attn", "embed"]
    assert sorted(names, key=layer_sort_key) == ["embed", "h.0.attn", "h.1.attn", "h.2.attn", "h.2.mlp", "h.10.attn"]
