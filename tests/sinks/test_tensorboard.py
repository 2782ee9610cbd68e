"""TensorBoardSink: write real event files, read them back with tensorboard's EventAccumulator."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectral_monitor.errors import MissingDependencyError
from spectral_monitor.records import Alert, StepReport
from spectral_monitor.sinks.tensorboard import TensorBoardSink
from tests.readers import (
    read_tensorboard_custom_scalars,
    read_tensorboard_histograms,
    read_tensorboard_images,
    read_tensorboard_scalars,
    read_tensorboard_texts,
)

pytest.importorskip("tensorboard")

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


def make_report(i: int, step: int) -> StepReport:
    """Report ``i``: dyadic values (exact in float32); ``erank`` appears only in the last one."""
    metrics = ["rho1", "alpha", "update_norm"] + (["erank"] if i == 2 else [])
    values = {
        f"spectral/{m}/{layer}": step / 4 + j / 8 + k for k, m in enumerate(metrics) for j, layer in enumerate(LAYERS)
    }
    values |= {
        "spectral/model/rho1_mean": step / 16,
        "spectral/model/alpha_max": 3.0 + i,
        "spectral/model/rho1_mean/attn": step / 32,
        "spectral/model/measure_s": 0.25,
    }
    spectra = {layer: torch.linspace(step, 1.0, 6) / (j + 1) for j, layer in enumerate(LAYERS)}
    report = StepReport.from_flat(step, values, spectra=spectra, alerts=[ALERT] if i == 2 else [])
    for layer in LAYERS:  # every α fit reliable, so the α heatmap is drawn
        report.layers[layer]["alpha_reliable"] = 1.0
    return report


REPORTS = [make_report(i, s) for i, s in enumerate(STEPS)]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """One run: start, three reports, finish (twice: must be safe)."""
    path = tmp_path_factory.mktemp("tb")
    sink = TensorBoardSink(str(path), log_layers=True, histograms=True)
    sink.start({"rank": 8})
    for report in REPORTS:
        sink.write(report)
    sink.finish()
    sink.finish()
    return path


def _written(report: StepReport) -> dict[str, float]:
    """What a sink with the overview and per-layer scalars writes: every key of the report but the
    per-layer bookkeeping (update_norm, alpha_reliable) and the per-type means."""
    return {
        k: v
        for k, v in report.metrics.items()
        if not k.startswith(("spectral/update_norm/", "spectral/alpha_reliable/"))
        and k != "spectral/model/rho1_mean/attn"
    }


def test_scalars_exact_values_at_exact_steps(logdir):
    scalars = read_tensorboard_scalars(logdir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for report in REPORTS:
        for key, value in _written(report).items():
            expected.setdefault(key, []).append((report.step, value))
    assert scalars == expected
    assert scalars["spectral/erank/h.1.attn.c_attn"] == [(20, 20 / 4 + 2 / 8 + 3)]


def test_singular_value_histograms_per_layer(logdir):
    histograms = read_tensorboard_histograms(logdir)
    assert set(histograms) == {f"spectral/singular_values/{layer}" for layer in LAYERS}
    for layer in LAYERS:
        series = histograms[f"spectral/singular_values/{layer}"]
        assert [step for step, _ in series] == STEPS
        for (_, hist), report in zip(series, REPORTS, strict=True):
            spectrum = report.spectra[layer]
            assert hist.num == spectrum.numel()
            assert hist.min == pytest.approx(spectrum.min().item())
            assert hist.max == pytest.approx(spectrum.max().item())
            assert hist.sum == pytest.approx(spectrum.sum().item(), rel=1e-6)


def test_alert_text(logdir):
    [(step, text)] = read_tensorboard_texts(logdir)["spectral/alerts"]
    assert step == 20
    assert "**rho1_collapse**" in text
    assert ALERT.reason in text and ALERT.message in text
    assert "h.0.mlp.c_fc" in text and "stops training" in text


def test_custom_scalars_layout_groups_layers_per_metric(logdir):
    layout = read_tensorboard_custom_scalars(logdir)
    # the newest layout includes erank, which only the third report had
    assert set(layout) == {"spectral overview", "spectral layers"}
    assert layout["spectral layers"] == {m: [f"^spectral/{m}/.*"] for m in ["rho1", "erank", "alpha"]}
    assert list(layout["spectral layers"]) == ["rho1", "erank", "alpha"]  # the charts to look at first, first
    assert list(layout["spectral overview"]) == ["rho1", "alpha"]
    # every per-layer and aggregate tag lands in its metric's chart and no other
    charts = {(cat, title): regexes for cat, c in layout.items() for title, regexes in c.items()}
    for tag in read_tensorboard_scalars(logdir):
        if tag.startswith(("spectral/model/measure_s", "spectral/alert/")):
            continue
        hits = [key for key, regexes in charts.items() if any(re.match(r, tag) for r in regexes)]
        metric = tag.split("/")[2].split("_")[0] if tag.startswith("spectral/model/") else tag.split("/")[1]
        category = "spectral overview" if tag.startswith("spectral/model/") else "spectral layers"
        assert hits == [(category, metric)], tag


def test_defaults_write_the_overview_and_heatmaps_and_the_layout_finds_trainer_keys(tmp_path):
    pytest.importorskip("matplotlib")
    sink = TensorBoardSink(str(tmp_path), model_prefix="train/")
    sink.start({})
    for report in REPORTS:
        sink.write(report)
    sink.finish()
    scalars = read_tensorboard_scalars(tmp_path)
    assert set(scalars) == {
        "spectral/model/rho1_mean",
        "spectral/model/alpha_max",
        "spectral/model/measure_s",
        "spectral/alert/rho1_collapse",
    }
    images = read_tensorboard_images(tmp_path)
    assert set(images) == {"spectral/heatmap/rho1", "spectral/heatmap/alpha", "spectral/heatmap/erank"}
    assert [step for step, _ in images["spectral/heatmap/rho1"]] == STEPS
    [regex] = read_tensorboard_custom_scalars(tmp_path)["spectral overview"]["rho1"]
    assert re.match(regex, "train/spectral/model/rho1_mean") and re.match(regex, "spectral/model/rho1_max")
    assert not re.match(regex, "train/spectral/model/rho1_mean/attn")


def test_histograms_skip_non_finite_values(tmp_path):
    sink = TensorBoardSink(str(tmp_path), histograms=True)
    sink.start({})
    nan = float("nan")
    sink.write(StepReport(step=3, spectra={"a": torch.tensor([3.0, nan, 1.0]), "b": torch.tensor([nan])}))
    sink.finish()
    histograms = read_tensorboard_histograms(tmp_path)
    assert list(histograms) == ["spectral/singular_values/a"]
    [(step, hist)] = histograms["spectral/singular_values/a"]
    assert (step, hist.num, hist.min, hist.max) == (3, 2, 1.0, 3.0)


class RecordingWriter:
    """A duck-typed writer with only ``add_scalar`` and ``flush`` (e.g. a custom logger)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1


def test_given_writer_is_used_and_not_closed():
    writer = RecordingWriter()
    sink = TensorBoardSink(writer=writer)
    sink.start({})
    sink.write(REPORTS[2])
    sink.finish()
    written = {"spectral/model/rho1_mean", "spectral/model/alpha_max", "spectral/model/measure_s"}
    written.add("spectral/alert/rho1_collapse")  # the overview, by default
    assert sorted(writer.scalars) == sorted((k, REPORTS[2].metrics[k], 20) for k in written)
    assert writer.flushes == 2  # after the write, and in finish
    assert sink.writer is writer


def test_missing_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"spectral-monitor\[tensorboard\]"):
        TensorBoardSink("unused")
    TensorBoardSink(writer=RecordingWriter())  # a given writer needs no tensorboard


def test_module_import_does_not_import_backends():
    code = (
        "import sys, spectral_monitor.sinks.tensorboard, spectral_monitor.sinks.wandb; "
        "print(sorted({'tensorboard', 'wandb'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "[]"
