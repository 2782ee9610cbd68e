"""``spectral-monitor demo --quick`` end to end: its summary says what its own log holds."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_the_quick_demo_runs_and_its_summary_matches_the_log(tmp_path, capsys):
    from spectral_monitor.demo import main

    assert main(["--quick", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "spectral_monitor" / "metrics.jsonl").open()]
    start = next(r for r in records if r.get("event") == "start")["config"]
    steps = [r for r in records if "step" in r]
    last = steps[-1]["metrics"]
    assert f"{len(steps)} measurements, steps {steps[0]['step']}-{steps[-1]['step']}" in out
    line = next(x for x in out.splitlines() if "held-out addition" in x)
    assert re.search(rf"{start['probe_base']['add_acc']:.2f} -> {last['spectral/probe/add_acc']:.2f}", line)
    line = next(x for x in out.splitlines() if "held-out subtraction" in x)
    assert f"{start['probe_base']['sub_acc']:.2f} -> {last['spectral/probe/sub_acc']:.2f}" in line
    assert f"KL to base {last['spectral/probe/kl']:.3f}" in line
    measured = [r for r in steps if r["metrics"].get("spectral/model/rho1_mean") is not None]
    line = next(x for x in out.splitlines() if "rank-1 share rho1" in x)
    assert f"{measured[-1]['metrics']['spectral/model/rho1_mean']:.2f}" in line
    assert "rank-1 substitution at the end" in out
    assert f"addition {last['spectral/probe/substitution/rank1/add_acc']:.2f}" in out
    assert (tmp_path / "run" / "report.html").exists() or "no HTML report" in out
    assert "Warning" not in out  # nothing of the demo's own making
