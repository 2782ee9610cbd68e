"""What the report shows, as plain data: the run's log read back, layer × step grids, the layers
whose spectra are drawn, alert episodes and the header's facts. Pure (numpy only, no matplotlib)."""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectral_monitor.errors import ConfigError
from spectral_monitor.records import StepReport, display_names
from spectral_monitor.sinks.jsonl import read_jsonl

__all__ = [
    "Episode",
    "alert_episodes",
    "block_runs",
    "choose_layers",
    "display_names",
    "find_log",
    "flatten_config",
    "grid",
    "last_spectrum",
    "layer_order",
    "load_run",
    "rank_fit",
    "run_name",
]

#: where a run folder keeps its log, in the order they are tried (adapters use the first)
LOG_PLACES = ("spectral_monitor/metrics.jsonl", "metrics.jsonl")
#: how many spectra the report draws when no layers are asked for
DEFAULT_SPECTRA = 4


# ----------------------------------------------------------------------------- reading a run
def find_log(path: str | os.PathLike) -> Path:
    """The JSONL log of ``path``: the file itself, or a run folder's ``spectral_monitor/metrics.jsonl``
    (adapters) or ``metrics.jsonl``. Raises :class:`ConfigError` when there is none."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist (expected a run folder or a metrics.jsonl log)")
    if path.is_dir():
        for place in LOG_PLACES:
            if (path / place).is_file():
                return path / place
        raise ConfigError(f"{path} is a folder without a spectral_monitor log: looked for {' and '.join(LOG_PLACES)}")
    return path


def load_run(path: str | os.PathLike) -> tuple[list[StepReport], dict[str, Any]]:
    """Read a run: its reports in step order and its configuration.

    ``path`` is a run folder (see :func:`find_log`) or a JSONL log. The configuration is the
    latest ``{"event": "start", "config": {...}}`` line (a resumed run appends one per start);
    ``{}`` when the log has none. Raises :class:`ConfigError` for a missing path, a folder without
    a log, or a file that is not a spectral_monitor JSONL log.
    """
    log = find_log(path)
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{log} is not a JSONL log (not UTF-8 text)") from None
    config: dict[str, Any] = {}
    records = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and records:
                break  # a torn last line from a crash mid-write, as read_jsonl ignores it
            raise ConfigError(f"{log} is not a JSONL log: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not ("step" in record or "event" in record):
            raise ConfigError(f"{log} is not a spectral_monitor log: line {number} has neither 'step' nor 'event'")
        records += 1
        if record.get("event") == "start" and isinstance(record.get("config"), dict):
            config = record["config"]
    if not records:
        raise ConfigError(f"{log} is empty: no start line and no measurement")
    try:
        reports = read_jsonl(log)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{log} holds a record that is not a spectral_monitor measurement: {exc!r}") from None
    return reports, config


def run_name(log: Path) -> str:
    """A short name for the run: the log's name without ``.jsonl``, or for a ``metrics.jsonl`` the
    run folder's name (the log's folder, above ``spectral_monitor/``)."""
    if log.name != "metrics.jsonl":
        return log.stem
    folder = log.resolve().parent
    if folder.name == "spectral_monitor" and folder.parent != folder:
        folder = folder.parent
    return folder.name or str(folder)


# ----------------------------------------------------------------------------- layers and grids
def layer_order(reports: Sequence[StepReport]) -> list[str]:
    """Every layer of the run in model order: each report's ``layers`` are in model order, and a
    layer first seen later (e.g. skipped before) goes right after its predecessor in that report."""
    order: list[str] = []
    seen: set[str] = set()
    for report in reports:
        previous: str | None = None
        for name in report.layers:
            if name not in seen:
                order.insert(order.index(previous) + 1 if previous is not None else 0, name)
                seen.add(name)
            previous = name
    return order


def grid(reports: Sequence[StepReport], layers: Sequence[str], metric: str) -> np.ndarray:
    """``(len(layers), len(reports))`` float64 values of a per-layer metric, NaN where missing or
    not finite. For ``alpha`` only reliable fits (``alpha_reliable == 1``) are kept."""
    out = np.full((len(layers), len(reports)), np.nan)
    row = {name: i for i, name in enumerate(layers)}
    for j, report in enumerate(reports):
        for name, values in report.layers.items():
            if name not in row or metric not in values:
                continue
            if metric == "alpha" and values.get("alpha_reliable") != 1.0:
                continue
            out[row[name], j] = values[metric]
    out[~np.isfinite(out)] = np.nan
    return out


_BLOCK = re.compile(r"^(.*?\d+)\.")


def block_runs(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs ``(block, start, stop)`` of consecutive names that share their leading ``<...><number>.``
    (``0.attn.c_attn``, ``0.mlp.c_fc`` -> block ``0``); empty when the names have no block structure
    (a name without a number, or every block a single layer)."""
    keys = [_BLOCK.match(name) for name in names]
    if not names or not all(keys):
        return []
    runs: list[tuple[str, int, int]] = []
    for i, match in enumerate(keys):
        key = match[1]
        if runs and runs[-1][0] == key and runs[-1][2] == i:
            runs[-1] = (key, runs[-1][1], i + 1)
        else:
            runs.append((key, i, i + 1))
    return runs if len(runs) >= 2 and len(runs) < len(names) else []


def last_spectrum(reports: Sequence[StepReport], layer: str) -> tuple[StepReport, np.ndarray] | None:
    """The latest report holding ``layer``'s spectrum, and that spectrum (``(k,)`` σ, float64)."""
    for report in reversed(reports):
        if layer in report.spectra:
            return report, report.spectra[layer].double().numpy()
    return None


def choose_layers(reports: Sequence[StepReport], requested: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The layers whose last spectrum is drawn, as ``(layer, why)``.

    ``requested``: names or shell patterns (``*.0.attn.*``) matched against the full layer names,
    in the order given; a name that matches no layer with a spectrum raises :class:`ConfigError`
    with the closest names. Default: from the last report, the layer with the largest
    ``update_rel``, the largest ``rho1``, the smallest and largest reliable ``alpha``, then the next
    largest ``update_rel`` up to :data:`DEFAULT_SPECTRA` layers.
    """
    with_spectra = [name for name in layer_order(reports) if any(name in r.spectra for r in reports)]
    if requested:
        chosen: list[tuple[str, str]] = []
        for pattern in requested:
            hits = [n for n in with_spectra if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, with_spectra, n=3, cutoff=0.4)
                hint = f"; closest: {', '.join(close)}" if close else f"; layers: {', '.join(with_spectra[:5])}, ..."
                raise ConfigError(f"--layers {pattern!r} matches no layer with a logged spectrum{hint}")
            chosen += [(n, "requested") for n in hits if n not in {c for c, _ in chosen}]
        return chosen
    last = next((r for r in reversed(reports) if r.spectra), None)
    if last is None:
        return []
    candidates = {name: last.layers.get(name, {}) for name, sigma in last.spectra.items() if bool((sigma > 0).any())}

    def finite(metric: str, reliable: bool = False) -> dict[str, float]:
        return {
            name: v[metric]
            for name, v in candidates.items()
            if math.isfinite(v.get(metric, math.nan)) and (not reliable or v.get("alpha_reliable") == 1.0)
        }

    update, rho, alpha = finite("update_rel"), finite("rho1"), finite("alpha", reliable=True)
    picks = [
        (max(update, key=update.get) if update else None, "largest update_rel"),
        (max(rho, key=rho.get) if rho else None, "largest ρ₁"),
        (min(alpha, key=alpha.get) if alpha else None, "smallest α"),
        (max(alpha, key=alpha.get) if alpha else None, "largest α"),
    ]
    picks += [(name, "large update_rel") for name in sorted(update, key=update.get, reverse=True)]
    chosen = []
    for name, why in picks:
        if name is not None and name not in {c for c, _ in chosen} and len(chosen) < DEFAULT_SPECTRA:
            chosen.append((name, why))
    return chosen


def rank_fit(alpha: float, xmin: float, n_tail: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted power law drawn over a rank-ordered spectrum: ``(ranks, λ)`` for r = 1..n_tail.

    For p(λ) ∝ λ^(−α) on λ ≥ x_min the share of the tail at or above λ is (λ / x_min)^(1 − α); the
    r-th largest of n_tail values sits where that share is r / n_tail, so
    λ(r) = x_min · (r / n_tail)^(−1 / (α − 1)): a straight line of slope −1/(α − 1) in log–log,
    reaching x_min at r = n_tail.
    """
    ranks = np.arange(1, n_tail + 1, dtype=np.float64)
    return ranks, xmin * (ranks / n_tail) ** (-1.0 / (alpha - 1.0))


# ----------------------------------------------------------------------------- alerts and config
@dataclass(frozen=True)
class Episode:
    """A rule firing on consecutive measurements: first and last step, how many times, whether any
    of them asked to stop, the first and the last message, and the layers named."""

    rule: str
    first: int
    last: int
    count: int
    stop: bool
    message: str
    last_message: str
    layers: tuple[str, ...]


def alert_episodes(reports: Sequence[StepReport]) -> list[Episode]:
    """Alerts grouped into episodes (a rule firing at consecutive measurements is one), by first step."""
    open_: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for i, report in enumerate(reports):
        for alert in report.alerts:
            ep = open_.get(alert.rule)
            if ep is not None and ep["index"] == i - 1:
                ep.update(index=i, last=alert.step, count=ep["count"] + 1, last_message=alert.message)
                ep["stop"] |= alert.stop
                ep["layers"] += tuple(x for x in alert.layers if x not in ep["layers"])
            else:
                ep = dict(
                    rule=alert.rule,
                    index=i,
                    first=alert.step,
                    last=alert.step,
                    count=1,
                    stop=alert.stop,
                    message=alert.message,
                    last_message=alert.message,
                    layers=tuple(alert.layers),
                )
                open_[alert.rule] = ep
                done.append(ep)
    return sorted(
        (Episode(**{k: v for k, v in ep.items() if k != "index"}) for ep in done), key=lambda e: (e.first, e.rule)
    )


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(key, value)`` rows of a nested config, nested keys dotted (``base.kind``), in given order."""
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            rows += flatten_config(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows
