"""The miniature RLVR run behind ``spectral-monitor demo``, and the summary a person reads at the end.

1. A tiny GPT-2 learns two skills in a supervised warm-up: addition and subtraction.
2. TRL's ``GRPOTrainer`` improves addition with an exact-match reward (no reference model: the
   monitor takes its own base), while ``SpectralMonitorCallback`` measures every monitored layer's
   update and a held-out **subtraction** probe (not rewarded: the knowledge that may fade) against
   the base, with the default alert rules.
3. At the last step the rank-1 part of every update is evaluated alone (``PeriodicSubstitution``,
   weights restored): how much of the addition gain does it keep?

The run folder holds the JSONL log, TensorBoard files, a W&B offline run (when wandb is installed)
and the HTML report; :func:`summary_lines` reads the numbers of the summary back from the log.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spectral_monitor._imports import is_available
from spectral_monitor.demo.tasks import ANSWER_LEN, Task, accuracy, char_tokenizer, model, warm_up
from spectral_monitor.probes import Probe
from spectral_monitor.records import StepReport
from spectral_monitor.sinks.console import ConsoleSink
from spectral_monitor.sinks.jsonl import read_jsonl
from spectral_monitor.substitution import PeriodicSubstitution

__all__ = ["run", "summary_lines"]


def run(
    out: Path,
    *,
    steps: int,
    every: int,
    seed: int,
    warmup_target: tuple[float, float],
    warmup_max: int,
    probe_size: int = 128,
) -> Path:
    """Warm up (to ``warmup_target`` = (addition, subtraction) held-out exact match, at most
    ``warmup_max`` steps per phase), then GRPO with the monitor attached; returns the run's ``metrics.jsonl``."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from spectral_monitor.integrations.trl import SpectralMonitorCallback

    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    add, sub = Task("+", seed), Task("-", seed)
    net = model(seed)
    t0 = time.perf_counter()
    # subtraction first, to a good level; then both, until addition is good enough for GRPO to find
    # rewards but far from perfect (GRPO's gain must have room)
    warm = warm_up(net, tok, [sub], until=sub, target=warmup_target[1], max_steps=warmup_max, seed=seed)
    warm += warm_up(net, tok, [add, sub], until=add, target=warmup_target[0], max_steps=warmup_max, seed=seed + 1)
    print(
        f"warm-up: {warm} supervised steps, held-out exact match: addition {accuracy(net, tok, add, add.test):.2f}, "
        f"subtraction {accuracy(net, tok, sub, sub.test):.2f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    def accuracies(m: torch.nn.Module) -> dict[str, float]:
        return {"add_acc": accuracy(m, tok, add, add.test), "sub_acc": accuracy(m, tok, sub, sub.test)}

    probe = Probe.from_texts(
        tok,
        sub.pairs(sub.test[:probe_size]),
        metrics={"add_acc": lambda m: accuracies(m)["add_acc"], "sub_acc": lambda m: accuracies(m)["sub_acc"]},
    )
    monitor = SpectralMonitorCallback(
        every_n_steps=every,
        probe=probe,
        substitution=PeriodicSubstitution(rank=1, keep=False, evaluate=accuracies),
        sinks=[ConsoleSink(use_print=True)],
    )

    def exact_match(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    prompts = Dataset.from_list([{"prompt": add.prompt(a, b), "answer": add.answer(a, b)} for a, b in add.train])
    report_to = ["tensorboard"] if is_available("tensorboard") else []
    if is_available("wandb"):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(out))
        os.environ.setdefault("WANDB_PROJECT", "spectral-monitor-demo")
        os.environ.setdefault("WANDB_SILENT", "true")
        report_to.append("wandb")
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=128,  # completions per step: 16 prompts x 8 generations
        num_generations=8,
        max_completion_length=ANSWER_LEN,
        temperature=1.0,
        top_k=0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        beta=0.0,
        logging_steps=max(1, every // 2),
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_dropout=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )
    trainer = GRPOTrainer(
        model=net, reward_funcs=exact_match, args=args, train_dataset=prompts, processing_class=tok, callbacks=[monitor]
    )
    trainer.remove_callback(PrinterCallback)  # the console sink prints one line per measurement
    print(f"GRPO: {steps} steps on addition (exact-match reward), measured every {every} steps", flush=True)
    trainer.train()
    if is_available("wandb"):
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
    return out / "spectral_monitor" / "metrics.jsonl"


def _start_config(path: Path) -> dict:
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            return record["config"]
    return {}


def _first(reports: Sequence[StepReport], get) -> tuple[int, float] | None:
    for r in reports:
        value = get(r)
        if value is not None and math.isfinite(value):
            return r.step, value
    return None


def summary_lines(path: Path, seconds: float | None = None) -> list[str]:
    """The end-of-run summary, every number read from the run's JSONL log."""
    reports = read_jsonl(path)
    base = _start_config(path).get("probe_base") or {}
    first, last = reports[0], reports[-1]
    lines = [f"spectral-monitor demo: {len(reports)} measurements, steps {first.step}-{last.step}"]
    reward = _first(reports, lambda r: r.context.get("reward"))
    reward_end = _first(reports[::-1], lambda r: r.context.get("reward"))
    if reward and reward_end:
        lines.append(
            f"  reward (exact match, GRPO batches)        {reward[1]:.2f} at step {reward[0]} -> {reward_end[1]:.2f}"
        )
    add0, add1 = base.get("add_acc"), last.probes.get("add_acc")
    sub0, sub1 = base.get("sub_acc"), last.probes.get("sub_acc")
    if add0 is not None and add1 is not None:
        lines.append(f"  held-out addition (rewarded)              {add0:.2f} -> {add1:.2f}")
    if sub0 is not None and sub1 is not None:
        kl, rise = last.probes.get("kl", math.nan), last.probes.get("loss_rel", math.nan)
        lines.append(
            f"  held-out subtraction (probe, not rewarded) {sub0:.2f} -> {sub1:.2f}; KL to base {kl:.3f} nats/token, "
            f"loss {rise:+.0%}"
        )
    rho = [(r.step, r.aggregate("rho1")) for r in reports if r.aggregate("rho1") is not None]
    if rho:
        lines.append(
            f"  rank-1 share rho1 (mean over layers)      step {rho[0][0]}: {rho[0][1]:.2f} -> step {rho[-1][0]}: "
            f"{rho[-1][1]:.2f}"
        )
    align = [(r.step, r.aggregate("align_prev")) for r in reports if r.aggregate("align_prev") is not None]
    if align:
        lines.append(
            f"  u1 alignment with the last measurement   step {align[0][0]}: {align[0][1]:.2f} -> "
            f"step {align[-1][0]}: {align[-1][1]:.2f} (1: the top direction no longer turns)"
        )
    lines.append("  " + _alpha_line(last))
    full = last.probes.get("substitution/full/add_acc")
    rank1 = last.probes.get("substitution/rank1/add_acc")
    if full is not None and rank1 is not None and add0 is not None:
        gain = full - add0
        share = f"{(rank1 - add0) / gain:.0%}" if gain > 0 else "n/a (GRPO brought no gain)"
        lines.append(
            f"  rank-1 substitution at the end: addition {rank1:.2f} (full {full:.2f}): keeps {share} of the gain"
        )
    fired: dict[str, StepReport] = {}
    for r in reports:
        for alert in r.alerts:
            fired.setdefault(alert.rule, r)
    if fired:
        for rule, r in fired.items():
            [alert] = [a for a in r.alerts if a.rule == rule]
            lines.append(f"  ALERT {rule} from step {r.step}: {alert.message}")
    else:
        lines.append("  alerts: none fired")
    if seconds is not None:
        lines.append(f"  wall time {seconds:.0f} s")
    return lines


def _alpha_line(report: StepReport) -> str:
    values = report.layers.values()
    reliable = [v for v in values if v.get("alpha_reliable") == 1.0]
    if not reliable:
        return f"heavy-tail alpha of dW: no reliable power-law fit in {len(report.layers)} layers (tails too short)"
    alphas = [v["alpha"] for v in reliable]
    tails = [int(v["alpha_tail"]) for v in reliable]
    ks = max(v["alpha_ks"] for v in reliable)
    return (
        f"heavy-tail alpha of dW                    median {statistics.median(alphas):.2f} "
        f"(reliable on {len(reliable)}/{len(report.layers)} layers, tails {min(tails)}-{max(tails)} values, "
        f"KS <= {ks:.2f})"
    )
