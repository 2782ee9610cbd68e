"""spectral-monitor report: a real run of the library on a tiny model with planted updates, read back
and drawn into one self-contained HTML file; checked against the raw JSONL (parsed here with
``json``), hand-derived formulas, numpy float64, and a real headless Chromium."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from spectral_monitor import JsonlSink, MetricThreshold, MonitorRun
from spectral_monitor.errors import ConfigError
from spectral_monitor.records import StepReport
from spectral_monitor.report import data, figures, load_run, main, write_report
from spectral_monitor.report.html import FIGURES

STEPS = 10
ALPHA = 2.5  # planted power-law exponent of layer "2"'s update


# ----------------------------------------------------------------------------- the run
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _monitored_run(log: Path) -> None:
    """Three linears, measured every 2 steps (full spectrum every 2nd measurement): layer "0" gets a
    rank-1 update (ρ₁ = 1), layer "2" one with λ_i ∝ i^(−1/(α−1)) (a reliable α on full measurements),
    layer "4" noise. Two rules fire: ρ₁ max > 0.9 from the start, the probe's KL > 0.05 late (stop)."""
    torch.manual_seed(0)
    model = _model()
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 64, generator=g)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    sigma = torch.arange(1, 65, dtype=torch.float32) ** (-0.5 / (ALPHA - 1))
    heavy = q1 @ torch.diag(sigma) @ q2.T
    rules = [
        MetricThreshold(key="spectral/model/rho1_max", above=0.9, stop=False),
        MetricThreshold(key="spectral/probe/kl", above=0.05, stop=True),
    ]
    run = MonitorRun(
        model, sinks=[JsonlSink(log)], every_n_steps=2, rank=32, full_every=2, rules=rules, early_stop=True
    )
    run.start()
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            model[0].weight += 0.01 * u @ v
            model[2].weight += 0.01 * heavy
            model[4].weight += 0.001 * torch.randn(16, 64, generator=g)
        run.record_context({"loss": 2.0 / step, "reward": step / STEPS})
        run.record_context({"spectral/probe/kl": 0.01 * step, "spectral/probe/loss_rel": 1 + 0.02 * step})
        run.on_optimizer_step(step, final=step == STEPS)
    run.finish()


def _raw(log: Path) -> tuple[dict, list[dict]]:
    """The start line's config and the measurement records, parsed with plain ``json`` (null -> NaN)."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    config = next(line["config"] for line in lines if line.get("event") == "start")
    records = [line for line in lines if "step" in line]
    for rec in records:
        rec["metrics"] = {k: math.nan if v is None else float(v) for k, v in rec["metrics"].items()}
    return config, records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder in the adapters' layout: ``<dir>/spectral_monitor/metrics.jsonl``."""
    folder = tmp_path_factory.mktemp("run")
    _monitored_run(folder / "spectral_monitor" / "metrics.jsonl")
    return folder


@pytest.fixture(scope="module")
def log(run_dir) -> Path:
    return run_dir / "spectral_monitor" / "metrics.jsonl"


@pytest.fixture(scope="module")
def written(run_dir, log, tmp_path_factory) -> tuple[Path, Path]:
    """The HTML report and the PNG folder, written once through the CLI."""
    out = tmp_path_factory.mktemp("report")
    html_path, png_dir = out / "report.html", out / "png"
    assert main([str(run_dir), "--out", str(html_path), "--png", str(png_dir)]) == 0
    return html_path, png_dir


# ----------------------------------------------------------------------------- reading a run
def test_load_run_reads_a_run_folder_and_its_log(run_dir, log, tmp_path):
    config, records = _raw(log)
    for path in (run_dir, log):
        reports, cfg = load_run(path)
        assert [r.step for r in reports] == [rec["step"] for rec in records] == [1, 2, 4, 6, 8, 10]
        assert cfg == config and cfg["rank"] == 32 and cfg["every_n_steps"] == 2
    # the plain-PyTorch layout <dir>/metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text(log.read_text())
    reports, cfg = load_run(tmp_path)
    assert len(reports) == 6 and cfg == config
    assert data.layer_order(reports) == [n for n, m in _model().named_modules() if isinstance(m, nn.Linear)]


def test_load_run_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"folder without a spectral_monitor log.*spectral_monitor/metrics\.jsonl"):
        load_run(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    with pytest.raises(ConfigError, match=r"notes\.txt is not a JSONL log: line 1 is not JSON"):
        load_run(text)
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a JSONL log"):
        load_run(binary)
    other = tmp_path / "other.jsonl"
    other.write_text('{"loss": 1.0}\n{"loss": 0.5}\n')
    with pytest.raises(ConfigError, match="not a spectral_monitor log: line 1"):
        load_run(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_run(empty)
    started = tmp_path / "started.jsonl"
    started.write_text('{"event": "start", "config": {"rank": 8}}\n')
    reports, config = load_run(started)
    assert reports == [] and config == {"rank": 8}
    with pytest.raises(ConfigError, match="no measurement"):
        write_report(reports, config, tmp_path / "r.html")
    skipped = [StepReport(step=1, skipped={"lin": "no active LoRA adapter"})]
    with pytest.raises(ConfigError, match=r"hold no layer values \(every layer skipped: lin: no active LoRA adapter\)"):
        write_report(skipped, config, tmp_path / "r.html")
    # the CLI prints the message and returns 2, without a traceback
    for bad in (tmp_path / "nope", tmp_path, text):
        assert main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("spectral-monitor report: error: ") and str(bad.name) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- data drawn
def test_heatmap_grids_are_the_logged_values_alpha_only_where_reliable(log):
    reports, _ = load_run(log)
    _, records = _raw(log)
    layers = ["0", "2", "4"]
    for metric in ("rho1", "erank", "alpha"):
        grid = data.grid(reports, layers, metric)
        assert grid.shape == (3, len(records))
        for j, rec in enumerate(records):
            for i, layer in enumerate(layers):
                value = rec["metrics"][f"spectral/{metric}/{layer}"]
                if metric == "alpha" and rec["metrics"][f"spectral/alpha_reliable/{layer}"] != 1.0:
                    value = math.nan
                assert grid[i, j] == pytest.approx(value, nan_ok=True)
    alpha = data.grid(reports, layers, "alpha")
    # the planted layer is reliable exactly on the full-spectrum measurements, near the planted α
    assert np.isfinite(alpha[1]).tolist() == [False, True, False, True, False, True]
    assert np.nanmax(np.abs(alpha[1] - ALPHA)) < 0.15
    assert np.isnan(alpha[0]).all()
    assert np.allclose(data.grid(reports, layers, "rho1")[0], 1.0, atol=1e-4)  # planted rank-1 update


def test_default_spectra_layers_and_requested_patterns(log):
    reports, _ = load_run(log)
    last = _raw(log)[1][-1]["metrics"]

    def values(metric: str, reliable: bool = False) -> dict[str, float]:
        return {
            n: last[f"spectral/{metric}/{n}"]
            for n in ("0", "2", "4")
            if not reliable or last[f"spectral/alpha_reliable/{n}"] == 1.0
        }

    update, rho, alpha = values("update_rel"), values("rho1"), values("alpha", reliable=True)
    assert list(alpha) == ["2"]  # the planted power law; the last step is a full-spectrum one
    picks = [
        (max(update, key=update.get), "largest update_rel"),
        (max(rho, key=rho.get), "largest ρ₁"),
        ("2", "smallest α"),
        ("2", "largest α"),
        *[(n, "large update_rel") for n in sorted(update, key=update.get, reverse=True)],
    ]
    expected = []
    for name, why in picks:
        if name not in [n for n, _ in expected]:
            expected.append((name, why))
    assert data.choose_layers(reports) == expected[:4]
    assert sorted(n for n, _ in expected) == ["0", "2", "4"]
    assert data.choose_layers(reports, ["4", "[02]"]) == [("4", "requested"), ("0", "requested"), ("2", "requested")]
    with pytest.raises(ConfigError, match=r"'layer\.9' matches no layer with a logged spectrum"):
        data.choose_layers(reports, ["layer.9"])


def test_drawn_power_law_is_the_mle_of_the_drawn_points(log):
    """On a top-k measurement the fit used the logged spectrum: the tail the figure colours (its
    ``alpha_tail`` largest values) ends at x_min, its MLE 1 + n / Σ ln(λ/x_min) (numpy float64) is the
    logged α, and the drawn line λ(r) = x_min (r/n)^(−1/(α−1)) is the Pareto quantile
    (CCDF (λ/x_min)^(1−α) = r/n). Tolerances: the log rounds σ to 7 decimals."""
    reports, _ = load_run(log)
    checked = 0
    for report in reports:
        for layer in ("2", "4"):  # "0" is rank-1: its other values are below the log's rounding
            values = report.layers[layer]
            if values["erank_exact"] == 1.0:  # fitted on the full spectrum, not the logged top k
                continue
            lam = np.sort(report.spectra[layer].double().numpy() ** 2)[::-1]
            alpha, xmin, n = values["alpha"], values["alpha_xmin"], int(values["alpha_tail"])
            tail = lam[:n]
            assert tail[-1] == pytest.approx(xmin, rel=1e-3) and (n == len(lam) or lam[n] < xmin)
            assert 1 + n / np.log(tail / xmin).sum() == pytest.approx(alpha, rel=2e-3)
            ranks, line = data.rank_fit(alpha, xmin, n)
            assert line[-1] == pytest.approx(xmin) and line[0] == pytest.approx(xmin * n ** (1 / (alpha - 1)))
            assert (line / xmin) ** (1 - alpha) == pytest.approx(ranks / n)
            slope = np.polyfit(np.log(ranks), np.log(line), 1)[0]
            assert slope == pytest.approx(-1 / (alpha - 1))
            checked += 1
    assert checked >= 4


def test_alert_episodes_group_consecutive_measurements(log):
    reports, _ = load_run(log)
    _, records = _raw(log)
    fired: dict[str, list[int]] = {}
    for index, rec in enumerate(records):
        for alert in rec["alerts"]:
            fired.setdefault(alert["rule"], []).append(index)
    expected = []
    for rule, indices in fired.items():  # runs of consecutive measurement indices
        start = prev = indices[0]
        for i in [*indices[1:], None]:
            if i is None or i != prev + 1:
                expected.append((rule, records[start]["step"], records[prev]["step"], prev - start + 1))
                start = i
            prev = i
    episodes = data.alert_episodes(reports)
    assert sorted((e.rule, e.first, e.last, e.count) for e in episodes) == sorted(expected)
    assert {e.rule: e.stop for e in episodes} == {"model_rho1_max": False, "probe_kl": True}
    assert expected and any(count > 1 for *_, count in expected)


# ----------------------------------------------------------------------------- the HTML file
_SRC_HREF = re.compile(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", re.IGNORECASE)


def _images(page: str) -> dict[str, tuple[bytes, int, int]]:
    """Figure id -> (PNG bytes, width and height attributes) of every inline figure."""
    found = re.findall(
        r'<figure id="fig-(\w+)"><img alt="[^"]*" width="(\d+)" height="(\d+)" src="data:image/png;base64,([^"]+)"',
        page,
    )
    return {key: (base64.b64decode(b64, validate=True), int(w), int(h)) for key, w, h, b64 in found}


def test_html_is_self_contained_with_every_figure(written, log):
    html_path, _ = written
    page = html_path.read_text(encoding="utf-8")
    config, records = _raw(log)
    images = _images(page)
    assert set(images) == {key for key, _, _ in FIGURES} == {"heatmaps", "trends", "spectra", "alerts"}
    for png, width, height in images.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        px_w, px_h = np.frombuffer(png[16:24], dtype=">u4")
        assert (width, height) == (round(px_w * figures.SCALE / figures.DPI), round(px_h * figures.SCALE / figures.DPI))
    # nothing to fetch: every src/href is inline data or an anchor in the page; no script, no CSS import
    assert all(v.startswith(("data:", "#")) for v in _SRC_HREF.findall(page)), _SRC_HREF.findall(page)
    assert "http://" not in page and "https://" not in page and "//" not in re.sub(r"data:[^\"']+", "", page)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    # header facts, against the raw log
    n_alerts = sum(len(rec["alerts"]) for rec in records)
    assert f'<div class="k">steps measured</div><div class="v">{len(records)}</div>' in page
    assert '<div class="k">layers</div><div class="v">3</div>' in page
    assert f'<div class="k">sketch rank</div><div class="v">{config["rank"]}</div>' in page
    assert f'<div class="k">base store</div><div class="v">{config["base"]["kind"]}</div>' in page
    assert f'<div class="k">alerts</div><div class="v">{n_alerts}</div>' in page
    assert "every 2 steps" in page and "full spectrum every 2 measurements" in page
    # alert episodes and the configuration table
    assert "<b>model_rho1_max</b>" in page and "<b>probe_kl</b>" in page and 'class="stop"' in page
    assert "<th>every_n_steps</th><td>2</td>" in page and "<th>base.kind</th>" in page
    # the trainer's context and the probe are named beside the aggregates
    assert "trainer scalars: loss, reward" in page and "probe: kl, loss_rel" in page


def test_png_files_are_the_embedded_figures(written):
    html_path, png_dir = written
    images = _images(html_path.read_text(encoding="utf-8"))
    for key, filename, _ in FIGURES:
        assert (png_dir / filename).read_bytes() == images[key][0]


def test_cli_layers_default_output_and_help(run_dir, log, tmp_path, capsys):
    assert main([str(log), "--layers", "4", "--layers", "2", "--png", str(tmp_path / "figs")]) == 0
    default = log.with_name("report.html")
    assert capsys.readouterr().out.strip() == f"report: {default} (figures in {tmp_path / 'figs'})"
    page = default.read_text(encoding="utf-8")
    assert "Layers: 4 (requested), 2 (requested)." in page
    assert f"<h1>spectral_monitor report: {run_dir.name}</h1>" in page  # the run folder names the run
    default.unlink()
    assert main([str(run_dir), "--out", str(tmp_path / "x.html"), "--layers", "nope"]) == 2
    assert "--layers 'nope' matches no layer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: spectral-monitor report") and "RUN_DIR_OR_JSONL" in out and "--png DIR" in out


def test_cli_without_matplotlib_names_the_extra(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([str(run_dir), "--out", str(tmp_path / "r.html")]) == 1
    assert "pip install 'spectral-monitor[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ----------------------------------------------------------------------------- readability
def test_heatmap_labels_every_one_of_200_layers_without_overlap(tmp_path):
    """A 40-block model of 5 linears: 200 rows, each labelled (common prefix stripped), labels at
    least 6.5 pt and not overlapping each other, block names on the right likewise."""
    names = ("q", "k", "v", "up", "down")
    blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(4, 4) for n in names}) for _ in range(40))
    model = nn.Module()
    model.layers = blocks
    run = MonitorRun(model, sinks=[JsonlSink(tmp_path / "m.jsonl")], every_n_steps=1, rank=2, rules=[])
    run.start()
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        run.on_optimizer_step(step)
    run.finish()
    reports, _ = load_run(tmp_path / "m.jsonl")
    order = data.layer_order(reports)
    assert order == [f"layers.{b}.{n}" for b in range(40) for n in names]
    fig = figures.heatmaps(reports, order)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    left, right = fig.axes[0], fig.axes[-1]
    labels = left.get_yticklabels()
    assert [t.get_text() for t in labels] == [f"{b}.{n}" for b in range(40) for n in names]
    assert min(t.get_fontsize() for t in labels) >= 6.5
    for ticks in (labels, right.get_yticklabels()):
        boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.y0)
        assert all(lower.y1 <= upper.y0 + 0.5 for lower, upper in itertools.pairwise(boxes))
    assert [t.get_text() for t in right.get_yticklabels()] == [str(b) for b in range(40)]
    height_css = fig.get_figheight() * figures.SCALE
    assert 2000 < height_css < 3200  # ~14 CSS px per row


# ----------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_report_renders_in_headless_chromium(written, tmp_path):
    """Playwright drives Debian's chromium: every figure decodes, no console error, nothing fetched
    over the network; a full-page screenshot is saved (its path is printed)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    html_path, _ = written
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)  # a fresh profile
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load")
            figures_ok = page.evaluate(
                """async () => {
                    const imgs = [...document.querySelectorAll('figure img')];
                    await Promise.all(imgs.map(i => i.decode()));
                    return imgs.map(i => [i.closest('figure').id, i.complete, i.naturalWidth, i.naturalHeight,
                                          i.getBoundingClientRect().width]);
                }"""
            )
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert sorted(f[0] for f in figures_ok) == sorted(f"fig-{key}" for key, _, _ in FIGURES)
    assert all(complete and w > 100 and h > 100 and shown > 100 for _, complete, w, h, shown in figures_ok)
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert shot.stat().st_size > 50_000
    kept = Path(__file__).resolve().parents[2] / "test-artifacts" / "report.png"  # a CI run keeps it
    kept.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, kept)
    print(f"report screenshot: {kept}")


def test_report_dom_in_chromium_cli(written, tmp_path):
    """Chromium's own --dump-dom (no Playwright): the parsed page holds every inline figure."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    html_path, _ = written
    cmd = [CHROMIUM, "--headless", *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", html_path.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    for key, _, _ in FIGURES:
        assert re.search(rf'<figure id="fig-{key}"><img [^>]*src="data:image/png;base64,', dom), key
