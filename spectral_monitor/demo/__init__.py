"""``spectral-monitor demo``: a miniature RLVR run anyone can start (no download, a few CPU minutes).

A tiny GPT-2 learns addition and subtraction in a supervised warm-up, then TRL's GRPO rewards
exact-match addition while the monitor watches every layer's update and a held-out subtraction
probe against the base. See :mod:`spectral_monitor.demo.rlvr`; the numbers for several seeds, with
supervised controls, are in ``docs/science.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from spectral_monitor._imports import require

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(
        prog="spectral-monitor demo",
        description="A miniature RLVR run (tiny GPT-2, GRPO on addition) with the monitor attached.",
    )
    parser.add_argument("--out", default="spectral_runs/demo", help="run folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150, help="GRPO optimizer steps (default: %(default)s)")
    parser.add_argument("--every", type=int, default=10, help="measure every N steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short warm-up, 6 GRPO steps")
    args = parser.parse_args(argv)
    require("trl", "spectral-monitor demo")
    require("datasets", "spectral-monitor demo")
    from spectral_monitor.demo.rlvr import run, summary_lines

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # the libraries' own deprecation notices (transformers, TRL) are not the demo's news
    warnings.filterwarnings("ignore", category=FutureWarning)
    require("transformers", "spectral-monitor demo").logging.set_verbosity_error()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, when installed, would say it guessed
    if args.threads:
        torch.set_num_threads(args.threads)  # one thread is fastest for a model this small
    warmup = {"warmup_target": (0.0, 0.0), "warmup_max": 50, "probe_size": 16} if args.quick else {}
    steps, every = (6, 2) if args.quick else (args.steps, args.every)
    print(
        f"spectral-monitor demo: a miniature RLVR run on {torch.get_num_threads()} CPU thread(s); "
        f"run folder {args.out}",
        flush=True,
    )
    t0 = time.perf_counter()
    log = run(
        Path(args.out),
        steps=steps,
        every=every,
        seed=args.seed,
        **{"warmup_target": (0.45, 0.6), "warmup_max": 1500, **warmup},
    )
    seconds = time.perf_counter() - t0
    try:
        from spectral_monitor.report import load_run, write_report

        reports, config = load_run(log)
        html = write_report(reports, config, Path(args.out) / "report.html", title="spectral-monitor demo")
    except ImportError as exc:
        html = f"(no HTML report: {exc})"
    print()
    print("\n".join(summary_lines(log, seconds)))
    print(f"  files: {log}, {html}, TensorBoard under {Path(args.out) / 'tensorboard'}")
    return 0
