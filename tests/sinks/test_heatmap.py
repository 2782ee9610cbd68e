"""The heatmap column the W&B and TensorBoard sinks draw, and the image itself."""

from __future__ import annotations

import math

import pytest

from spectral_monitor.records import StepReport
from spectral_monitor.sinks.heatmap import heatmap_rgb, heatmap_values

pytest.importorskip("matplotlib")


def report(step: int) -> StepReport:
    out = StepReport(step=step)
    out.layers["h.0.attn"] = {"rho1": 0.5, "alpha": 2.5, "alpha_reliable": 1.0}
    out.layers["h.1.attn"] = {"rho1": 0.25, "alpha": 9.0, "alpha_reliable": 0.0}
    return out


def test_alpha_is_kept_only_where_its_fit_is_reliable_other_metrics_everywhere():
    alpha = heatmap_values(report(1), "alpha")
    assert alpha["h.0.attn"] == 2.5 and math.isnan(alpha["h.1.attn"])
    assert heatmap_values(report(1), "rho1") == {"h.0.attn": 0.5, "h.1.attn": 0.25}


def test_blank_cells_a_blank_column_and_an_all_blank_map_draw(recwarn):
    rows = [(1, {}), (2, heatmap_values(report(2), "alpha")), (3, {"h.0.attn": math.nan, "h.1.attn": 3.0})]
    for grid in (rows, [(1, {"h.0.attn": math.nan, "h.1.attn": math.nan})]):  # the last: no reliable α yet
        image = heatmap_rgb("alpha", grid)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert not [w for w in recwarn if "matplotlib" in str(w.filename) or "singular" in str(w.message)]
