"""The ``spectral-monitor`` command: ``demo``, ``summary``, ``report``, ``compare``, ``wandb-workspace``.

Each subcommand parses its own arguments (``spectral-monitor <command> --help``); the modules
behind them are imported only when the command runs, so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]


def _summary(argv: Sequence[str]) -> int:
    from spectral_monitor.errors import ConfigError
    from spectral_monitor.sinks.console import summarize
    from spectral_monitor.sinks.jsonl import read_jsonl

    parser = argparse.ArgumentParser(prog="spectral-monitor summary", description="one line per measurement of a run")
    parser.add_argument("path", metavar="METRICS_JSONL_OR_RUN_DIR", help="a metrics.jsonl log, or a run folder")
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        if path.is_dir():
            from spectral_monitor.report import find_log

            path = find_log(path)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        reports = read_jsonl(path)
    except (ConfigError, ValueError, UnicodeDecodeError) as exc:
        print(f"spectral-monitor summary: error: {args.path}: {exc}", file=sys.stderr)
        return 2
    if not reports:
        print(f"spectral-monitor summary: error: {path} holds no measurement", file=sys.stderr)
        return 2
    for report in reports:
        print(summarize(report))
    return 0


def _demo(argv: Sequence[str]) -> int:
    from spectral_monitor.demo import main

    return main(list(argv))


def _report(argv: Sequence[str]) -> int:
    from spectral_monitor.report import main

    return main(list(argv))


def _compare(argv: Sequence[str]) -> int:
    from spectral_monitor.compare import main

    return main(list(argv))


def _workspace(argv: Sequence[str]) -> int:
    from spectral_monitor.dashboards import main

    return main(list(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_demo, "run the built-in demo (a miniature RLVR run, no downloads)"),
    "summary": (_summary, "one line per measurement of a run's metrics.jsonl"),
    "report": (_report, "a self-contained HTML report of a run"),
    "compare": (_compare, "spectral analysis of the update between two checkpoints"),
    "wandb-workspace": (_workspace, "create a W&B workspace with the monitor's charts"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; returns the process exit code."""
    from spectral_monitor import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="spectral-monitor",
        description="Watch the singular spectrum of a model's weight updates while it trains.",
        epilog="Run 'spectral-monitor <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    parser.parse_args(argv)  # --help, --version, or an unknown command (argparse says which, exit 2)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
