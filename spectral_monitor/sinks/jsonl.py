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
    just a process crash). A ``{"event": "start", ...}`` line records the config.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fh = None

    def start(self, run_config: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
