"""Read back what reached W&B (offline run files) and TensorBoard (event files), for tests.

W&B (0.31): a run's ``run-<id>.wandb`` file is a LevelDB-style log — a 7-byte file header
(``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte header
(CRC-32 of type byte + payload, 4 bytes LE; payload length, 2 bytes LE; type, 1 byte:
1 full, 2 first, 3 middle, 4 last; a block tail shorter than a header is zero padding).
Payloads are ``wandb.proto.wandb_internal_pb2.Record`` protobufs; history items keep the
logged key in ``nested_key`` and the value as JSON.

TensorBoard: event files are read with tensorboard's own ``EventAccumulator``, loading
everything (size guidance 0), from every directory under ``logdir`` that has event files.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "read_tensorboard_custom_scalars",
    "read_tensorboard_histograms",
    "read_tensorboard_scalars",
    "read_tensorboard_texts",
    "read_wandb_alerts",
    "read_wandb_config",
    "read_wandb_history",
    "read_wandb_metric_definitions",
    "read_wandb_records",
    "read_wandb_table",
    "wandb_run_file",
]

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


# --------------------------------------------------------------------------- W&B


def wandb_run_file(path: str | Path) -> Path:
    """The ``.wandb`` file at ``path``, or the newest one anywhere under the directory ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.rglob("*.wandb"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        raise FileNotFoundError(f"no .wandb run file under {path}")
    return files[-1]


def read_wandb_records(path: str | Path, *, wait_s: float = 10.0) -> list[Any]:
    """Every ``Record`` protobuf of the run file, in order.

    wandb 0.31 writes the file from its core process: ``run.finish()`` can return before the
    records reach the disk (4 of 30 offline runs here had only the file header right after
    ``finish()``). So it re-reads for up to ``wait_s`` seconds until the run's ``exit``
    record is there; a run still going (or crashed) is returned as it stands after
    ``wait_s`` (0: read once, no waiting).
    """
    file = wandb_run_file(path)
    deadline = time.monotonic() + wait_s
    while True:
        records = list(_parse_run_file(file.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() >= deadline:
            return records
        time.sleep(0.05)


def _parse_run_file(data: bytes) -> Iterator[Any]:
    """The records of a run file's bytes; stops at a torn or corrupt record (crash)."""
    from wandb.proto.wandb_internal_pb2 import Record

    if len(data) >= _FILE_HEADER and data[:4] != b":W&B":
        raise ValueError(f"not a W&B run file (header {data[:7]!r})")
    pos, chunks = _FILE_HEADER, []
    while pos + _HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER.size:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        pos += _HEADER.size + length
        if kind == 0 and length == 0:
            continue
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            return
        chunks = [payload] if kind in (_FULL, _FIRST) else [*chunks, payload]
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def read_wandb_history(path: str | Path, *, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """History rows in order, each ``{key: value}`` with ``_step`` and any custom step key.

    Scalars are flat (``row["spectral/rho1/l0"]``); logged media objects are nested dicts of
    their metadata (``row["spectral/layers"]["_type"] == "table-file"``).
    """
    rows = []
    for record in read_wandb_records(path, wait_s=wait_s):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                target = row
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                target[keys[-1]] = json.loads(item.value_json)
            rows.append(row)
    return rows


def read_wandb_alerts(path: str | Path, *, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """``run.alert`` calls: ``{"title", "text", "level", "wait_duration"}`` (ms)."""
    return [
        {"title": r.alert.title, "text": r.alert.text, "level": r.alert.level, "wait_duration": r.alert.wait_duration}
        for r in read_wandb_records(path, wait_s=wait_s)
        if r.WhichOneof("record_type") == "alert"
    ]


def read_wandb_config(path: str | Path, *, wait_s: float = 10.0) -> dict[str, Any]:
    """The run config after every update, ``{key: value}`` (top-level keys)."""
    config: dict[str, Any] = {}
    for record in read_wandb_records(path, wait_s=wait_s):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
            for item in record.config.remove:
                config.pop(item.key, None)
    return config


def read_wandb_metric_definitions(path: str | Path, *, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """``define_metric`` calls: ``{"name" or "glob_name": ..., "step_metric": ...}``."""
    out = []
    for record in read_wandb_records(path, wait_s=wait_s):
        if record.WhichOneof("record_type") == "metric":
            metric = record.metric
            name = {"glob_name": metric.glob_name} if metric.glob_name else {"name": metric.name}
            out.append({**name, "step_metric": metric.step_metric})
    return out


def read_wandb_table(path: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (``{column: value}``) of a logged ``wandb.Table`` given its history ``entry``."""
    files_dir = wandb_run_file(path).parent / "files"
    table = json.loads((files_dir / entry["path"]).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


# ------------------------------------------------------------------- TensorBoard


def _accumulators(logdir: str | Path) -> list[Any]:
    """A loaded ``EventAccumulator`` for each directory under ``logdir`` with event files."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    dirs = sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")})
    if not dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    guidance = dict.fromkeys(ea.DEFAULT_SIZE_GUIDANCE, 0)
    return [ea.EventAccumulator(str(d), size_guidance=guidance).Reload() for d in dirs]


def _tagged(logdir: str | Path, kind: str, plugin: str | None = None) -> dict[str, list[tuple[int, Any]]]:
    """``{tag: [(step, event), ...]}`` sorted by step, over every run under ``logdir``.

    ``kind`` is an accumulator tag kind (``scalars``, ``histograms``, ``tensors``); ``plugin``
    keeps only tags whose summary metadata names that plugin.
    """
    read = {"scalars": "Scalars", "histograms": "Histograms", "tensors": "Tensors", "images": "Images"}[kind]
    out: dict[str, list[tuple[int, Any]]] = {}
    for acc in _accumulators(logdir):
        for tag in acc.Tags()[kind]:
            if plugin is None or acc.SummaryMetadata(tag).plugin_data.plugin_name == plugin:
                out.setdefault(tag, []).extend((e.step, e) for e in getattr(acc, read)(tag))
    return {tag: sorted(events, key=lambda se: se[0]) for tag, events in out.items()}


def read_tensorboard_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every ``add_scalar`` under ``logdir``."""
    return {tag: [(s, e.value) for s, e in ev] for tag, ev in _tagged(logdir, "scalars").items()}


def read_tensorboard_histograms(logdir: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """``{tag: [(step, HistogramValue), ...]}``; a value has min, max, num, sum, bucket(_limit)."""
    return {tag: [(s, e.histogram_value) for s, e in ev] for tag, ev in _tagged(logdir, "histograms").items()}


def read_tensorboard_images(logdir: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """``{tag: [(step, ImageEvent), ...]}``; an event has ``encoded_image_string`` (PNG), width, height."""
    return {tag: [(s, e) for s, e in ev] for tag, ev in _tagged(logdir, "images").items()}


def read_tensorboard_texts(logdir: str | Path) -> dict[str, list[tuple[int, str]]]:
    """``{tag: [(step, text), ...]}`` of every ``add_text`` (torch's ``/text_summary`` suffix dropped)."""
    return {
        tag.removesuffix("/text_summary"): [(s, e.tensor_proto.string_val[0].decode()) for s, e in ev]
        for tag, ev in _tagged(logdir, "tensors", plugin="text").items()
    }


def read_tensorboard_custom_scalars(logdir: str | Path) -> dict[str, dict[str, list[str]]]:
    """The newest custom-scalars layout: ``{category: {chart title: [tag regex, ...]}}``.

    ``add_custom_scalars`` stores a serialised ``layout_pb2.Layout`` as a string tensor under
    the tag ``custom_scalars__config__`` (plugin ``custom_scalars``).
    """
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = _tagged(logdir, "tensors", plugin=metadata.PLUGIN_NAME).get(metadata.CONFIG_SUMMARY_TAG)
    if not events:
        return {}
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1][1].tensor_proto.string_val[0])
    out: dict[str, dict[str, list[str]]] = {}
    for category in layout.category:
        charts = out.setdefault(category.title, {})
        for chart in category.chart:
            content = chart.WhichOneof("content")
            if content == "multiline":
                charts[chart.title] = list(chart.multiline.tag)
            else:
                series = chart.margin.series
                charts[chart.title] = [t for s in series for t in (s.value, s.lower, s.upper)]
    return out
