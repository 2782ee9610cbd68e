"""Append-only JSON-lines log: one record per measurement, flushed after each write."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spectral_monitor.records import StepReport

__all__ = ["JsonlSink", "read_jsonl"]


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf: store NaN as null and ±Inf as "inf"/"-inf" (a rank-1 update's gap is
    # infinite, not missing); readers turn null back into NaN and float() reads the strings.
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class JsonlSink:
    """Writes each report as one JSON line to ``path`` (opened in append mode).

    ``fsync=True`` also forces the line to disk (slower; survives a machine crash, not
    just a process crash). A ``{"event": "start", ...}`` line records the config. An existing file
    is appended to; a torn last line (a process killed mid-write) is dropped first.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fh = None

    def start(self, run_config: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._write({"event": "start", "config": dict(run_config)})

    def write(self, report: StepReport) -> None:
        if self._fh is None:
            self.start({})
        self._write(report.to_record())

    def _write(self, record: dict) -> None:
        self._fh.write(json.dumps(_clean(record), default=str) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def finish(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _cut_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Drop a half-written last line (a process killed mid-write), so appended records start on a
    line of their own; every complete line is kept."""
    if not path.exists():
        return
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        end = size
        while end > 0:  # the last newline, read backwards one chunk at a time
            start = max(0, end - chunk)
            fh.seek(start)
            cut = fh.read(end - start).rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            end = start
        fh.truncate(0)


def _unclean(metrics: dict) -> dict:
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}


def read_jsonl(path: str | os.PathLike, *, dedupe: bool = True) -> list[StepReport]:
    """Reports in a JSONL log, in step order. A torn (half-written) last line is ignored.

    With ``dedupe`` (default) a step logged twice — a run resumed from an earlier
    checkpoint re-measures steps — keeps its latest record.
    """
    reports: dict[int, StepReport] | list[StepReport] = {} if dedupe else []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line from a crash mid-write
            raise
        if "step" not in rec:
            continue  # start/event lines
        rec["metrics"] = _unclean(rec.get("metrics", {}))
        rep = StepReport.from_record(rec)
        if dedupe:
            reports[rep.step] = rep
        else:
            reports.append(rep)
    return sorted(reports.values(), key=lambda r: r.step) if dedupe else reports
