"""Command line: ``spectral-monitor demo`` and ``spectral-monitor summary RUN.jsonl``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _summary(argv: list[str]) -> int:
    from spectral_monitor.sinks.console import summarize
    from spectral_monitor.sinks.jsonl import read_jsonl

    parser = argparse.ArgumentParser(prog="spectral-monitor summary", description="one line per measurement")
    parser.add_argument("path", help="a metrics.jsonl written by the monitor")
    args = parser.parse_args(argv)
    for report in read_jsonl(args.path):
        print(summarize(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "run the built-in demo on a tiny model", "summary": "summarise a metrics.jsonl log"}
    if not argv or argv[0] not in commands:
        print("usage: spectral-monitor {demo,summary} ...\n" + "\n".join(f"  {k:8} {v}" for k, v in commands.items()))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from spectral_monitor.demo import main as demo

        return demo(argv[1:])
    return _summary(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
