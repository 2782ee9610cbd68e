"""``spectral-monitor compare BASE TUNED``: the monitor's analysis of two checkpoints, offline.

BASE and TUNED are Hugging Face model folders (one or several safetensors files), ``.safetensors``
files, or BASE plus a PEFT adapter folder (:mod:`spectral_monitor.checkpoints`). The tensors stream
one pair at a time (memory: about two layers, never two models), on CUDA when present. Each layer's
ΔW = W_tuned − W_base gets the monitor's per-layer metrics (:func:`~spectral_monitor.engine.metrics
.layer_values`: the same definitions as during training) from a randomized SVD whose rank doubles
while the power-law tail runs past it, or from the exact spectrum (``full=True``), plus W_base's top
basis for ``align_base`` and the intruder test, and the exact sparsity. The result is one
:class:`~spectral_monitor.records.StepReport` (step 0).

Output (``--out DIR``): a console table (largest updates first, grouped by layer type and depth),
``compare.jsonl`` (the report, readable with :func:`~spectral_monitor.sinks.jsonl.read_jsonl`),
``compare.csv`` (every per-layer metric) and ``report.html`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from spectral_monitor.checkpoints import TensorPair, open_checkpoint, plan_updates
from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.metrics import Decomposition, aggregate, layer_values
from spectral_monitor.engine.pipeline import BASE_NITER, INTRUDER_OVERSAMPLE, INTRUDER_TOP
from spectral_monitor.engine.state import COLD_OVERSAMPLE, tail_may_continue
from spectral_monitor.errors import MissingDependencyError, SpectralMonitorError
from spectral_monitor.functional import (
    frobenius_sq,
    full_singular_values,
    lora_svd,
    randomized_svd,
    sketch_left_vectors,
    sparsity,
)
from spectral_monitor.layers import layer_type
from spectral_monitor.records import StepReport, layer_sort_key
from spectral_monitor.sinks.jsonl import JsonlSink

__all__ = ["compare", "main"]


def _decompose(pair: TensorPair, cfg: MonitorConfig, device: torch.device, full: bool) -> tuple[Decomposition, Tensor]:
    """The decomposition of one pair's ΔW and W_base (canonical, float32, on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    W0 = pair.base.to(device, torch.float32)
    if pair.lora is not None:
        B, A = (t.to(device) for t in pair.lora)
        U, S, V = lora_svd(B, A, 1.0)
        Wt = W0 + B @ A
        return Decomposition(U[None], S[None], V[None], (S.double() ** 2).sum().float()[None], None, S[None], None), Wt
    D = pair.delta().to(device)
    Wt = W0 + D
    fro = frobenius_sq(D)
    spars = sparsity(D, Wt, W0, eta=cfg.sparsity_eta)
    m, n = D.shape
    rank = min(cfg.rank, m, n)
    while True:
        U, S, V = randomized_svd(D, rank, niter=cfg.niter, oversample=cfg.oversample * COLD_OVERSAMPLE, generator=gen)
        dec = Decomposition(U[None], S[None], V[None], fro[None], spars[None], None, None)
        if full or not cfg.adaptive_rank or rank >= min(cfg.max_rank, min(m, n) // 4):
            break
        [probe] = layer_values(dec, finite=[True], base_u=None, base_fro=[1.0], prev_u=[None], shape=(m, n), config=cfg)
        v = probe.values
        if not tail_may_continue(probe.covered, v["alpha_tail"], v["alpha_ks"], cfg.alpha_max_ks):
            break
        rank = min(2 * rank, cfg.max_rank, min(m, n) // 4)
    if full:
        dec.spectrum = full_singular_values(D)[None]
    return dec, Wt


def _pair_values(pair: TensorPair, cfg: MonitorConfig, device: torch.device, full: bool) -> tuple[dict, Tensor | None]:
    """One layer's metrics and top singular values (CPU)."""
    dec, Wt = _decompose(pair, cfg, device, full)
    m, n = pair.plan.shape
    finite = bool(torch.isfinite(dec.fro).all() and torch.isfinite(Wt).all())
    W0 = pair.base.to(device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    U0, _, V0 = randomized_svd(W0, cfg.base_k, niter=BASE_NITER, oversample=cfg.oversample, generator=gen)
    top = min(INTRUDER_TOP, m, n)
    if cfg.intruders and finite:
        start = torch.cat([V0[:, :top], dec.V[0][:, :INTRUDER_OVERSAMPLE]], dim=-1)[None]
        dec.Ut = sketch_left_vectors([Wt], start, top)
    [result] = layer_values(
        dec,
        finite=[finite],
        base_u=U0[None],
        base_fro=[float(torch.linalg.vector_norm(W0))],
        prev_u=[None],
        shape=(m, n),
        config=cfg,
    )
    return result.values, (dec.S[0].float().cpu() if finite else None)


def compare(
    base: str | Path,
    tuned: str | Path,
    *,
    config: MonitorConfig | None = None,
    full: bool = False,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> StepReport:
    """The per-layer and model-level metrics of ΔW = TUNED − BASE (see the module doc).

    ``config``: rank, iterations, layer selection (``layers``, ``exclude``), thresholds, seed;
    ``full``: the exact spectrum of every dense layer (exact erank and α; slower); ``device``:
    default CUDA when available; ``progress(i, total, name)`` is called before each layer.

    Raises :class:`~spectral_monitor.errors.CheckpointError` (paths, formats, mismatches) with the
    file and tensor named, before any tensor is read where the headers can tell.
    """
    cfg = config or MonitorConfig()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_updates(open_checkpoint(base), open_checkpoint(tuned), layers=cfg.layers, exclude=cfg.exclude)
    t0 = time.perf_counter()
    report = StepReport(step=0)
    types = {}
    with torch.no_grad():
        for i, pair_plan in enumerate(plan.pairs):
            if progress is not None:
                progress(i, len(plan.pairs), pair_plan.name)
            values, spectrum = _pair_values(plan.read(pair_plan), cfg, dev, full)
            report.layers[pair_plan.name] = values
            types[pair_plan.name] = pair_plan.layer_type
            if spectrum is not None:
                report.spectra[pair_plan.name] = spectrum
            else:
                report.skipped[pair_plan.name] = "non-finite weights (NaN/Inf)"
    report.skipped.update(dict(plan.skipped))
    report.aggregates, report.by_type, report.model = aggregate(report.layers, types, len(report.skipped))
    report.elapsed_s = time.perf_counter() - t0
    report.model["measure_s"] = report.elapsed_s
    return report


# ----------------------------------------------------------------------------- output
TABLE = ("update_rel", "rho1", "stable_rank", "erank", "alpha", "align_base", "intruders", "sparsity")


def table(report: StepReport, *, top: int | None = None) -> str:
    """The console table: layer types (largest mean update first), then each type's layers by depth."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for name in report.layers:
        by_type[layer_type(name)].append(name)

    def mean_update(names: list[str]) -> float:
        vals = [report.layers[n].get("update_rel", 0.0) for n in names]
        return sum(vals) / len(vals) if vals else 0.0

    width = max([len(n) for n in report.layers] + [5])
    head = f"{'layer':<{width}} " + " ".join(f"{m:>11}" for m in TABLE)
    lines = [head, "-" * len(head)]
    for typ in sorted(by_type, key=lambda t: -mean_update(by_type[t])):
        names = sorted(by_type[typ], key=layer_sort_key)
        lines.append(f"[{typ}] mean update_rel {mean_update(names):.4g}")
        for name in names[:top] if top else names:
            v = report.layers[name]
            lines.append(f"{name:<{width}} " + " ".join(f"{_fmt(v.get(m)):>11}" for m in TABLE))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"


def write_outputs(report: StepReport, config: dict, out: Path) -> list[Path]:
    """``compare.jsonl``, ``compare.csv`` and (with matplotlib) ``report.html`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "compare.jsonl"
    jsonl.unlink(missing_ok=True)
    sink = JsonlSink(jsonl)
    sink.start(config)
    sink.write(report)
    sink.finish()
    metrics = sorted({m for v in report.layers.values() for m in v})
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", *metrics])
        for name, values in report.layers.items():
            writer.writerow([name, *(values.get(m, "") for m in metrics)])
    written = [jsonl, out / "compare.csv"]
    try:
        from spectral_monitor.report import write_report

        written.append(write_report([report], config, out / "report.html", title="compare"))
    except MissingDependencyError as exc:
        print(f"spectral-monitor compare: no HTML report: {exc}", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``spectral-monitor compare BASE TUNED [--out DIR] ...``; 0 on success, 2 for bad input."""
    parser = argparse.ArgumentParser(
        prog="spectral-monitor compare",
        description="Spectral analysis of the update between two checkpoints (HF folders, .safetensors files, "
        "or a base plus a PEFT adapter folder), one layer pair at a time.",
    )
    parser.add_argument("base", metavar="BASE", help="the base checkpoint")
    parser.add_argument("tuned", metavar="TUNED", help="the fine-tuned checkpoint, or a PEFT adapter folder")
    parser.add_argument("--out", default="spectral_compare", help="output folder (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=32, help="sketch rank, doubled while the α tail runs past it")
    parser.add_argument("--full", action="store_true", help="exact full spectrum of every layer (slower)")
    parser.add_argument("--layers", default="all-linear", help="'all-linear' (default) or 're:<regex>' on names")
    parser.add_argument("--exclude", action="append", default=[], help="regex of layers to leave out (repeatable)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--top", type=int, default=None, help="at most N layers per type in the table")
    args = parser.parse_args(argv)
    try:
        cfg = MonitorConfig(rank=args.rank, max_rank=max(256, args.rank), layers=args.layers, exclude=args.exclude)

        def progress(i: int, total: int, name: str) -> None:
            print(f"\r[{i + 1}/{total}] {name[:60]:<60}", end="", file=sys.stderr, flush=True)

        report = compare(args.base, args.tuned, config=cfg, full=args.full, device=args.device, progress=progress)
        print(file=sys.stderr)
    except SpectralMonitorError as exc:
        print(f"\nspectral-monitor compare: error: {exc}", file=sys.stderr)
        return 2
    print(table(report, top=args.top))
    agg = report.aggregates
    print(
        f"\n{len(report.layers)} layers; rho1 mean {agg.get('rho1', {}).get('mean', math.nan):.3f}, "
        f"update_rel max {agg.get('update_rel', {}).get('max', math.nan):.4g}; {len(report.skipped)} skipped"
    )
    config = {"base": str(args.base), "tuned": str(args.tuned), "full": args.full, **cfg.to_dict()}
    for path in write_outputs(report, json.loads(json.dumps(config, default=str)), Path(args.out)):
        print(f"wrote {path}")
    return 0
