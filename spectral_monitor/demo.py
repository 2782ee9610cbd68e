"""A built-in demo on a tiny model (no downloads, CPU, a few seconds): ``spectral-monitor demo``.

A small MLP is first trained on task A (the "pre-trained base"), then fine-tuned on task B
while the monitor watches the update ΔW = W_t − W_0 of its linear layers. The loss on task A
is recorded next to the spectra as ``spectral/context/task_a_loss`` — the forgetting the
spectral metrics are meant to anticipate. Output: a console line per measurement, a JSONL
log, TensorBoard event files when tensorboard is installed, and a final per-layer table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from spectral_monitor import ConsoleSink, JsonlSink, MonitorConfig, MonitorRun, read_jsonl
from spectral_monitor._imports import is_available
from spectral_monitor.sinks.base import Sink

__all__ = ["main"]

DIM, HIDDEN, CLASSES = 32, 128, 8


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES)
    )


def _task(seed: int, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a random teacher network (a fixed synthetic task)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    teacher = torch.randn(DIM, CLASSES, generator=gen)
    return x, (torch.tanh(x @ teacher) + 0.1 * torch.randn(n, CLASSES, generator=gen)).argmax(-1)


def _train(model: nn.Module, data, steps: int, lr: float, run: MonitorRun | None = None, probe=None) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if run is not None:
            if run.should_measure(step, final=step == steps):
                run.record_context({"task_b_loss": loss.item(), "task_a_loss": probe()})
            run.on_optimizer_step(step, final=step == steps)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(prog="spectral-monitor demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="spectral_runs/demo", help="folder for the JSONL log and TensorBoard files")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    out = Path(args.out)
    task_a, task_b = _task(1), _task(2)

    model = _model()
    print("pre-training the base on task A ...", flush=True)
    _train(model, task_a, steps=400, lr=3e-3)

    def task_a_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(task_a[0]), task_a[1]))

    sinks: list[Sink] = [ConsoleSink(use_print=True), JsonlSink(out / "metrics.jsonl")]
    if is_available("tensorboard"):
        from spectral_monitor.sinks.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(out / "tensorboard"))
    config = MonitorConfig(every_n_steps=args.every, rank=16, full_every=4)
    run = MonitorRun(model, config, sinks=sinks)
    run.start()  # base snapshot W_0
    print(f"fine-tuning on task B for {args.steps} steps; task A loss at start {task_a_loss():.3f}", flush=True)
    _train(model, task_b, steps=args.steps, lr=1e-3, run=run, probe=task_a_loss)
    run.finish()

    last = read_jsonl(out / "metrics.jsonl")[-1]
    print(f"\nper-layer spectrum of the update at step {last.step} (from {out / 'metrics.jsonl'}):")
    print(f"{'layer':>6} {'|dW|/|W0|':>10} {'rho1':>6} {'erank':>7} {'alpha':>6} {'align_prev':>10} {'intruders':>9}")
    for layer in last.layers:
        v = {
            m: last.metrics.get(f"spectral/{m}/{layer}", float("nan"))
            for m in ("update_rel", "rho1", "erank", "alpha", "align_prev", "intruders")
        }
        print(
            f"{layer:>6} {v['update_rel']:>10.4f} {v['rho1']:>6.3f} {v['erank']:>7.2f} {v['alpha']:>6.2f} "
            f"{v['align_prev']:>10.3f} {v['intruders']:>9.0f}"
        )
    print(f"task A loss after fine-tuning: {task_a_loss():.3f} (forgetting shows as a rise)")
    print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}" if len(sinks) > 2 else "")
    return 0
