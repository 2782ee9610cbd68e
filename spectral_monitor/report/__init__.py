"""Offline HTML report of a monitored run: ``spectral-monitor report RUN_DIR_OR_JSONL``.

One self-contained HTML file (figures as inline PNGs, no script, no external URL): the run's
facts, layer × step heatmaps of ρ₁, α and effective rank, the model aggregates beside the
trainer's scalars and the probe, the last spectra with their power-law fits, the alerts and the
configuration. Needs matplotlib (``pip install 'spectral-monitor[report]'``).

Python::

    from spectral_monitor.report import load_run, write_report
    reports, config = load_run("runs/grpo")            # or ".../metrics.jsonl"
    write_report(reports, config, "runs/grpo/report.html", png_dir="figures")
"""

from __future__ import annotations

import argparse
import sys

from spectral_monitor.errors import ConfigError, SpectralMonitorError
from spectral_monitor.report.data import find_log, load_run, run_name
from spectral_monitor.report.html import write_report

__all__ = ["find_log", "load_run", "main", "write_report"]


def main(argv: list[str] | None = None) -> int:
    """``spectral-monitor report RUN_DIR_OR_JSONL [--out FILE.html] [--png DIR] [--layers NAME ...]``.

    Returns 0 on success, 2 for a bad path or argument, 1 for a missing optional package.
    """
    parser = argparse.ArgumentParser(
        prog="spectral-monitor report",
        description="Write a self-contained HTML report (opens offline) of a run monitored by spectral_monitor.",
    )
    parser.add_argument(
        "path",
        metavar="RUN_DIR_OR_JSONL",
        help="a run folder (holding spectral_monitor/metrics.jsonl or metrics.jsonl) or a metrics.jsonl log",
    )
    parser.add_argument(
        "--out", metavar="FILE.html", help="the HTML file to write (default: report.html beside the log)"
    )
    parser.add_argument("--png", metavar="DIR", help="also write every figure as a PNG into DIR")
    parser.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="layers (full names or shell patterns, e.g. '*.0.attn.*') whose last spectrum is drawn "
        "(default: the largest update, the largest ρ₁ and the extremes of α)",
    )
    args = parser.parse_args(argv)
    try:
        log = find_log(args.path)
        reports, config = load_run(log)
        out = args.out if args.out is not None else log.with_name("report.html")
        path = write_report(reports, config, out, png_dir=args.png, layers=args.layers, title=run_name(log), source=log)
    except SpectralMonitorError as exc:
        print(f"spectral-monitor report: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(f"report: {path}" + (f" (figures in {args.png})" if args.png else ""))
    return 0
