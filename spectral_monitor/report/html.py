"""One self-contained HTML file for a monitored run: inline CSS, figures as base64 PNGs, no script,
no external URL, so it opens offline and can be mailed or attached as it is."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spectral_monitor._imports import require
from spectral_monitor.errors import ConfigError
from spectral_monitor.records import StepReport
from spectral_monitor.report import data, figures

__all__ = ["FIGURES", "write_report"]

#: the report's figures: (id, PNG file name, heading)
FIGURES = (
    ("heatmaps", "heatmaps.png", "Layers × steps"),
    ("trends", "trends.png", "Model aggregates, trainer and probe"),
    ("spectra", "spectra.png", "Spectra of the last measurement"),
    ("alerts", "alerts.png", "Alerts"),
)
#: per-layer columns of the latest-values table: (metric, header)
TABLE_METRICS = (
    ("rho1", "ρ₁"),
    ("erank", "eff. rank"),
    ("alpha", "α"),
    ("update_rel", "‖ΔW‖/‖W₀‖"),
    ("sigma1", "σ₁"),
    ("align_prev", "align prev"),
    ("intruders", "intruders"),
)

_CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b6b; --line:#e2e2e2; --bad:#c62828; --warn:#b26a00; --ok:#2e7d32; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:#fafafa; }
main { max-width:1480px; margin:0 auto; padding:20px 28px 60px; }
h1 { font-size:22px; margin:0 0 2px; }
h2 { font-size:17px; margin:30px 0 8px; padding-bottom:4px; border-bottom:1px solid var(--line); }
.sub, figcaption, .note { color:var(--muted); font-size:12.5px; }
nav { margin:10px 0 0; font-size:13px; }
nav a { margin-right:14px; color:#1f5fa8; text-decoration:none; }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin-top:14px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:150px; }
.card .k { color:var(--muted); font-size:11.5px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:20px; font-weight:600; }
.card .d { color:var(--muted); font-size:12px; }
.card.bad { border-color:var(--bad); } .card.bad .v { color:var(--bad); }
.card.warn { border-color:var(--warn); } .card.warn .v { color:var(--warn); }
figure { margin:8px 0 0; background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px;
         overflow-x:auto; }
figure img { display:block; max-width:100%; height:auto; }
table { border-collapse:collapse; background:#fff; font-size:12.5px; }
th, td { border:1px solid var(--line); padding:3px 8px; text-align:left; vertical-align:top; }
th { background:#f2f2f2; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.dim { color:#a0a0a0; }
tr.stop td:first-child { border-left:3px solid var(--bad); }
code { font-size:12px; }
details { margin-top:8px; } summary { cursor:pointer; color:#1f5fa8; }
"""


def write_report(
    reports: Sequence[StepReport],
    config: Mapping[str, Any],
    out_html: str | os.PathLike,
    *,
    png_dir: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of a run and return its path.

    Args:
        reports: the run's measurements (:func:`load_run` or a :class:`~spectral_monitor.MemorySink`).
        config: the run configuration (the JSONL start line's ``config``); ``{}`` if unknown.
        out_html: the HTML file to write (its folder is created).
        png_dir: also write every figure as a PNG there (``heatmaps.png``, ``trends.png``,
            ``spectra.png``, ``alerts.png`` when alerts fired).
        layers: layer names or shell patterns whose last spectrum is drawn; default: a few
            (largest update, largest ρ₁, extremes of reliable α).
        title: the run's name in the heading; ``source``: the log shown under it.

    Raises :class:`ConfigError` when there is no measurement or a requested layer is unknown, and
    :class:`~spectral_monitor.errors.MissingDependencyError` without matplotlib.
    """
    require("matplotlib", "spectral-monitor report")
    reports = sorted(reports, key=lambda r: r.step)
    if not reports:
        raise ConfigError("the run has no measurement yet: nothing to report")
    order = data.layer_order(reports)
    if not order:
        why = next((f": {layer}: {reason}" for r in reports for layer, reason in r.skipped.items()), "")
        raise ConfigError(f"the run's {len(reports)} measurements hold no layer values (every layer skipped{why})")
    chosen = data.choose_layers(reports, layers)
    panels = figures.trend_panels(reports)
    drawn = {
        "heatmaps": figures.heatmaps(reports, order),
        "trends": figures.trends(reports, panels),
        "spectra": figures.spectra(reports, chosen),
        "alerts": figures.alert_timeline(reports),
    }
    images = {key: figures.png(fig) for key, fig in drawn.items() if fig is not None}
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for key, filename, _ in FIGURES:
            if key in images:
                (folder / filename).write_bytes(images[key])
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = _page(reports, dict(config), order, chosen, panels, images, title or "run", source)
    out.write_text(page, encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- page
def _page(
    reports: Sequence[StepReport],
    config: dict[str, Any],
    order: list[str],
    chosen: list[tuple[str, str]],
    panels: list[tuple[str, str, Any, Any]],
    images: dict[str, bytes],
    title: str,
    source: str | os.PathLike | None,
) -> str:
    from spectral_monitor import __version__

    esc = html.escape
    episodes = data.alert_episodes(reports)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    origin = f"log <code>{esc(str(source))}</code> · " if source else ""
    heads = {key: heading for key, _, heading in FIGURES}
    context = [t for g, t, _, _ in panels if g == "context"]
    probes = [t for g, t, _, _ in panels if g == "probe"]
    trend_note = "Model-level aggregates over the measured layers (line: mean, band: min–max)"
    trend_note += f"; trainer scalars: {esc(', '.join(context))}" if context else "; no trainer scalars logged"
    trend_note += f"; probe: {esc(', '.join(probes))}" if probes else "; no probe logged"
    trend_note += ". Red lines: steps where an alert fired (dashed: it asked to stop)."
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>spectral_monitor report: {esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>spectral_monitor report: {esc(title)}</h1>",
        f'<div class="sub">{origin}generated {now} by spectral_monitor {esc(__version__)}</div>',
        _cards(reports, config, order, episodes),
        "<nav>"
        + "".join(f'<a href="#{k}">{esc(h)}</a>' for k, h in heads.items())
        + '<a href="#layer-table">Per layer</a><a href="#config">Configuration</a></nav></header>',
        f'<section id="heatmaps"><h2>{heads["heatmaps"]}</h2>',
        _figure(
            "heatmaps",
            images,
            f"{len(order)} layers in model order (rows) × {len(reports)} measurements (columns). "
            "ρ₁ = σ₁²/‖ΔW‖²_F; α only where the power-law fit is reliable; light grey: no value "
            "(layer not measured, or no reliable α fit).",
        ),
        f'</section><section id="trends"><h2>{heads["trends"]}</h2>',
        _figure("trends", images, trend_note),
        f'</section><section id="spectra"><h2>{heads["spectra"]}</h2>',
        _figure(
            "spectra",
            images,
            "Top-k eigenvalues λᵢ = σᵢ² of ΔW against their rank (log–log) with the fitted power law "
            "p(λ) ∝ λ^(−α) for λ ≥ x_min, drawn as λ(r) = x_min·(r/n_tail)^(−1/(α−1)): slope −1/(α−1). "
            "Dashed: the fit is not reliable (tail not covered by the top k, too short, or KS distance too large). "
            f"Layers: {esc(', '.join(f'{name} ({why})' for name, why in chosen)) or 'none'}.",
        ),
        f'</section><section id="alerts"><h2>Alerts</h2>{_alerts(reports, episodes, images)}</section>',
        f'<section id="layer-table"><h2>Per layer, last measurement (step {reports[-1].step})</h2>',
        _layer_table(reports[-1], order),
        '</section><section id="config"><h2>Configuration</h2>',
        _config_table(config),
        "</section></main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _figure(key: str, images: Mapping[str, bytes], caption: str) -> str:
    """A ``<figure>`` with the PNG inline, shown at :data:`figures.SCALE` CSS pixels per inch."""
    width, height = _png_size(images[key])
    scale = figures.SCALE / figures.DPI
    encoded = base64.b64encode(images[key]).decode("ascii")
    return (
        f'<figure id="fig-{key}"><img alt="{html.escape(key)} figure" width="{round(width * scale)}" '
        f'height="{round(height * scale)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height in pixels from a PNG's IHDR chunk."""
    return struct.unpack(">II", png[16:24])


def _fmt(value: Any) -> str:
    """A number with 4 significant digits, other values as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _card(key: str, value: str, detail: str = "", kind: str = "") -> str:
    esc = html.escape
    return (
        f'<div class="card {kind}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
        f'<div class="d">{esc(detail)}</div></div>'
    )


def _cards(reports: Sequence[StepReport], config: Mapping[str, Any], order: list[str], episodes) -> str:
    """The header's facts: steps, layers, sketch, schedule, base, alerts, latest aggregates."""
    first, last = reports[0], reports[-1]
    monitored = config.get("layers_monitored")
    skipped = len(last.skipped)
    layer_detail = f"of {len(monitored)} monitored" if isinstance(monitored, list) else "measured"
    layer_detail += f", {skipped} skipped at the last step" if skipped else ""
    rank = config.get("rank")
    sketch = []
    if config.get("adaptive_rank"):
        sketch.append(f"adaptive up to {config.get('max_rank')}")
    if config.get("full_every"):
        sketch.append(f"full spectrum every {config['full_every']} measurements")
    if config.get("schedule"):
        schedule, schedule_detail = str(config["schedule"]), "custom schedule"
    elif config.get("every_n_steps"):
        schedule = f"every {config['every_n_steps']} steps"
        schedule_detail = "+ the first and the last" if config.get("measure_first", True) else "+ the last"
    else:
        schedule, schedule_detail = "—", ""
    base = config.get("base") if isinstance(config.get("base"), Mapping) else {}
    base_kind = base.get("kind") or config.get("base_store") or "—"
    base_detail = f"asked: {config['base_store']}" if config.get("base_store") else ""
    if base.get("nbytes"):
        base_detail += f", {base['nbytes'] / 2**20:.1f} MiB"
    n_alerts = sum(len(r.alerts) for r in reports)
    stops = sum(a.stop for r in reports for a in r.alerts)
    rules = len({e.rule for e in episodes})
    alert_detail = f"{len(episodes)} episodes of {rules} rules" + (f", {stops} asked to stop" if stops else "")
    latest = [f"ρ₁ {_fmt(last.aggregate('rho1'))}", f"eff. rank {_fmt(last.aggregate('erank'))}"]
    if last.aggregate("alpha") is not None:
        latest.append(f"α {_fmt(last.aggregate('alpha'))}")
    alert_kind = "bad" if stops else "warn" if n_alerts else ""
    cards = [
        _card("steps measured", str(len(reports)), f"steps {first.step} → {last.step}"),
        _card("layers", str(len(order)), layer_detail),
        _card("sketch rank", "—" if rank is None else str(rank), ", ".join(sketch)),
        _card("schedule", schedule, schedule_detail),
        _card("base store", str(base_kind), base_detail),
        _card("alerts", str(n_alerts), alert_detail if n_alerts else "none fired", alert_kind),
        _card(f"latest means (step {last.step})", latest[0], " · ".join(latest[1:])),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _alerts(reports: Sequence[StepReport], episodes: Sequence[data.Episode], images: Mapping[str, bytes]) -> str:
    """Timeline figure, one row per episode, and every alert in a folded list."""
    if not episodes:
        return '<p class="note">No alert fired.</p>'
    esc = html.escape
    out = [
        _figure(
            "alerts",
            images,
            "One row per rule: a dot per measurement where it fired, a red cross where it asked to stop. "
            "Grey ticks: the measured steps.",
        ),
        '<table class="episodes"><tr><th>steps</th><th>rule</th><th>times</th><th>stop</th><th>message</th>'
        "<th>layers</th></tr>",
    ]
    for e in episodes:
        steps = str(e.first) if e.first == e.last else f"{e.first} – {e.last}"
        message = esc(e.message) + (f"<br><i>last:</i> {esc(e.last_message)}" if e.last_message != e.message else "")
        layers = esc(", ".join(e.layers[:4]) + (f" and {len(e.layers) - 4} more" if len(e.layers) > 4 else ""))
        out.append(
            f'<tr class="{"stop" if e.stop else ""}"><td class="num">{steps}</td><td><b>{esc(e.rule)}</b></td>'
            f'<td class="num">{e.count}</td><td>{"yes" if e.stop else ""}</td><td>{message}</td><td>{layers}</td></tr>'
        )
    out.append("</table>")
    every = [a for r in reports for a in r.alerts]
    out.append(f"<details><summary>all {len(every)} alerts</summary><table><tr><th>step</th><th>rule</th>")
    out.append("<th>reason</th><th>message</th></tr>")
    out += [
        f'<tr><td class="num">{a.step}</td><td>{esc(a.rule)}</td><td><code>{esc(a.reason)}</code></td>'
        f"<td>{esc(a.message)}</td></tr>"
        for a in every
    ]
    out.append("</table></details>")
    return "\n".join(out)


def _layer_table(report: StepReport, order: list[str]) -> str:
    """Latest per-layer values, folded; α greyed out where the fit is not reliable."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in TABLE_METRICS)
    rows = []
    for name in order:
        values = report.layers.get(name)
        if values is None:
            rows.append(
                f'<tr><td>{esc(name)}</td><td colspan="{len(TABLE_METRICS)}" class="dim">not measured</td></tr>'
            )
            continue
        cells = []
        for metric, _ in TABLE_METRICS:
            dim = metric == "alpha" and values.get("alpha_reliable") != 1.0
            cells.append(f'<td class="num{" dim" if dim else ""}">{_fmt(values.get(metric, math.nan))}</td>')
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    return (
        f"<details><summary>{len(order)} layers (grey α: fit not reliable)</summary>"
        f"<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table></details>"
    )


def _config_table(config: Mapping[str, Any]) -> str:
    """The run configuration, nested keys dotted; long lists folded."""
    if not config:
        return '<p class="note">The log has no start line: configuration unknown.</p>'
    esc = html.escape
    rows = []
    for key, value in data.flatten_config(config):
        if isinstance(value, list) and len(value) > 6:
            shown = f"<details><summary>{len(value)} items</summary>{esc(', '.join(map(str, value)))}</details>"
        else:
            shown = esc(_fmt(value) if not isinstance(value, list) else ", ".join(map(str, value)) or "[]")
        rows.append(f"<tr><th>{esc(key)}</th><td>{shown}</td></tr>")
    return f"<table>{''.join(rows)}</table>"
