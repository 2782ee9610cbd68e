"""The benchmark harness (``benchmarks/harness.py``) and the scripts' helpers, against independent oracles:
the clock semantics of sleep vs busy work, exact SVDs of the generated updates, torch's own FLOP
counter, the engine's batch plan; plus ``gpu.py --device cpu --tiny`` end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def test_timeit_separates_wall_and_cpu_time_and_counts_calls():
    calls = []

    def sleep():
        calls.append(1)
        time.sleep(0.03)

    t = harness.timeit(sleep, repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.wall) == len(t.cpu) == 3
    assert t.best >= 0.03 and t.median >= t.best
    assert t.cpu_best < 0.015  # sleeping takes no CPU time

    def spin():
        end = time.process_time() + 0.03
        while time.process_time() < end:
            pass

    busy = harness.timeit(spin, repeats=2, warmup=0)
    assert busy.cpu_best >= 0.03
    assert busy.best >= 0.99 * busy.cpu_best  # one busy thread: its CPU time cannot exceed the wall time
    # max_s stops the repeats early, after at least one run
    assert len(harness.timeit(sleep, repeats=50, warmup=0, max_s=0.05).wall) <= 3


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_generated_updates_have_the_documented_size(kind):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    d = harness.make_update(kind, W0, g, layer_seed=3)
    rel = float(torch.linalg.matrix_norm(d.double()) / torch.linalg.matrix_norm(W0.double()))
    assert rel == pytest.approx(harness.REL_SIZE, rel=0.03)
    half = harness.make_update(kind, W0, torch.Generator().manual_seed(0), scale=0.5, layer_seed=3)
    assert float(torch.linalg.matrix_norm(half.double())) == pytest.approx(
        0.5 * float(torch.linalg.matrix_norm(d.double())), rel=1e-6
    )


def test_lowrank_update_holds_its_energy_in_eight_directions_that_persist():
    W0 = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    first = harness.make_update("lowrank", W0, torch.Generator().manual_seed(0), layer_seed=7).double()
    later = harness.make_update("lowrank", W0, torch.Generator().manual_seed(99), scale=0.1, layer_seed=7).double()
    s = torch.linalg.svdvals(first)
    share = float((s[:8] ** 2).sum() / (s**2).sum())
    assert 0.88 < share < 0.94  # 90 % planted, plus the noise's share of those 8 directions
    assert float(s[8] / s[7]) < 0.5  # a clear cut after rank 8
    # the later update's top-8 right subspace is the first one's (fresh noise, same directions)
    V1 = torch.linalg.svd(first, full_matrices=False).Vh[:8].T
    V2 = torch.linalg.svd(later, full_matrices=False).Vh[:8].T
    overlap = float(torch.linalg.matrix_norm(V1.T @ V2) ** 2 / 8)
    assert overlap > 0.9
    other = harness.make_update("lowrank", W0, torch.Generator().manual_seed(0), layer_seed=8).double()
    V3 = torch.linalg.svd(other, full_matrices=False).Vh[:8].T
    assert float(torch.linalg.matrix_norm(V1.T @ V3) ** 2 / 8) < 0.2  # another layer, other directions


def test_apply_update_writes_the_canonical_orientation_of_conv1d():
    transformers = pytest.importorskip("transformers")
    model = nn.Module()
    model.conv = transformers.pytorch_utils.Conv1D(24, 16)  # weight stored (in=16, out=24)
    model.lin = nn.Linear(16, 24)
    before = {n: harness.canonical(m).clone() for n, m in (("conv", model.conv), ("lin", model.lin))}
    harness.apply_update(model, ["conv", "lin"], "dense", seed=5)
    g = torch.Generator().manual_seed(5)
    for i, name in enumerate(["conv", "lin"]):
        expected = harness.make_update("dense", before[name], g, layer_seed=10_000 + i)
        assert torch.allclose(harness.canonical(getattr(model, name)) - before[name], expected, atol=1e-7)


def test_profile_measure_sums_the_engine_labels_per_batch():
    from spectral_monitor import SpectralMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(96, 64), nn.Linear(64, 128))
    monitor = SpectralMonitor(model)
    monitor.snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    report, phases = harness.profile_measure(monitor, 1)
    n_batches = len(monitor.planner.batches(monitor.specs, lambda s: monitor.config.rank, False))
    assert n_batches == 2  # two shapes
    assert phases.calls["dense"] == n_batches
    for label in ("fill", "svd", "base_basis", "intruders", "metrics"):
        assert phases.calls[label] == n_batches and phases.wall[label] > 0
    inside = sum(phases.wall.get(k, 0.0) for k in harness.PHASE_LABELS)
    assert inside <= phases.wall["dense"] * 1.001
    assert phases.wall["dense"] <= phases.total_s * 1.001
    assert phases.total_s == report.elapsed_s
    rows = phases.rows()
    assert rows[-1][0] == "measure() total" and len(rows[0]) == len(phases.headers())


def test_scan_gflop_matches_torch_flop_counter():
    """bench_scan's matmul count against torch's FLOP counter over real measurements (which also
    counts the small l x l products, a few percent)."""
    import bench_scan
    from torch.utils.flop_counter import FlopCounterMode

    from spectral_monitor import MonitorConfig, SpectralMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(384, 512))
    monitor = SpectralMonitor(model, MonitorConfig(full_every=2))  # #1: cold, W_0's basis; #2: warm + full spectrum
    monitor.snapshot()
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        predicted = bench_scan.scan_gflop(monitor)
        with FlopCounterMode(display=False) as counter:
            monitor.measure(step)
        counted = counter.get_total_flops() / 1e9
        assert predicted <= counted <= 1.1 * predicted, (step, predicted, counted)


def test_results_json_keeps_tables_and_data(tmp_path, capsys):
    args = argparse.Namespace(device="cpu", json=str(tmp_path / "r.json"), quick=True, threads=None)
    out = harness.start("test", args)
    out.table("a table", ["x", "y"], [[1, harness.fmt_s(0.0123)]], note="a note")
    out.data["timing"] = harness.timeit(lambda: None, repeats=2, warmup=0)
    out.data["nan"] = math.nan
    out.finish()
    printed = capsys.readouterr().out
    assert "| x | y       |" in printed and "12.3 ms" in printed and "a note" in printed
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["tables"][0] == {"title": "a table", "headers": ["x", "y"], "rows": [["1", "12.3 ms"]]}
    assert saved["data"]["nan"] is None and len(saved["data"]["timing"]["wall_s"]) == 2
    assert saved["machine"]["loadavg_1m_at_end"] >= 0 and "library_sha256_12" in saved["machine"]


def test_overhead_setting_is_skipped_with_a_note_unless_the_config_has_the_field():
    import bench_overhead

    from spectral_monitor import MonitorConfig

    configs, notes = bench_overhead.settings(argparse.Namespace(every=10, overhead=0.05))
    assert configs["every_n_steps=10"].every_n_steps == 10
    if "overhead" in {f.name for f in dataclasses.fields(MonitorConfig)}:
        assert configs["overhead=0.05"].overhead == 0.05 and not notes
    else:
        assert "overhead=0.05" not in configs and "no 'overhead' field" in notes[0]
    assert set(bench_overhead.settings(argparse.Namespace(every=0, overhead=None))[0]) == {"default"}


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            *(sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--tiny", "--threads", "1"),
            *("--skip", "pytest", "--json", str(path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(path.read_text())["data"]
    assert "errors" not in data
    rows = data["model_7b"]["measure_device"]
    assert [r["measurement"] for r in rows] == [1, 2, 3, 4] and rows[3]["profiled"]
    assert {"fill", "svd", "metrics"} <= set(rows[3]["profile"]["wall_s"])
    assert all(r["skipped"] == 0 for r in rows) and data["model_7b"]["weights"] == 2 * (4 * 64 * 64 + 3 * 64 * 172)
    assert len(data["rsvd"]) == 18 and set(data["fit_power_law"]) == {"224x42", "224x256"}
