"""Do the monitor's signals and alert rules detect forgetting? Controlled fine-tunes of a tiny GPT-2.

A tiny GPT-2 (character tokenizer) is pre-trained on fixed-width addition ``"ab+cd="`` -> ``"sum"``
(plus two tasks behind their own prefix, so it reads a task from its prompt) until it knows it
(greedy exact match on 500 held-out pairs), then fine-tuned from that base in several scenarios,
each with several seeds, with a :class:`MonitorRun` attached (the library's default rules plus
:func:`spectral_rules`, every ``--every`` steps, ``probe=`` the held-out original task as
(prompt, answer) pairs):

* ``continue``: more addition (should not forget);
* ``new``: a new task behind its own prompt prefix, ``"#ab-cd="`` -> ``|a - b|`` (should not forget);
* ``mix_new50`` / ``mix_conflict25``: the old task mixed with the new or the conflicting one;
* ``conflict``: the same prompts ``"ab+cd="`` with another answer rule, ``|a - b|``, at several
  learning rates (a slow one included).

Ground truth at every measurement: the held-out original task's answer loss and greedy exact match
(500 pairs, disjoint from the probe's). A run *forgets* at its first measurement where the truth
holds: truth A, the loss is >= ``1 + LOSS_RISE`` times the base's or the exact match <= ``EM_FLOOR``;
truth B, the exact match alone.

Signals: every spectral aggregate of the report, the total update norm, the held-out probe's KL,
loss_rel and top-1 agreement, and the KL on the run's *own* training prompts (continued by the
base's greedy answers: the RL's Razor signal; a second :class:`Probe` measured here and recorded
with ``run.record_context``). For each: AUROC of "this run forgets" at the end and at an early step,
AUROC of "forgotten now" over all measurements, and the lead/lag of a threshold that keeps every
healthy run quiet. For each rule: detections, false alarms and first firing vs the ground truth;
then what-if rules re-evaluated on the stored reports (the thresholds the defaults would need).
Both phases use label smoothing 0.1 so the base's held-out loss (~0.1 nat/token) is not ~0, where a
relative rise means nothing.

``python benchmarks/bench_forgetting.py --threads 1`` (about 17 min on 2 shared CPU cores);
``--quick`` for a smoke run (~20 s, untrained base); ``--out DIR`` for the cached base and the runs'
JSONL logs; ``--json PATH`` for every table and record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import fmt_g, fmt_s, parser, quiet, start
from torch import Tensor, nn

from spectral_monitor import JsonlSink, MonitorRun, Probe, StepReport
from spectral_monitor.alerts import (
    KnowledgeLoss,
    MetricThreshold,
    Rule,
    UpdateNormBlowup,
    default_rules,
    evaluate,
    spectral_rules,
)

# ============================================================================ the task
VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "-", "=", "#", "%", "&"]
PAD, EOS = 0, 1
WIDTH = 11  # the longest sequence: "#ab-cd=xyz" + <eos>
LOSS_RISE = 0.2  # ground truth: held-out loss >= (1 + LOSS_RISE) x the base's ...
EM_FLOOR = 0.90  # ... or greedy exact match <= EM_FLOOR
LABEL_SMOOTHING = 0.1
N_GROUND_TRUTH, N_PROBE, N_OWN = 500, 64, 128


class CharTokenizer:
    """Character-level tokenizer over :data:`VOCAB` (``tokenizer(text)["input_ids"]``, as
    :func:`spectral_monitor.probes.text_batches` calls it)."""

    pad_token_id = PAD
    eos_token_id = EOS

    def __init__(self) -> None:
        self.index = {c: i for i, c in enumerate(VOCAB) if len(c) == 1}

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.index[c] for c in text]}

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(VOCAB[i] if len(VOCAB[i]) == 1 else "" for i in ids)


def prompt_answer(task: str, a: int, b: int) -> tuple[str, str]:
    """``add``: the original task; ``max`` / ``min``: the base's other tasks, each behind its own
    prefix; ``conflict``: addition's prompt with another answer; ``new``: a new task behind a new prefix."""
    if task == "add":
        return f"{a:02d}+{b:02d}=", f"{a + b:03d}"
    if task == "conflict":
        return f"{a:02d}+{b:02d}=", f"{abs(a - b):03d}"
    if task == "new":
        return f"#{a:02d}-{b:02d}=", f"{abs(a - b):03d}"
    if task == "max":
        return f"%{a:02d}+{b:02d}=", f"{max(a, b):03d}"
    if task == "min":
        return f"&{a:02d}+{b:02d}=", f"{min(a, b):03d}"
    raise ValueError(f"unknown task {task!r}")


@dataclass(frozen=True)
class Splits:
    """All 10,000 operand pairs, shuffled once: the ground truth's held-out pairs, the probe's
    (disjoint) and the training pool (both phases)."""

    ground_truth: list[tuple[int, int]]
    probe: list[tuple[int, int]]
    pool: list[tuple[int, int]]

    @classmethod
    def make(cls) -> Splits:
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(0).shuffle(pairs)
        n, p = N_GROUND_TRUTH, N_PROBE
        return cls(pairs[:n], pairs[n : n + p], pairs[n + p :])


def encode_rows(tok: CharTokenizer, task: str, pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Training rows ``(N, WIDTH)``: prompt + answer + <eos>, right-padded; labels count the answer
    and <eos> only (-100 elsewhere)."""
    ids = torch.full((len(pairs), WIDTH), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), WIDTH), -100, dtype=torch.long)
    for r, (a, b) in enumerate(pairs):
        prompt, answer = prompt_answer(task, a, b)
        p, x = tok(prompt)["input_ids"], tok(answer)["input_ids"] + [EOS]
        ids[r, : len(p) + len(x)] = torch.tensor(p + x)
        labels[r, len(p) : len(p) + len(x)] = torch.tensor(x)
    return ids, labels


class Mixture:
    """Training rows drawn from several tasks: each row's task with probability ``mix[task]``, its
    operands uniformly from the pool (``rows[task]``: that task's :func:`encode_rows` of the pool)."""

    def __init__(
        self, rows: dict[str, tuple[Tensor, Tensor]], mix: dict[str, float], pool: Sequence[tuple[int, int]], seed: int
    ) -> None:
        self.rows, self.pool, self.tasks = rows, pool, list(mix)
        self.weights = torch.tensor([mix[t] for t in self.tasks])
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> tuple[Tensor, Tensor, list[str]]:
        """``n`` rows: ids and labels ``(n, WIDTH)`` and the prompts as text."""
        which = torch.multinomial(self.weights, n, replacement=True, generator=self.gen).tolist()
        idx = torch.randint(len(self.pool), (n,), generator=self.gen).tolist()
        ids = torch.stack([self.rows[self.tasks[w]][0][i] for w, i in zip(which, idx)])
        labels = torch.stack([self.rows[self.tasks[w]][1][i] for w, i in zip(which, idx)])
        prompts = [prompt_answer(self.tasks[w], *self.pool[i])[0] for w, i in zip(which, idx)]
        return ids, labels, prompts


def lm_loss(model: nn.Module, ids: Tensor, labels: Tensor, smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """Mean next-token cross-entropy of the counted labels (label smoothing ``smoothing``)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=smoothing
    )


def build_model(cfg: dict[str, int]) -> nn.Module:
    """A fresh GPT-2 of ``cfg["n_layer"]`` blocks of width ``cfg["n_embd"]`` over :data:`VOCAB`, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # right padding without attention_mask is intended: answers come last

    with quiet():
        return GPT2LMHeadModel(
            GPT2Config(
                n_layer=cfg["n_layer"],
                n_embd=cfg["n_embd"],
                n_head=4,
                vocab_size=len(VOCAB),
                n_positions=16,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=EOS,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )
        )


@torch.no_grad()
def greedy_ids(model: nn.Module, tok: CharTokenizer, prompts: Sequence[str], n: int = 3) -> list[list[int]]:
    """Each prompt's token ids followed by the model's ``n`` greedy tokens (prompts batched by length)."""
    was = model.training
    model.eval()
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        x = torch.tensor([tok(prompts[i])["input_ids"] for i in rows])
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
        out.update(zip(rows, x.tolist()))
    model.train(was)
    return [out[i] for i in range(len(prompts))]


def greedy(model: nn.Module, tok: CharTokenizer, prompts: Sequence[str], n: int = 3) -> list[str]:
    """The model's greedy ``n``-token answer to each prompt, as text."""
    return [tok.decode(ids[len(p) :]) for p, ids in zip(prompts, greedy_ids(model, tok, prompts, n))]


def continuation_batches(tok: CharTokenizer, model: nn.Module, prompts: Sequence[str]) -> list[dict[str, Tensor]]:
    """Probe batches of ``prompts`` followed by ``model``'s greedy answers: the answer tokens count
    (KL along the base's own responses, the per-token form of RL's Razor's KL). One batch per prompt length."""
    full = greedy_ids(model, tok, prompts)
    out = []
    for length in sorted({len(p) for p in prompts}):
        ids = torch.tensor([x for p, x in zip(prompts, full) if len(p) == length])
        labels = ids.clone()
        labels[:, :length] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class GroundTruth:
    """The held-out original task: answer loss (nats/token, no smoothing) and greedy exact match."""

    def __init__(self, tok: CharTokenizer, pairs: Sequence[tuple[int, int]]) -> None:
        texts = [prompt_answer("add", a, b) for a, b in pairs]
        self.tok = tok
        self.prompts = [p for p, _ in texts]
        self.answers = [x for _, x in texts]
        self.ids = torch.tensor([tok(p + x)["input_ids"] for p, x in texts])  # (N, 9)
        self.answer_at = len(self.prompts[0])

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, float]:
        was = model.training
        model.eval()
        a = self.answer_at
        logits = model(input_ids=self.ids).logits[:, a - 1 : -1].float()  # predicts the answer tokens
        loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.ids[:, a:].reshape(-1)))
        model.train(was)
        em = sum(g == x for g, x in zip(greedy(model, self.tok, self.prompts), self.answers)) / len(self.answers)
        return loss, em


# ============================================================================ the base
#: the base's pre-training tasks: addition (the original task, probed) and two tasks behind their own prefix,
#: so that the base has learned to read a task from its prompt's first character
PRETRAIN_MIX = {"add": 0.6, "max": 0.2, "min": 0.2}


def pretrain(
    args: Any, tok: CharTokenizer, splits: Splits, gt: GroundTruth, rows: dict[str, tuple[Tensor, Tensor]]
) -> tuple[dict[str, Tensor], dict]:
    """Pre-train (or load from ``--out``) the base on :data:`PRETRAIN_MIX`; returns its state_dict and a summary."""
    cfg = {"n_layer": args.n_layer, "n_embd": args.n_embd, "steps": args.pretrain_steps, "batch": 128, "lr": 3e-3}
    ident = {**cfg, "mix": PRETRAIN_MIX, "smoothing": LABEL_SMOOTHING, "vocab": VOCAB, "v": 2}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    path = Path(args.out) / f"base_{key.hexdigest()[:12]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state_dict"], {**saved["info"], "cached": str(path)}
    torch.manual_seed(0)
    model = build_model(cfg)
    data = Mixture(rows, PRETRAIN_MIX, splits.pool, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    steps, warm = cfg["steps"], min(100, cfg["steps"] // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids, labels, _ = data.sample(cfg["batch"])
        loss = lm_loss(model, ids, labels)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0:
            print(f"   pretrain step {step}/{steps}: train loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    loss, em = gt(model)
    info = {**cfg, "seconds": seconds, "heldout_loss": loss, "heldout_em": em, "cached": ""}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return model.state_dict(), info


# ============================================================================ the fine-tunes
@dataclass(frozen=True)
class Scenario:
    kind: str
    mix: dict[str, float]  # task -> share of the training rows
    lr: float

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.lr:g}"


FULL_SCENARIOS = [
    Scenario("continue", {"add": 1.0}, 3e-4),
    Scenario("continue", {"add": 1.0}, 1e-3),
    Scenario("continue", {"add": 1.0}, 3e-3),
    Scenario("new", {"new": 1.0}, 3e-5),
    Scenario("new", {"new": 1.0}, 1e-4),
    Scenario("mix_new50", {"new": 0.5, "add": 0.5}, 1e-4),
    Scenario("mix_new50", {"new": 0.5, "add": 0.5}, 3e-4),
    Scenario("mix_conflict25", {"conflict": 0.25, "add": 0.75}, 3e-4),
    Scenario("conflict", {"conflict": 1.0}, 1e-5),
    Scenario("conflict", {"conflict": 1.0}, 3e-5),
    Scenario("conflict", {"conflict": 1.0}, 1e-4),
    Scenario("conflict", {"conflict": 1.0}, 3e-4),
]
QUICK_SCENARIOS = [Scenario("continue", {"add": 1.0}, 3e-4), Scenario("conflict", {"conflict": 1.0}, 3e-3)]


@dataclass
class Measurement:
    """One measurement of one run: the ground truth, the signals, the rules that fired, the report."""

    step: int
    gt_loss: float
    gt_em: float
    signals: dict[str, float]
    alerts: list[str]
    report: StepReport = field(repr=False)


@dataclass
class RunLog:
    scenario: Scenario
    seed: int
    measurements: list[Measurement]
    base_loss: float
    seconds: float
    train_step_s: float
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scenario.name} s{self.seed}"

    def loss_up(self, m: Measurement) -> bool:
        return m.gt_loss >= (1 + LOSS_RISE) * self.base_loss

    def first(self, test: Callable[[RunLog, Measurement], bool]) -> int | None:
        return next((m.step for m in self.measurements if test(self, m)), None)


@dataclass(frozen=True)
class Truth:
    """A definition of "forgotten" at one measurement (``now``); a run forgets at its first such measurement."""

    short: str
    name: str
    now: Callable[[RunLog, Measurement], bool]

    def step(self, run: RunLog) -> int | None:
        return run.first(self.now)


#: the ground truths: the brief's (loss +20 % or exact match <= 0.90), and exact match alone (the
#: loss rise also counts a base that became less sure of answers it still gets right)
TRUTHS = (
    Truth("A", "loss +20% or EM <= 0.90", lambda r, m: r.loss_up(m) or m.gt_em <= EM_FLOOR),
    Truth("B", "EM <= 0.90", lambda r, m: m.gt_em <= EM_FLOOR),
)


#: aggregate statistics read from ``report.aggregates`` beside every metric's mean
EXTRA_STATS = (("rho1", "max"), ("update_rel", "max"), ("intruders", "max"), ("alpha", "min"), ("alpha", "max"))


def signals_of(report: StepReport) -> dict[str, float]:
    """The report's model-level signals under short names (``<metric>_<stat>``, probe_*, own_kl)."""
    out = {f"{metric}_mean": stats["mean"] for metric, stats in report.aggregates.items() if "mean" in stats}
    for metric, stat in EXTRA_STATS:
        value = report.aggregate(metric, stat)
        if value is not None:
            out[f"{metric}_{stat}"] = value
    if "update_norm_total" in report.model:
        out["update_norm_total"] = report.model["update_norm_total"]
    for name in ("kl", "loss_rel", "top1_agree"):
        if name in report.probes:
            out[f"probe_{name}"] = report.probes[name]
    for name in ("own_kl", "own_loss_rel"):
        if name in report.context:
            out[name] = report.context[name]
    return out


def finetune(
    args: Any,
    scenario: Scenario,
    seed: int,
    base_state: dict[str, Tensor],
    tok: CharTokenizer,
    splits: Splits,
    gt: GroundTruth,
    base_gt: tuple[float, float],
    rows: dict[str, tuple[Tensor, Tensor]],
    model_cfg: dict[str, int],
) -> RunLog:
    """One monitored fine-tune from the base; every measurement's ground truth, signals and alerts."""
    model = build_model(model_cfg)
    model.load_state_dict(base_state)
    model.train()
    data = Mixture(rows, scenario.mix, splits.pool, seed=1000 + seed)

    # the run's own training prompts, answered by the base (greedy): KL(base || model) along them
    _, _, own_prompts = data.sample(N_OWN)
    own_probe = Probe(continuation_batches(tok, model, own_prompts))
    own_base = own_probe.start(model)
    probe = Probe.from_texts(tok, [prompt_answer("add", a, b) for a, b in splits.probe], batch_size=64)

    run_dir = Path(args.out) / "runs" / f"{scenario.name}_s{seed}"
    run = MonitorRun(
        model,
        every_n_steps=args.every,
        rules=[*default_rules(), *spectral_rules()],
        probe=probe,
        sinks=[JsonlSink(run_dir / "metrics.jsonl")],
    )
    opt = torch.optim.AdamW(model.parameters(), lr=scenario.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = 30  # linear warm-up steps (10 % of a 300-step run)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    t_run = time.perf_counter()
    run.start()
    measurements: list[Measurement] = []
    train_s: list[float] = []
    own_s: list[float] = []
    for step in range(1, args.steps + 1):
        ids, labels, _ = data.sample(args.batch)
        t0 = time.perf_counter()
        loss = lm_loss(model, ids, labels)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s.append(time.perf_counter() - t0)
        final = step == args.steps
        truth = None
        if run.should_measure(step, final=final):
            own = own_probe.measure(model)
            own_s.append(own.seconds)
            truth = gt(model)
            run.record_context(
                {
                    "own_kl": own.kl,
                    "own_loss_rel": own.loss_rel,
                    "gt_loss": truth[0],
                    "gt_em": truth[1],
                    "train_loss": loss.item(),
                }
            )
        decision = run.on_optimizer_step(step, final=final)
        if decision.report is not None and truth is not None:
            report = decision.report
            measurements.append(
                Measurement(step, truth[0], truth[1], signals_of(report), [a.rule for a in report.alerts], report)
            )
    run.finish()
    seconds = time.perf_counter() - t_run
    reports = [m.report for m in measurements]
    costs = {
        "probe_tokens": float(probe.tokens),
        "probe_cache_bytes": float(probe.cache_bytes),
        "probe_start_s": probe.base.seconds if probe.base is not None else math.nan,
        "probe_measure_s": statistics.median(r.probes.get("seconds", math.nan) for r in reports),
        "own_tokens": float(own_probe.tokens),
        "own_cache_bytes": float(own_probe.cache_bytes),
        "own_start_s": own_base.seconds,
        "own_measure_s": statistics.median(own_s),
        "measure_s": statistics.median(r.model.get("measure_s", math.nan) for r in reports),
        "base_random_frac": reports[0].model.get("base_random_frac", math.nan),
    }
    return RunLog(scenario, seed, measurements, base_gt[0], seconds, statistics.median(train_s), costs)


# ============================================================================ analysis
#: +1: the signal's alarm direction is "high"; -1: "low" (stable rank, effective rank, α and
#: top-1 agreement fall when an update collapses or the model drifts). Fixed before looking at results.
DIRECTION: dict[str, int] = {
    "stable_rank_mean": -1,
    "erank_mean": -1,
    "alpha_mean": -1,
    "alpha_min": -1,
    "align_base_mean": -1,
    "sparsity_mean": -1,
    "probe_top1_agree": -1,
}


def direction(signal: str) -> int:
    return DIRECTION.get(signal, 1)


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney U statistic over
    ``n_pos n_neg`` from average ranks. Non-finite values are dropped; NaN when a class is empty."""
    pos = [x for x in pos if math.isfinite(x)]
    neg = [x for x in neg if math.isfinite(x)]
    if not pos or not neg:
        return math.nan
    values = sorted([(x, 1) for x in pos] + [(x, 0) for x in neg])
    rank_sum, i = 0.0, 0
    while i < len(values):  # tied values share their average rank
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        rank_sum += sum(is_pos for _, is_pos in values[i:j]) * (i + j + 1) / 2
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def directed(m: Measurement, signal: str) -> float:
    """The signal at one measurement in its alarm direction (higher = more alarming); NaN if absent."""
    return direction(signal) * m.signals.get(signal, math.nan)


def value_at(run: RunLog, signal: str, step: int | None = None) -> float:
    """The directed signal at ``step`` (None: the run's last measurement); NaN if not measured."""
    ms = run.measurements if step is None else [m for m in run.measurements if m.step == step]
    return directed(ms[-1], signal) if ms else math.nan


def first_above(run: RunLog, signal: str, threshold: float) -> int | None:
    """First measured step where the directed signal is above ``threshold``."""
    return run.first(lambda _, m: directed(m, signal) > threshold)


def quiet_threshold(runs: Sequence[RunLog], signal: str) -> float:
    """The largest directed value the given (healthy) runs ever reach: above it, none of them fires."""
    values = [v for r in runs for m in r.measurements if math.isfinite(v := directed(m, signal))]
    return max(values) if values else math.nan


def fmt_lead(leads: Sequence[int]) -> str:
    """Median lead in steps with its range: + = before the ground truth, - = after."""
    if not leads:
        return "-"
    return f"{statistics.median(leads):+.0f} [{min(leads):+d}, {max(leads):+d}]"


def signal_names(runs: Sequence[RunLog]) -> list[str]:
    """Every signal measured, spectral first, then the update norm, the held-out probe, the own-data probe."""

    def order(name: str) -> tuple[int, str]:
        if name.startswith(("probe_", "own_")):
            return (2 if name.startswith("probe_") else 3), name
        return (1 if name == "update_norm_total" else 0), name

    return sorted({s for r in runs for m in r.measurements for s in m.signals}, key=order)


def signal_table(runs: Sequence[RunLog], truth: Truth, early: int) -> tuple[list[list[Any]], dict[str, Any]]:
    """Per signal: AUROC of "this run forgets" from the value at the end and at ``early`` (runs not yet
    forgotten then), AUROC of "forgotten now" over all measurements pooled, and a threshold that keeps
    every healthy run quiet: forgetting runs caught, lead/lag, and the same threshold chosen without
    each seed and applied to it (cross-seed)."""
    first = {r.name: truth.step(r) for r in runs}
    healthy = [r for r in runs if first[r.name] is None]
    forgetting = [r for r in runs if first[r.name] is not None]
    fresh = [r for r in runs if first[r.name] is None or first[r.name] > early]
    seeds = sorted({r.seed for r in runs})
    rows, data = [], {}
    for s in signal_names(runs):
        end_pos, end_neg = [value_at(r, s) for r in forgetting], [value_at(r, s) for r in healthy]
        end = auroc(end_pos, end_neg)
        # runs without the value at their end (e.g. no reliable α fit) are left out: say how many remain
        n_pos, n_neg = sum(map(math.isfinite, end_pos)), sum(map(math.isfinite, end_neg))
        counts = "" if (n_pos, n_neg) == (len(forgetting), len(healthy)) else f" ({n_pos}/{n_neg})"
        fresh_pos = [value_at(r, s, early) for r in fresh if first[r.name] is not None]
        fresh_neg = [value_at(r, s, early) for r in fresh if first[r.name] is None]
        at_early = auroc(fresh_pos, fresh_neg)
        pooled = auroc(
            [directed(m, s) for r in runs for m in r.measurements if truth.now(r, m)],
            [directed(m, s) for r in runs for m in r.measurements if not truth.now(r, m)],
        )
        tau = quiet_threshold(healthy, s)
        leads = []
        for r in forgetting:
            fired = first_above(r, s, tau) if math.isfinite(tau) else None
            if fired is not None:
                leads.append(first[r.name] - fired)
        cv_caught = cv_false = 0
        for seed in seeds:
            tau_cv = quiet_threshold([r for r in healthy if r.seed != seed], s)
            if math.isfinite(tau_cv):
                for r in (r for r in runs if r.seed == seed and first_above(r, s, tau_cv) is not None):
                    cv_caught += first[r.name] is not None
                    cv_false += first[r.name] is None
        rows.append(
            [
                s,
                "high" if direction(s) > 0 else "low",
                fmt_g(end, 2) + counts,
                fmt_g(max(end, 1 - end), 2) if math.isfinite(end) else "-",
                fmt_g(at_early, 2) + f" ({sum(map(math.isfinite, fresh_pos))}/{sum(map(math.isfinite, fresh_neg))})",
                fmt_g(pooled, 2),
                fmt_g(direction(s) * tau),
                f"{len(leads)}/{len(forgetting)}",
                fmt_lead(leads),
                f"{cv_caught}/{len(forgetting)}, {cv_false}/{len(healthy)}",
            ]
        )
        data[s] = {
            "auroc_end": end,
            "auroc_end_runs": [n_pos, n_neg],
            "auroc_early": at_early,
            "auroc_pooled": pooled,
            "quiet_threshold": direction(s) * tau,
            "caught": len(leads),
            "leads": leads,
            "cv_caught": cv_caught,
            "cv_false_alarms": cv_false,
        }
    return rows, data


def rule_row(runs: Sequence[RunLog], truth: Truth, fired: Callable[[RunLog], list[int]]) -> tuple[list[Any], dict]:
    """One rule over all runs: detections (forgetting runs where it fired), false alarms (healthy runs
    where it fired), lead/lag of its first firing vs the truth's first forgetting step."""
    first = {r.name: truth.step(r) for r in runs}
    detected, leads, early, false = 0, [], 0, 0
    for r in runs:
        steps = fired(r)
        if not steps:
            continue
        if first[r.name] is None:
            false += 1
            continue
        detected += 1
        leads.append(first[r.name] - steps[0])
        early += steps[0] <= first[r.name]
    n_forget = sum(f is not None for f in first.values())
    row = [f"{detected}/{n_forget}", f"{false}/{len(runs) - n_forget}", fmt_lead(leads), f"{early}/{detected}"]
    return row, {"detections": detected, "false_alarms": false, "leads": leads, "at_or_before_truth": early}


def replay(rules: Sequence[Rule], run: RunLog) -> dict[str, list[int]]:
    """Re-evaluate ``rules`` on the run's stored reports (rules are pure): rule name -> steps it fired."""
    states: dict[str, Any] = {}
    fired: dict[str, list[int]] = {rule.name: [] for rule in rules}
    for m in run.measurements:
        alerts, states = evaluate(rules, states, m.report)
        for a in alerts:
            fired[a.rule].append(m.step)
    return fired


def round_up(x: float) -> float:
    """1.5 ``x`` rounded up to 1, 1.5, 2, ... times a power of ten (a threshold above a healthy maximum)."""
    if not math.isfinite(x) or x <= 0:
        return math.nan
    y = 1.5 * x
    e = 10 ** math.floor(math.log10(y))
    return math.ceil(round(y / e * 2, 9)) / 2 * e  # round(): 1.5 x 0.2 is 0.30000000000000004


# ============================================================================ main
def main() -> int:
    p = parser("do the monitor's signals and rules detect forgetting? (tiny GPT-2, controlled fine-tunes)")
    p.add_argument(
        "--out",
        default=None,
        help="cached base and the runs' JSONL logs (default spectral_runs/bench_forgetting, with --quick ..._quick)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per scenario (default 3; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 300; quick 30)")
    p.add_argument("--every", type=int, default=10, help="measure every N steps (default 10)")
    p.add_argument("--early", type=int, default=None, help="the early step of the early AUROC (default 50; quick 20)")
    args = p.parse_args()
    quick = args.quick
    args.out = args.out or ("spectral_runs/bench_forgetting_quick" if quick else "spectral_runs/bench_forgetting")
    args.seeds = args.seeds or (2 if quick else 3)
    args.steps = args.steps or (30 if quick else 300)
    args.early = args.early or (20 if quick else 50)
    args.batch = 32 if quick else 64
    args.n_layer, args.n_embd = (2, 64) if quick else (2, 128)
    args.pretrain_steps = 150 if quick else 1500
    logging.getLogger("spectral_monitor").setLevel(logging.ERROR)  # alerts are tabulated below, not logged
    t_all = time.perf_counter()
    out = start("bench_forgetting: do the spectral signals and the alert rules detect forgetting?", args)
    tok = CharTokenizer()
    splits = Splits.make()
    gt = GroundTruth(tok, splits.ground_truth)
    model_cfg = {"n_layer": args.n_layer, "n_embd": args.n_embd}

    # ------------------------------------------------------------------ the base
    print("\n   base: pre-training on addition (or loading the cached one) ...", flush=True)
    rows = {t: encode_rows(tok, t, splits.pool) for t in ("add", "max", "min", "conflict", "new")}
    base_state, info = pretrain(args, tok, splits, gt, rows)
    base_model = build_model(model_cfg)
    base_model.load_state_dict(base_state)
    base_gt = gt(base_model)
    out.table(
        "the base: tiny GPT-2 pre-trained on fixed-width addition",
        ["model", "params", "pretrain steps x batch", "pretrain time", "held-out loss (nats/token)", "held-out EM"],
        [
            [
                f"GPT-2 {args.n_layer} x {args.n_embd}, vocab {len(VOCAB)}",
                f"{sum(p.numel() for p in base_model.parameters()) / 1e3:.0f}k",
                f"{info['steps']} x {info['batch']}",
                fmt_s(info["seconds"]) + (" (cached)" if info["cached"] else ""),
                f"{base_gt[0]:.4f}",
                f"{base_gt[1]:.3f}",
            ]
        ],
        note=f"   {N_GROUND_TRUTH} held-out pairs (the ground truth); label smoothing {LABEL_SMOOTHING} in both phases"
        + ("" if base_gt[1] >= 0.95 else f"\n   NOTE: held-out EM {base_gt[1]:.3f} < 0.95: the base is not trained"),
    )
    out.data["base"] = {**info, "heldout_loss_now": base_gt[0], "heldout_em_now": base_gt[1]}

    # ------------------------------------------------------------------ the fine-tunes
    scenarios = QUICK_SCENARIOS if quick else FULL_SCENARIOS
    runs: list[RunLog] = []
    print(f"\n   fine-tunes: {len(scenarios)} scenarios x {args.seeds} seeds, {args.steps} steps each", flush=True)
    for scenario in scenarios:
        for seed in range(args.seeds):
            r = finetune(args, scenario, seed, base_state, tok, splits, gt, base_gt, rows, model_cfg)
            runs.append(r)
            last = r.measurements[-1]
            steps = ", ".join(f"{t.short}: {t.step(r) if t.step(r) is not None else '-'}" for t in TRUTHS)
            print(
                f"   {r.name:<22} {r.seconds:5.1f} s  end: loss {last.gt_loss / r.base_loss - 1:+6.0%} EM "
                f"{last.gt_em:.3f}; first forgetting step ({steps})",
                flush=True,
            )
    report_results(out, args, runs, scenarios, base_gt)
    out.data["total_seconds"] = time.perf_counter() - t_all
    print(f"\n   total time {fmt_s(out.data['total_seconds'])}")
    out.finish()
    return 0


def report_results(
    out: Any, args: Any, runs: list[RunLog], scenarios: Sequence[Scenario], base_gt: tuple[float, float]
) -> None:
    """Print every table (and keep them, with the runs' records, for ``--json``)."""
    # ------------------------------------------------------------------ ground truth
    out.table(
        "ground truth per run (held-out original task, 500 pairs)",
        [
            "run (kind@lr seed)",
            "training rows",
            "first step: loss +20%",
            "first step: EM <= 0.90",
            "worst loss vs base",
            "worst EM",
            "end loss vs base",
            "end EM",
            "rules fired (first step)",
        ],
        [
            [
                r.name,
                " + ".join(f"{w:.0%} {t}" for t, w in r.scenario.mix.items()),
                r.first(lambda run, m: run.loss_up(m)) or "-",
                r.first(lambda _, m: m.gt_em <= EM_FLOOR) or "-",
                f"{max(m.gt_loss for m in r.measurements) / r.base_loss - 1:+.0%}",
                f"{min(m.gt_em for m in r.measurements):.3f}",
                f"{r.measurements[-1].gt_loss / r.base_loss - 1:+.0%}",
                f"{r.measurements[-1].gt_em:.3f}",
                ", ".join(f"{n} ({s[0]})" for n, s in fired_steps(r).items()) or "-",
            ]
            for r in runs
        ],
        note=f"   base: held-out loss {base_gt[0]:.4f} nats/token, EM {base_gt[1]:.3f}. A run forgets at its first "
        f"measurement (step 1, then every {args.every} steps) where the truth holds; truth A: {TRUTHS[0].name} "
        f"(loss >= {1 + LOSS_RISE:g} x the base's), truth B: {TRUTHS[1].name}",
    )
    out.table(
        "ground truth per scenario",
        [
            "scenario",
            *(h for t in TRUTHS for h in (f"runs forgetting {t.short}", f"median first step {t.short}")),
            "end EM (mean)",
        ],
        [
            [
                sc.name,
                *(x for t in TRUTHS for x in _forgetting_summary([r for r in runs if r.scenario == sc], t)),
                f"{statistics.fmean(r.measurements[-1].gt_em for r in runs if r.scenario == sc):.3f}",
            ]
            for sc in scenarios
        ],
    )
    out.data["runs"] = [
        {
            "scenario": r.scenario.name,
            "seed": r.seed,
            "first_forgetting_step": {t.short: t.step(r) for t in TRUTHS},
            "seconds": r.seconds,
            "costs": r.costs,
            "measurements": [
                {"step": m.step, "gt_loss": m.gt_loss, "gt_em": m.gt_em, "alerts": m.alerts, "signals": m.signals}
                for m in r.measurements
            ],
        }
        for r in runs
    ]
    out.save()

    # ------------------------------------------------------------------ signals
    for truth in TRUTHS:
        n_f = sum(truth.step(r) is not None for r in runs)
        rows, data = signal_table(runs, truth, args.early)
        out.table(
            f"signals vs truth {truth.short}: {truth.name} ({n_f} forgetting, {len(runs) - n_f} healthy runs)",
            [
                "signal",
                "alarm when",
                "AUROC end",
                "max(A, 1-A)",
                f"AUROC @{args.early} (pos/neg)",
                "AUROC per measurement",
                "quiet threshold",
                "caught",
                "lead steps: median [range]",
                "cross-seed: caught, false alarms",
            ],
            rows,
            note="   AUROC: 0.5 chance, 1 perfect, < 0.5 the opposite of the alarm direction (max(A, 1-A) ignores the "
            "direction: optimistic); (pos/neg): the forgetting/healthy runs that have the value then (α needs a "
            f"reliable fit), at the end shown only where some lack it. @{args.early}: the value at that step, runs "
            "not yet forgotten then. Per "
            "measurement: every measurement pooled, 'forgotten now' vs not. Quiet threshold: the most alarming value "
            "any healthy run reached (in-sample, so no healthy run fires); lead = first forgetting step - first step "
            "beyond it (+ = before). Cross-seed: the threshold from the other seeds' healthy runs, applied to each "
            "seed's runs, summed. probe_* is the held-out ORIGINAL task (nearly the ground truth itself); own_* is "
            "on the run's own training prompts, continued with the base's greedy answers.",
        )
        out.data.setdefault("signals", {})[truth.short] = data

    # the runs that train on the new task: there the own prompts are not the original task's, so the
    # own-data KL is a signal of its own (on continue / conflict runs the own prompts ARE the original task's)
    subset = [r for r in runs if "new" in r.scenario.mix]
    truth = TRUTHS[1]
    n_f = sum(truth.step(r) is not None for r in subset)
    if subset and 0 < n_f < len(subset):
        rows, data = signal_table(subset, truth, args.early)
        out.table(
            f"signals vs truth {truth.short} on the runs that train on the new task only "
            f"({n_f} forgetting, {len(subset) - n_f} healthy)",
            [
                "signal",
                "alarm when",
                "AUROC end",
                "AUROC per measurement",
                "quiet threshold",
                "caught",
                "lead steps: median [range]",
            ],
            [[row[0], row[1], row[2], row[5], row[6], row[7], row[8]] for row in rows],
            note="   new@lr (forget) vs mix_new50@lr (keep addition by exact match): both learn the new task, so a "
            "signal that only tracks 'learning something new' cannot separate them",
        )
        out.data["signals_new_task_runs"] = data

    # ------------------------------------------------------------------ rules, as run
    rows, data = [], {}
    defaults = {x.name for x in default_rules()}
    for rule in [*default_rules(), *spectral_rules()]:
        row = [rule.name, "default" if rule.name in defaults else "spectral"]
        for truth in TRUTHS:
            cells, d = rule_row(runs, truth, lambda r, n=rule.name: fired_steps(r).get(n, []))
            row += cells
            data.setdefault(truth.short, {})[rule.name] = d
        rows.append(row)
    out.table(
        "rules as run: default_rules() + spectral_rules(), library defaults",
        ["rule", "set", *_rule_headers()],
        rows,
        note=f"   truth {TRUTHS[0].short}: {TRUTHS[0].name}; truth {TRUTHS[1].short}: {TRUTHS[1].name}. detections: "
        "forgetting runs where the rule fired; false alarms: healthy runs where it fired; lead: the truth's first "
        "forgetting step - the rule's first firing (+ = before); at/before: detections firing at or before the truth",
    )
    out.data["rules"] = data

    # ------------------------------------------------------------------ what the defaults need
    need, need_data = [], {}
    for signal, default in (("update_rel_max", 0.5), ("probe_kl", 0.2), ("probe_loss_rel", 0.2), ("own_kl", None)):
        row = [signal, fmt_g(default)]
        for truth in TRUTHS:
            hmax = quiet_threshold([r for r in runs if truth.step(r) is None], signal)
            at = [m.signals.get(signal, math.nan) for r in runs for m in r.measurements if m.step == truth.step(r)]
            at = [v for v in at if math.isfinite(v)]
            row += [fmt_g(hmax), f"{fmt_g(min(at))} / {fmt_g(statistics.median(at))}" if at else "-"]
            need_data.setdefault(truth.short, {})[signal] = {"healthy_max": hmax, "at_first_forgetting": at}
        need.append(row)
    out.table(
        "what the default thresholds need",
        [
            "value",
            "library default",
            *(h for t in TRUTHS for h in (f"healthy max {t.short}", f"at first forgetting: min / median {t.short}")),
        ],
        need,
        note="   update_rel_max: the largest ‖ΔW‖/‖W_0‖ of any layer (UpdateNormBlowup.max_rel); probe_kl, "
        "probe_loss_rel: KnowledgeLoss(kl=, loss_rise=) on the held-out probe; own_kl: KL on the run's own prompts. "
        "Healthy max over every measurement of every healthy run.",
    )
    out.data["defaults_need"] = need_data

    # ------------------------------------------------------------------ what-if rules, replayed on the reports
    def healthy_max(signal: str) -> list[float]:
        return [round_up(need_data[t.short][signal]["healthy_max"]) for t in TRUTHS]

    cands: list[tuple[str, Rule]] = []
    for kl in sorted({0.05, 0.1, 0.2, 0.5, *healthy_max("probe_kl")}):
        if math.isfinite(kl):
            cands.append((f"KnowledgeLoss(kl={kl:g}, loss_rise=None)", KnowledgeLoss(kl=kl, loss_rise=None)))
    cands.append(
        ("KnowledgeLoss(kl=0.2, loss_rise=None, patience=1)", KnowledgeLoss(kl=0.2, loss_rise=None, patience=1))
    )
    for rise in sorted({0.1, 0.2, 0.5, 1.0, *healthy_max("probe_loss_rel")}):
        if math.isfinite(rise):
            cands.append((f"KnowledgeLoss(kl=None, loss_rise={rise:g})", KnowledgeLoss(kl=None, loss_rise=rise)))
    for rel in sorted({0.25, 0.5, 1.0, *healthy_max("update_rel_max")}):
        if math.isfinite(rel):
            cands.append((f"UpdateNormBlowup(max_rel={rel:g})", UpdateNormBlowup(max_rel=rel)))
    for kl in sorted({0.1, 0.2, 0.5, *healthy_max("own_kl")}):
        if math.isfinite(kl):
            rule = MetricThreshold(key="spectral/context/own_kl", above=kl, patience=2)
            cands.append((f"MetricThreshold(key='spectral/context/own_kl', above={kl:g}, patience=2)", rule))
    rows, data = [], {}
    for label, rule in cands:
        fired = {r.name: replay([rule], r)[rule.name] for r in runs}
        row = [label]
        for truth in TRUTHS:
            cells, d = rule_row(runs, truth, lambda r, f=fired: f[r.name])
            row += cells
            data.setdefault(truth.short, {})[label] = d
        rows.append(row)
    out.table(
        "what-if rules, re-evaluated on the stored reports",
        ["rule", *_rule_headers()],
        rows,
        note="   thresholds that are not round numbers are 1.5 x a healthy maximum (in-sample: chosen on these runs); "
        "patience: the class default (KnowledgeLoss 2, UpdateNormBlowup 1) unless given",
    )
    out.data["what_if"] = data

    # ------------------------------------------------------------------ costs
    def med(key: str) -> float:
        return statistics.median(r.costs[key] for r in runs)

    out.table(
        "cost per measurement on this model (medians over runs)",
        ["what", "tokens", "cache", "first pass (base)", "per measurement"],
        [
            [
                f"held-out probe (probe=, {N_PROBE} pairs x 3 answer tokens)",
                f"{med('probe_tokens'):.0f}",
                f"{med('probe_cache_bytes') / 1024:.1f} KiB",
                fmt_s(med("probe_start_s")),
                fmt_s(med("probe_measure_s")),
            ],
            [
                f"own-data probe ({N_OWN} training prompts x 3 base answer tokens)",
                f"{med('own_tokens'):.0f}",
                f"{med('own_cache_bytes') / 1024:.1f} KiB",
                fmt_s(med("own_start_s")),
                fmt_s(med("own_measure_s")),
            ],
            [f"spectral measurement ({4 * args.n_layer} matrices)", "-", "-", "-", fmt_s(med("measure_s"))],
            [
                f"one training step (batch {args.batch})",
                "-",
                "-",
                "-",
                fmt_s(statistics.median(r.train_step_s for r in runs)),
            ],
        ],
        note=f"   base_random_frac at the first measurement: {fmt_g(med('base_random_frac'))} "
        "(>= 0.5 would silence update_norm_blowup and intruder_dimensions)",
    )
    out.data["costs"] = {k: med(k) for k in runs[0].costs}


def fired_steps(run: RunLog) -> dict[str, list[int]]:
    """Rule name -> the steps it fired in the run (as run, with the library's rules)."""
    out: dict[str, list[int]] = {}
    for m in run.measurements:
        for rule in m.alerts:
            out.setdefault(rule, []).append(m.step)
    return out


def _rule_headers() -> list[str]:
    return [f"{h} {t.short}" for t in TRUTHS for h in ("detections", "false alarms", "lead [range]", "at/before")]


def _forgetting_summary(runs: Sequence[RunLog], truth: Truth) -> list[str]:
    steps = [s for r in runs if (s := truth.step(r)) is not None]
    return [f"{len(steps)}/{len(runs)}", fmt_g(statistics.median(steps)) if steps else "-"]


if __name__ == "__main__":
    sys.exit(main())
