"""What the demo shows, measured: GRPO on the demo's tiny GPT-2 against two supervised controls.

For each seed, one supervised warm-up base (the demo's: subtraction, then addition and subtraction,
until held-out addition >= 0.45 and subtraction >= 0.6; cached under ``--out``), then from that base:

* ``GRPO``: TRL's ``GRPOTrainer`` with the demo's settings (exact-match reward on addition,
  16 prompts x 8 generations a step, AdamW lr 1e-4 constant, beta 0), ``--steps`` steps;
* ``SFT same steps``: supervised fine-tuning on the same addition prompts with the correct answers
  (16 prompts a step, loss on the answer and <eos>, AdamW lr 1e-4 constant, weight decay 0,
  gradient clipping 1.0: the Trainer defaults GRPO runs with), the same number of steps;
* ``SFT matched gain``: that SFT run stopped at the first step whose held-out addition gain reaches
  GRPO's final gain (a smaller, earlier update; the stop is chosen on the same held-out set, which is
  the point: equal gain on the items every number is measured on).

At each checkpoint every one of the 12 block matrices' update ΔW = W_t - W_0 (canonical ``(out, in)``,
float64) gets an exact SVD: rank-1 share ρ₁ = σ₁²/‖ΔW‖_F², stable rank 1/ρ₁, effective rank (Roy &
Vetterli), gap σ₁/σ₂, the power-law fit of its eigenvalues σ_i² (``fit_power_law``: α, tail, KS;
reliable = tail >= 10 and KS <= 0.1, the monitor's rule), and the top left singular vectors over time.
Each checkpoint is evaluated on held-out addition (rewarded) and subtraction (not rewarded) by greedy
exact match, and by the demo's probe: KL(π₀ ‖ π_t) per answer digit on held-out subtraction (exact
here: the probe's k = 32 covers the 17-token vocabulary). At each run's end, rank-k substitution
(``substituted``, exact SVD): every block ΔW replaced by its rank-k part, plainly truncated and
rescaled to ‖ΔW‖_F (AlphaRL), with the other parameters (embeddings, norms, biases) as trained or
reset to the base.

``python benchmarks/bench_science.py`` (seeds 0 1 2, about 7 min on 2 shared CPU cores with one torch
thread, half of it the warm-ups, which are cached for reruns); ``--quick`` for a smoke run (~30 s); ``--json PATH``
for every table and number. Needs ``trl`` and ``datasets``; ``powerlaw`` for the tail comparisons.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import fmt_g, parser, quiet, start
from torch import Tensor, nn

from spectral_monitor.demo.tasks import ANSWER_LEN, Task, accuracy, char_tokenizer, model, warm_up
from spectral_monitor.functional import effective_rank, fit_power_law, subspace_overlap
from spectral_monitor.layers import LayerSpec, layer_type, select_layers
from spectral_monitor.probes import Probe

# ============================================================================ settings
WARMUP_TARGET = (0.45, 0.6)  # held-out exact match: addition, subtraction (as `spectral-monitor demo`)
WARMUP_MAX = 1500  # supervised steps per warm-up phase at most
LR = 1e-4  # GRPO's learning rate, and the SFT controls'
PROMPTS_PER_STEP = 16  # GRPO: 16 prompts x 8 generations = 128 completions a step; SFT: 16 prompts
GENERATIONS = 8
N_TEST = 1000  # held-out pairs per task (the demo holds out 300; more here for a smaller standard error)
ALPHA_MIN_TAIL, ALPHA_MAX_KS = 10, 0.1  # the monitor's reliability rule for α
RANKS = (1, 2, 4, 8)  # substitution ranks
FULL_RANK = 10**6  # a rank above every matrix's: the unsubstituted blocks
TYPES = ("qkv", "o", "up", "down")
LOCK = 0.9  # a direction is "locked in" once its |cos| (or overlap) with the final one stays >= LOCK
LR_P = 0.1  # significance of the likelihood-ratio tail comparisons (Clauset et al. use 0.1)
RUNS = ("grpo", "sft", "sft_matched")
RUN_NAMES = {"grpo": "GRPO", "sft": "SFT same steps", "sft_matched": "SFT matched gain"}
CACHE_VERSION = 1  # bump when the warm-up changes


# ============================================================================ statistics
def spread(values: Sequence[float | None]) -> tuple[float, float, float]:
    """``(mean, min, max)`` of the finite values; NaNs when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, math.nan
    return statistics.fmean(xs), min(xs), max(xs)


def fmt_spread(values: Sequence[float | None], digits: int = 3, pct: bool = False) -> str:
    """``mean [min–max]`` over seeds (one value: just it; ``pct``: as percentages; none: ``-``)."""
    mean, lo, hi = spread(values)
    if not math.isfinite(mean):
        return "-"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: fmt_g(x, digits))
    n = sum(1 for v in values if v is not None and math.isfinite(v))
    return f(mean) if n == 1 else f"{f(mean)} [{f(lo)}–{f(hi)}]"


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error sqrt(p(1 - p)/n) of an accuracy p measured on n items."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired_se(after: Tensor, before: Tensor) -> float:
    """Standard error of ``mean(after) - mean(before)`` for per-item 0/1 outcomes ``(n,)`` on the same items:
    sd(d)/sqrt(n) of the differences d_i (population sd; items that agree add no variance)."""
    d = after.double() - before.double()
    return float(d.std(unbiased=False)) / math.sqrt(d.numel())


def lock_in_step(steps: Sequence[int], values: Sequence[float], threshold: float = LOCK) -> int | None:
    """The first step from which ``values`` (per step) stay >= ``threshold`` to the end; None if the last is below."""
    locked = None
    for step, v in zip(steps, values):
        if v >= threshold:
            locked = step if locked is None else locked
        else:
            locked = None
    return locked


def half_change_step(steps: Sequence[int], values: Sequence[float], start_value: float) -> int | None:
    """The first step at which ``values`` covered half its total change from ``start_value`` (the change
    at the last step); None when it did not change."""
    total = values[-1] - start_value
    if total == 0 or not math.isfinite(total):
        return None
    for step, v in zip(steps, values):
        if (v - start_value) / total >= 0.5:
            return step
    return None


# ============================================================================ exact spectra
@dataclass
class Spectrum:
    """Exact spectral facts of one update ΔW ``(m, n)``: ``u1`` its top left singular vector ``(m,)``,
    ``U4`` its top-4 left singular vectors ``(m, 4)``, ``eigs`` its eigenvalues σ_i² (descending)."""

    fro: float
    rho1: float
    stable_rank: float
    erank: float
    gap: float
    top4: float
    alpha: float
    alpha_tail: int
    alpha_ks: float
    alpha_reliable: bool
    alpha_xmin: float
    u1: Tensor = field(repr=False)
    U4: Tensor = field(repr=False)
    eigs: Tensor = field(repr=False)


def spectrum(delta: Tensor) -> Spectrum:
    """Exact SVD (float64) of ``delta`` ``(m, n)``: ρ₁, stable and effective rank, gap, the power-law fit of σ²."""
    U, S, _ = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    fro2 = float(S.square().sum())
    s1, s2 = float(S[0]), float(S[1]) if S.numel() > 1 else 0.0
    fit = fit_power_law(S.square(), min_tail=ALPHA_MIN_TAIL, max_ks=ALPHA_MAX_KS)
    return Spectrum(
        fro=math.sqrt(fro2),
        rho1=s1**2 / fro2 if fro2 > 0 else math.nan,
        stable_rank=fro2 / s1**2 if s1 > 0 else math.nan,
        erank=float(effective_rank(S)),
        gap=s1 / s2 if s2 > 0 else math.inf,
        top4=float(S[:4].square().sum()) / fro2 if fro2 > 0 else math.nan,
        alpha=float(fit.alpha),
        alpha_tail=int(fit.n_tail),
        alpha_ks=float(fit.ks),
        alpha_reliable=bool(fit.reliable),
        alpha_xmin=float(fit.xmin),
        u1=U[:, 0].clone(),
        U4=U[:, :4].clone(),
        eigs=S.square(),
    )


def tail_tests(sp: Spectrum) -> dict[str, float]:
    """Likelihood-ratio tests (Vuong, normalised; Clauset et al. 2009 §5) of the fitted power-law tail
    against an exponential and a lognormal on the same tail (x >= x_min), by the ``powerlaw`` package:
    ``R_<alt>`` > 0 favours the power law, ``p_<alt>`` is its significance; ``alpha_pl`` is powerlaw's own
    α for the same x_min (a check of :func:`fit_power_law`). Empty without a fit or without ``powerlaw``."""
    if not math.isfinite(sp.alpha_xmin):
        return {}
    try:
        import numpy as np
        import powerlaw
    except ImportError:
        return {}
    xmin = sp.eigs[sp.alpha_tail - 1]  # x_min as the float64 data value (the fit returns it in float32)
    x = (sp.eigs / xmin).numpy()  # scale-free: x_min = 1 (the ratios do not change)
    out: dict[str, float] = {}
    with warnings.catch_warnings(), np.errstate(all="ignore"), quiet():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(x[x > 0], xmin=1.0, verbose=False)
        out["alpha_pl"] = float(fit.power_law.alpha)
        for alt in ("exponential", "lognormal"):
            try:
                R, p = fit.distribution_compare("power_law", alt, normalized_ratio=True)
            except Exception:  # a failed alternative fit is an undecided comparison
                R, p = math.nan, math.nan
            out[f"R_{alt}"], out[f"p_{alt}"] = float(R), float(p)
    return out


# ============================================================================ the runs
@dataclass
class Checkpoint:
    """One checkpoint of a run: per-matrix spectra and the held-out evaluation (per-item hits ``(n,)``)."""

    step: int
    spectra: dict[str, Spectrum]
    add_hits: Tensor
    sub_hits: Tensor
    kl: float
    update_rel: float  # ‖ΔW‖_F / ‖W_0‖_F over the 12 matrices together

    @property
    def add_acc(self) -> float:
        return float(self.add_hits.double().mean())

    @property
    def sub_acc(self) -> float:
        return float(self.sub_hits.double().mean())


@dataclass
class Run:
    """One fine-tune from one seed's base; ``seconds``: its training wall time."""

    kind: str
    seed: int
    checkpoints: list[Checkpoint]
    seconds: float
    base: Checkpoint
    substitution: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def gain(self) -> float:
        return self.final.add_acc - self.base.add_acc


@torch.no_grad()
def exact_hits(net: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Per row ``(rows,)`` bool: is every labelled token (answer digits and <eos>) the model's argmax
    given the correct prefix? That is greedy decoding's exact match, in one teacher-forced forward.

    ``ids``, ``labels``: ``(rows, T)`` from :meth:`Task.encode` (labels -100 off the answer)."""
    training = net.training
    net.eval()
    logits = net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    target = labels[:, 1:]
    hit = (logits.argmax(-1) == target) | (target == -100)
    net.train(training)
    return hit.all(-1)


class World:
    """One seed's tasks, tokenizer, base, evaluation model and subtraction probe."""

    def __init__(self, seed: int, base_sd: dict[str, Tensor]) -> None:
        self.seed = seed
        self.tok = char_tokenizer()
        self.add, self.sub = Task("+", seed, n_test=N_TEST), Task("-", seed, n_test=N_TEST)
        self.add_test = self.add.encode(self.tok, self.add.test)
        self.sub_test = self.sub.encode(self.tok, self.sub.test)
        self.base_sd = base_sd
        self.net = model(seed)  # the evaluation model: every state dict is loaded into it
        self.net.load_state_dict(base_sd)
        self.specs: list[LayerSpec] = select_layers(self.net)
        self.base_w = {s.name: s.canonical(base_sd[s.param_name]).to(torch.float64) for s in self.specs}
        self.base_fro2 = sum(float(w.square().sum()) for w in self.base_w.values())
        # the demo's probe: KL(base ‖ model) per answer digit on held-out subtraction (k = 32 >= V: exact)
        self.probe = Probe.from_texts(
            self.tok, self.sub.pairs(self.sub.test), batch_size=len(self.sub.test), k=32, max_tokens_per_forward=2**16
        )
        self.probe.start(self.net)
        self.base = self.checkpoint(0, base_sd)
        # the oracle of the one-forward exact match: the demo's own greedy decoding, at the base
        self.greedy_check = (accuracy(self.net, self.tok, self.add, self.add.test), self.base.add_acc)

    def add_acc(self, m: nn.Module) -> float:
        return float(exact_hits(m, *self.add_test).double().mean())

    def checkpoint(self, step: int, sd: Mapping[str, Tensor]) -> Checkpoint:
        self.net.load_state_dict(sd)
        spectra, fro2 = {}, 0.0
        for s in self.specs:
            if step:
                spectra[s.name] = spectrum(s.canonical(sd[s.param_name]).to(torch.float64) - self.base_w[s.name])
                fro2 += spectra[s.name].fro ** 2
        kl = self.probe.measure(self.net).kl
        add, sub = exact_hits(self.net, *self.add_test), exact_hits(self.net, *self.sub_test)
        return Checkpoint(step, spectra, add, sub, kl, math.sqrt(fro2 / self.base_fro2))

    def substitution(self, sd: Mapping[str, Tensor]) -> dict[str, float]:
        """Held-out accuracies with every block ΔW replaced by its rank-k part (exact SVD), the other
        parameters as trained (``trained/...``) or reset to the base (``reverted/...``); ``full`` is the
        unsubstituted model, ``rank0`` the blocks at W_0."""
        from spectral_monitor import SpectralMonitor, substituted

        self.net.load_state_dict(self.base_sd)
        with quiet():
            monitor = SpectralMonitor(self.net)
            monitor.snapshot()
        self.net.load_state_dict(sd)
        out = {"trained/full/add_acc": self.add_acc(self.net)}
        reverted = {"revert_unmonitored": True, "base_state_dict": self.base_sd}
        jobs = [("trained", k, False, {}) for k in (0, *RANKS)] + [("trained", 1, True, {})]
        jobs += [("reverted", k, rescale, reverted) for k, rescale in ((1, False), (1, True), (FULL_RANK, False))]
        for mode, k, rescale, extra in jobs:
            with substituted(monitor, k, exact=True, rescale=rescale, **extra) as info:
                tag = f"{mode}/{'full' if k == FULL_RANK else f'rank{k}'}{'_rescaled' if rescale else ''}"
                out[f"{tag}/add_acc"] = self.add_acc(self.net)
                if mode == "trained" and k == 1 and not rescale:
                    out[f"{tag}/sub_acc"] = float(exact_hits(self.net, *self.sub_test).double().mean())
                    out[f"{tag}/energy_share"] = info.energy_share
        return out


def base_model(seed: int, out: Path, quick: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The supervised warm-up base for ``seed`` (the demo's recipe), cached under ``out``."""
    target, most = ((0.0, 0.0), 20) if quick else (WARMUP_TARGET, WARMUP_MAX)
    key = hashlib.sha256(repr((CACHE_VERSION, seed, target, most, N_TEST)).encode()).hexdigest()[:12]
    path = out / f"base_seed{seed}_{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state_dict"], {**saved["info"], "cached": True}
    tok = char_tokenizer()
    add, sub = Task("+", seed, n_test=N_TEST), Task("-", seed, n_test=N_TEST)
    net = model(seed)
    t0 = time.perf_counter()
    # as the demo: subtraction first, then both until addition is good enough for GRPO to find rewards
    steps = warm_up(net, tok, [sub], until=sub, target=target[1], max_steps=most, seed=seed)
    steps += warm_up(net, tok, [add, sub], until=add, target=target[0], max_steps=most, seed=seed + 1)
    info = {"steps": steps, "seconds": time.perf_counter() - t0}
    sd = snapshot(net)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "info": info}, path)
    return sd, {**info, "cached": False}


def snapshot(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_grpo(
    world: World, steps: int, checkpoints: Sequence[int], out: Path
) -> tuple[dict[int, dict[str, Tensor]], float, list[tuple[int, float]]]:
    """GRPO with the demo's settings from the base: the state dicts at ``checkpoints``, the wall time
    and the logged ``(step, mean batch reward)``."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    net = model(world.seed)
    net.load_state_dict(world.base_sd)
    saved: dict[int, dict[str, Tensor]] = {}
    rewards: list[tuple[int, float]] = []
    wanted = set(checkpoints)

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in wanted:
                saved[state.global_step] = snapshot(net)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append((state.global_step, float(logs["reward"])))

    def exact_match(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    add = world.add
    prompts = Dataset.from_list([{"prompt": add.prompt(a, b), "answer": add.answer(a, b)} for a, b in add.train])
    args = GRPOConfig(
        output_dir=str(out / f"grpo_seed{world.seed}"),
        max_steps=steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=ANSWER_LEN,
        temperature=1.0,
        top_k=0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=0.0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_dropout=True,
        disable_tqdm=True,
        seed=world.seed,
        data_seed=world.seed,
    )
    trainer = GRPOTrainer(
        model=net,
        reward_funcs=exact_match,
        args=args,
        train_dataset=prompts,
        processing_class=world.tok,
        callbacks=[Keep()],
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    return saved, time.perf_counter() - t0, rewards


def train_sft(
    world: World, steps: int, checkpoints: Sequence[int], target_gain: float, max_steps: int
) -> tuple[dict[int, dict[str, Tensor]], float, int | None]:
    """Supervised fine-tuning on the addition training prompts with their answers, from the base.

    Runs ``steps`` steps, longer (up to ``max_steps``) only until the held-out addition gain (checked
    after every step until then) reaches ``target_gain``. Returns the state dicts at ``checkpoints`` and
    at that matched step, the training wall time (without the checks) and the matched step (None: never).
    """
    net = model(world.seed)
    net.load_state_dict(world.base_sd)
    ids, labels = world.add.encode(world.tok, world.add.train)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(10_000 + world.seed)
    saved: dict[int, dict[str, Tensor]] = {}
    matched, seconds, step = None, 0.0, 0
    while step < steps or (matched is None and step < max_steps):
        step += 1
        t0 = time.perf_counter()
        net.train()
        pick = torch.randint(len(ids), (PROMPTS_PER_STEP,), generator=gen)
        batch = ids[pick]
        loss = net(input_ids=batch, attention_mask=torch.ones_like(batch), labels=labels[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        seconds += time.perf_counter() - t0
        if step in checkpoints:
            saved[step] = snapshot(net)
        if matched is None and world.add_acc(net) - world.base.add_acc >= target_gain:
            matched = step
            saved[step] = snapshot(net)
    return saved, seconds, matched


def run_seed(seed: int, args: Any, out: Path, checkpoints: Sequence[int], log: Callable[[str], None]) -> list[Run]:
    """The base, GRPO and the SFT controls of one seed, measured."""
    t0 = time.perf_counter()
    base_sd, info = base_model(seed, out, args.quick)
    world = World(seed, base_sd)
    b = world.base
    took = "cached" if info["cached"] else f"{info['seconds']:.0f} s"
    log(
        f"seed {seed}: base after {info['steps']} warm-up steps ({took}): held-out addition {b.add_acc:.3f} "
        f"(greedy decoding: {world.greedy_check[0]:.3f}), subtraction {b.sub_acc:.3f}"
    )
    timing = {"warmup_s": 0.0 if info["cached"] else info["seconds"]}

    def measured(kind: str, sds: Mapping[int, dict[str, Tensor]], steps: Sequence[int], seconds: float) -> Run:
        t = time.perf_counter()
        run = Run(kind, seed, [world.checkpoint(s, sds[s]) for s in steps], seconds, b)
        run.substitution = world.substitution(sds[steps[-1]])
        timing["measure_s"] = timing.get("measure_s", 0.0) + time.perf_counter() - t
        return run

    grpo_sd, timing["grpo_s"], rewards = train_grpo(world, args.steps, checkpoints, out)
    grpo = measured("grpo", grpo_sd, checkpoints, timing["grpo_s"])
    grpo.extra["rewards"] = rewards
    log(
        f"seed {seed}: GRPO {args.steps} steps in {timing['grpo_s']:.0f} s: addition {b.add_acc:.3f} -> "
        f"{grpo.final.add_acc:.3f}, subtraction {b.sub_acc:.3f} -> {grpo.final.sub_acc:.3f}"
    )
    target = max(grpo.gain, 1 / N_TEST)  # at least one more item right
    sft_sd, timing["sft_s"], matched = train_sft(world, args.steps, checkpoints, target, max_steps=4 * args.steps)
    runs = [grpo, measured("sft", sft_sd, checkpoints, timing["sft_s"])]
    if matched is not None:
        runs.append(measured("sft_matched", sft_sd, sorted({s for s in checkpoints if s < matched} | {matched}), 0.0))
        runs[-1].extra["matched_step"] = matched
    log(
        f"seed {seed}: SFT {args.steps} steps in {timing['sft_s']:.0f} s: addition {runs[1].final.add_acc:.3f}, "
        f"subtraction {runs[1].final.sub_acc:.3f}; GRPO's gain {grpo.gain:+.3f} reached at SFT step {matched} "
        f"({time.perf_counter() - t0:.0f} s for the seed)"
    )
    timing["seed_s"] = time.perf_counter() - t0
    for r in runs:
        r.extra.update(base_info=info, greedy_check=world.greedy_check, timing=timing)
    return runs


# ============================================================================ summaries
def mean_over(cp: Checkpoint, attr: str, typ: str | None = None) -> float:
    """Mean of a spectral attribute over the 12 matrices (or those of one type)."""
    vals = [getattr(s, attr) for name, s in cp.spectra.items() if typ is None or layer_type(name) == typ]
    return statistics.fmean(vals) if vals else math.nan


def median_over(cp: Checkpoint, attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in cp.spectra.values())


def by_kind(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {k: [] for k in RUNS}
    for r in runs:
        out[r.kind].append(r)
    return out


def row(label: str, groups: dict[str, list[Run]], get: Callable[[Run], float], **fmt: Any) -> list[str]:
    """A table row: ``label``, then ``get(run)`` as mean [min–max] over seeds for each kind of run."""
    return [label, *(fmt_spread([get(r) for r in groups[k]], **fmt) for k in RUNS)]


def share(r: Run, key: str) -> float:
    """Share of the addition gain a substituted model keeps: (acc - base) / (full - base)."""
    full = r.substitution["trained/full/add_acc"]
    base = r.base.add_acc
    return (r.substitution[key] - base) / (full - base) if full != base else math.nan


def with_final(run: Run, how: str) -> dict[str, list[float]]:
    """Per matrix, at each checkpoint: ``"u1"`` |cos(u₁(t), u₁(final))|, ``"U4"`` the overlap
    ‖U₄(t)ᵀU₄(final)‖²/4 of the top-4 left subspaces."""
    final = run.final.spectra
    if how == "u1":
        return {n: [float(abs(cp.spectra[n].u1 @ final[n].u1)) for cp in run.checkpoints] for n in final}
    return {n: [float(subspace_overlap(cp.spectra[n].U4, final[n].U4)) for cp in run.checkpoints] for n in final}


def consecutive(run: Run) -> list[float]:
    """Mean over matrices of |cos(u₁(t), u₁(previous checkpoint))|, from the second checkpoint on."""
    cps = run.checkpoints
    return [
        statistics.fmean(float(abs(b.spectra[n].u1 @ a.spectra[n].u1)) for n in b.spectra)
        for a, b in itertools.pairwise(cps)
    ]


def lock_in(run: Run, how: str) -> float:
    """Median over matrices of the lock-in step: the first checkpoint before the last from which the
    cosine (or overlap) with the final direction stays >= LOCK; the last step when none does."""
    steps = [cp.step for cp in run.checkpoints]
    found = [lock_in_step(steps[:-1], v[:-1]) for v in with_final(run, how).values()]  # the last is 1 by definition
    return float(statistics.median(s if s is not None else steps[-1] for s in found))


def null_spectra(shapes: Sequence[tuple[int, int]], repeats: int, seed: int) -> list[Spectrum]:
    """Spectra of i.i.d. Gaussian matrices of the given shapes: no structure, no power-law tail."""
    gen = torch.Generator().manual_seed(seed)
    return [spectrum(torch.randn(m, n, generator=gen, dtype=torch.float64)) for _ in range(repeats) for m, n in shapes]


def tail_verdicts(tests: Sequence[Mapping[str, float]], alt: str) -> tuple[int, int, int]:
    """How many comparisons favour the power law, the alternative, neither (p >= LR_P or no fit)."""
    pl = sum(1 for t in tests if t.get(f"p_{alt}", 1.0) < LR_P and t[f"R_{alt}"] > 0)
    other = sum(1 for t in tests if t.get(f"p_{alt}", 1.0) < LR_P and t[f"R_{alt}"] < 0)
    return pl, other, len(tests) - pl - other


def report(res: Any, runs: list[Run], args: Any, seconds: float) -> None:
    groups = by_kind(runs)
    g, sft = groups["grpo"], groups["sft"]
    kinds = [RUN_NAMES[k] for k in RUNS]
    n = N_TEST
    p_add = statistics.fmean(r.base.add_acc for r in g)
    res.data["setup"] = {"seeds": sorted({r.seed for r in runs}), "steps": args.steps, "n_test": n, "seconds": seconds}

    # -- accuracies and forgetting at the end
    def sub_z(r: Run) -> float:
        se = paired_se(r.final.sub_hits, r.base.sub_hits)
        return (r.final.sub_acc - r.base.sub_acc) / se if se > 0 else math.nan

    res.table(
        "accuracies (held-out greedy exact match) and drift from the base; mean [min–max] over seeds",
        ["", *kinds],
        [
            row("steps", groups, lambda r: r.final.step),
            row("addition at the base (rewarded task)", groups, lambda r: r.base.add_acc),
            row("addition after", groups, lambda r: r.final.add_acc),
            row("addition gain", groups, lambda r: r.gain),
            row("subtraction at the base (not rewarded)", groups, lambda r: r.base.sub_acc),
            row("subtraction after", groups, lambda r: r.final.sub_acc),
            row("subtraction change", groups, lambda r: r.final.sub_acc - r.base.sub_acc),
            row("… in paired standard errors", groups, sub_z, digits=2),
            row("KL(base ‖ model) per digit, held-out subtraction (nats)", groups, lambda r: r.final.kl),
            row("‖ΔW‖_F / ‖W_0‖_F (12 block matrices)", groups, lambda r: r.final.update_rel),
        ],
        note=f"   {n} held-out items per task: one accuracy has a standard error sqrt(p(1-p)/n) of "
        f"{accuracy_se(p_add, n):.3f} at p = {p_add:.2f} ({accuracy_se(0.5, n):.3f} at most); a change from the "
        "base is paired on the same items: its standard error comes from the items that flipped.",
    )

    # -- claim 1: rank-1 concentration
    null = null_spectra([s.shape for s in select_layers(model(0))], 1 if args.quick else 3, seed=1234)
    res.table(
        "claim 1: does the update concentrate in a rank-1 direction? (exact SVD, each run's last step)",
        ["", *kinds],
        [
            row("ρ₁ = σ₁²/‖ΔW‖², mean over the 12 matrices", groups, lambda r: mean_over(r.final, "rho1")),
            *(row(f"ρ₁ mean, {t} (3 matrices)", groups, lambda r, t=t: mean_over(r.final, "rho1", t)) for t in TYPES),
            row("ρ₁ min over the 12", groups, lambda r: min(s.rho1 for s in r.final.spectra.values())),
            row("ρ₁ max over the 12", groups, lambda r: max(s.rho1 for s in r.final.spectra.values())),
            row("top-4 energy share, mean", groups, lambda r: mean_over(r.final, "top4")),
            row("stable rank ‖ΔW‖²/σ₁², mean", groups, lambda r: mean_over(r.final, "stable_rank")),
            row("effective rank (Roy–Vetterli; of 96), mean", groups, lambda r: mean_over(r.final, "erank")),
            row("gap σ₁/σ₂, median", groups, lambda r: median_over(r.final, "gap")),
        ],
        note="   scale: i.i.d. Gaussian matrices of the same shapes have ρ₁ "
        f"{statistics.fmean(s.rho1 for s in null):.3f} and effective rank "
        f"{statistics.fmean(s.erank for s in null):.0f} (mean); a rank-1 matrix has 1 and 1.",
    )
    grid = [cp.step for cp in g[0].checkpoints]

    def at(rs: Sequence[Run], i: int, get: Callable[[Checkpoint, Run], float], **fmt: Any) -> str:
        return fmt_spread([get(r.checkpoints[i], r) for r in rs], **fmt)

    res.table(
        "claim 1 over time: ρ₁ (mean over the 12 matrices), addition gain and ‖ΔW‖/‖W_0‖",
        ["step", "ρ₁ GRPO", "ρ₁ SFT", "gain GRPO", "gain SFT", "‖ΔW‖/‖W_0‖ GRPO", "‖ΔW‖/‖W_0‖ SFT"],
        [
            [
                str(step),
                *(at(rs, i, lambda c, r: mean_over(c, "rho1")) for rs in (g, sft)),
                *(at(rs, i, lambda c, r: c.add_acc - r.base.add_acc) for rs in (g, sft)),
                *(at(rs, i, lambda c, r: c.update_rel, digits=2) for rs in (g, sft)),
            ]
            for i, step in enumerate(grid)
        ],
        note="   SFT matched gain = the SFT run stopped at step "
        + ", ".join(f"{r.extra['matched_step']} (seed {r.seed})" for r in groups["sft_matched"])
        + ": its values are the SFT column's at that step.",
    )

    # -- claim 2: substitution
    keys = [
        ("rank 0: blocks at W_0, rest as trained", "trained/rank0/add_acc"),
        *((f"rank {k}", f"trained/rank{k}/add_acc") for k in RANKS),
        ("rank 1, rescaled to ‖ΔW‖_F (AlphaRL)", "trained/rank1_rescaled/add_acc"),
        ("rank 1, rest reset to the base", "reverted/rank1/add_acc"),
        ("rank 1 rescaled, rest reset to the base", "reverted/rank1_rescaled/add_acc"),
        ("full blocks, rest reset to the base", "reverted/full/add_acc"),
    ]
    se_share = [math.sqrt(2) * accuracy_se(0.5, n) / r.gain for r in g if r.gain > 0]
    res.table(
        "claim 2: rank-k substitution W_0 + ΔW_k in every block matrix (each run's last step): share of the "
        "addition gain kept",
        ["", *kinds],
        [
            row("addition: base → full update", groups, lambda r: r.final.add_acc),
            *(row(label, groups, lambda r, key=key: share(r, key), pct=True) for label, key in keys),
            row("addition, rank 1 (accuracy)", groups, lambda r: r.substitution["trained/rank1/add_acc"]),
            row(
                "rank-1 energy share of all blocks' ΔW", groups, lambda r: r.substitution["trained/rank1/energy_share"]
            ),
            row("subtraction, full update", groups, lambda r: r.final.sub_acc),
            row("subtraction, rank 1", groups, lambda r: r.substitution["trained/rank1/sub_acc"]),
        ],
        note="   share = (acc_substituted − acc_base) / (acc_full − acc_base), base = the warm-up model. 'Rest' = "
        "embeddings, layer norms, biases (not block matrices): 'as trained' is the monitor's default. A share has a "
        f"standard error of up to {fmt_spread(se_share, 2)} here (two accuracies' errors over GRPO's gain).",
    )

    # -- claim 3: heavy tails
    tests = {k: [[tail_tests(s) for s in r.final.spectra.values()] for r in groups[k]] for k in RUNS}
    null_tests = [tail_tests(s) for s in null]

    def verdict(k: str, alt: str) -> str:
        counts = [tail_verdicts(t, alt) for t in tests[k]]
        if not counts or not any(t for ts in tests[k] for t in ts):
            return "-"
        return " / ".join(fmt_spread([c[i] for c in counts], 2) for i in range(3))

    def null_cell(get: Callable[[Spectrum], float], digits: int = 3) -> str:
        return fmt_g(statistics.median(get(s) for s in null), digits)

    res.table(
        "claim 3: heavy-tailed? continuous power-law fit of ΔW's 96 eigenvalues σ_i² (exact), each run's last step",
        ["", *kinds, "null: Gaussian"],
        [
            [
                *row("α median over the 12", groups, lambda r: median_over(r.final, "alpha")),
                null_cell(lambda s: s.alpha),
            ],
            [
                *row("tail size n_tail (values ≥ x_min), median", groups, lambda r: median_over(r.final, "alpha_tail")),
                null_cell(lambda s: s.alpha_tail),
            ],
            [
                *row("KS distance D, median", groups, lambda r: median_over(r.final, "alpha_ks")),
                null_cell(lambda s: s.alpha_ks),
            ],
            [
                *row(
                    "reliable (tail ≥ 10, D ≤ 0.1), of 12",
                    groups,
                    lambda r: sum(s.alpha_reliable for s in r.final.spectra.values()),
                ),
                f"{sum(s.alpha_reliable for s in null)}/{len(null)}",
            ],
            [
                "vs exponential: power law / exponential / undecided, of 12",
                *(verdict(k, "exponential") for k in RUNS),
                " / ".join(str(c) for c in tail_verdicts(null_tests, "exponential")),
            ],
            [
                "vs lognormal: power law / lognormal / undecided, of 12",
                *(verdict(k, "lognormal") for k in RUNS),
                " / ".join(str(c) for c in tail_verdicts(null_tests, "lognormal")),
            ],
        ],
        note="   likelihood-ratio tests (normalised Vuong, powerlaw package) on each fitted tail, decided at "
        f"p < {LR_P}. "
        "ΔW is 96 × 96 to 384 × 96 (96 eigenvalues each); null: i.i.d. Gaussian matrices of the same shapes "
        f"({len(null)}), whose spectrum has no power-law tail.",
    )
    checks = [
        abs(t["alpha_pl"] - sp.alpha)
        for k in RUNS
        for r, ts in zip(groups[k], tests[k])
        for sp, t in zip(r.final.spectra.values(), ts)
        if "alpha_pl" in t
    ]
    res.data["alpha_vs_powerlaw_max_abs_diff"] = max(checks) if checks else None
    res.data["tail_tests"] = tests

    # -- claim 4: u1 over time
    def mean_with_final(r: Run, how: str, i: int) -> float:
        return statistics.fmean(v[i] for v in with_final(r, how).values())

    res.table(
        "claim 4: the top left singular vectors over time (mean over the 12 matrices)",
        [
            "step",
            "|cos(u₁, u₁ end)| GRPO",
            "… SFT",
            "top-4 overlap with end GRPO",
            "… SFT",
            "|cos(u₁, u₁ previous)| GRPO",
            "… SFT",
            "gap σ₁/σ₂ GRPO (median)",
            "… SFT",
        ],
        [
            [
                str(step),
                *(fmt_spread([mean_with_final(r, "u1", i) for r in rs]) for rs in (g, sft)),
                *(fmt_spread([mean_with_final(r, "U4", i) for r in rs]) for rs in (g, sft)),
                *(fmt_spread([consecutive(r)[i - 1] if i else math.nan for r in rs]) for rs in (g, sft)),
                *(at(rs, i, lambda c, r: median_over(c, "gap")) for rs in (g, sft)),
            ]
            for i, step in enumerate(grid)
        ],
        note="   top-4 overlap = ‖U₄(t)ᵀ U₄(end)‖_F² / 4 (1: the same subspace); it is the robust companion of u₁, "
        "which is not well defined when σ₁/σ₂ is near 1.",
    )
    cross_u1 = [
        statistics.fmean(float(abs(a.final.spectra[m].u1 @ b.final.spectra[m].u1)) for m in a.final.spectra)
        for a, b in zip(g, sft)
    ]
    cross_U4 = [
        statistics.fmean(float(subspace_overlap(a.final.spectra[m].U4, b.final.spectra[m].U4)) for m in a.final.spectra)
        for a, b in zip(g, sft)
    ]
    res.table(
        "claim 4: when do the directions lock in?",
        ["", *kinds],
        [
            row(
                f"u₁ lock-in step: |cos(u₁, u₁ end)| ≥ {LOCK} from then on (median over the 12)",
                groups,
                lambda r: lock_in(r, "u1"),
            ),
            row(f"top-4 lock-in step: overlap with the end ≥ {LOCK} from then on", groups, lambda r: lock_in(r, "U4")),
            ["same direction as SFT? |cos(u₁ GRPO, u₁ SFT)| at the end, mean", fmt_spread(cross_u1), "", ""],
            ["top-4 overlap GRPO vs SFT at the end, mean", fmt_spread(cross_U4), "", ""],
        ],
        note=f"   chance level in 96 dimensions: |cos| ≈ {math.sqrt(2 / (math.pi * 96)):.2f} for two random unit "
        f"vectors, overlap ≈ {4 / 96:.2f} for two random 4-dimensional subspaces.",
    )

    # -- forgetting over time and which signal moved first
    res.table(
        "forgetting: held-out subtraction (not rewarded) over time",
        ["step", "subtraction change GRPO", "… SFT", "KL to base GRPO", "… SFT"],
        [
            [
                str(step),
                *(at(rs, i, lambda c, r: c.sub_acc - r.base.sub_acc) for rs in (g, sft)),
                *(at(rs, i, lambda c, r: c.kl) for rs in (g, sft)),
            ]
            for i, step in enumerate(grid)
        ],
    )
    rows = []
    for r in [*g, *sft]:
        steps = [cp.step for cp in r.checkpoints]
        z = [
            (cp.sub_acc - r.base.sub_acc) / max(paired_se(cp.sub_hits, r.base.sub_hits), 1e-12) for cp in r.checkpoints
        ]
        down = lock_in_step(steps, [-v for v in z], threshold=2.0)  # from then on down by > 2 paired SE
        at_down = r.checkpoints[steps.index(down)] if down is not None else None
        signals = {
            "subtraction": ([cp.sub_acc for cp in r.checkpoints], r.base.sub_acc),
            "KL": ([cp.kl for cp in r.checkpoints], 0.0),
            "addition": ([cp.add_acc for cp in r.checkpoints], r.base.add_acc),
            "‖ΔW‖": ([cp.update_rel for cp in r.checkpoints], 0.0),
        }
        halves = [half_change_step(steps, v, v0) for v, v0 in signals.values()]
        then = (
            [str(down), f"{at_down.kl:.3f}", f"{at_down.add_acc - r.base.add_acc:+.3f}", f"{at_down.update_rel:.3f}"]
            if at_down
            else ["never", "-", "-", "-"]
        )
        rows.append(
            [
                f"{RUN_NAMES[r.kind]}, seed {r.seed}",
                f"{r.final.sub_acc - r.base.sub_acc:+.3f} ({z[-1]:+.1f} SE)",
                *then,
                *(str(h) if h is not None else "-" for h in halves),
            ]
        )
    res.table(
        "forgetting: when did subtraction fall, and which signal moved first?",
        [
            "run",
            "subtraction change at the end",
            "down > 2 paired SE from step",
            "KL then",
            "addition gain then",
            "‖ΔW‖/‖W_0‖ then",
            *(f"½-way step: {k}" for k in signals),
        ],
        rows,
        note="   ½-way step: the first checkpoint at which the signal had covered half of its change from the base "
        "to the last step (smaller = moved earlier; '-': no change).",
    )

    # -- runtime
    per_seed = {r.seed: r.extra["timing"] for r in g}
    res.table(
        "runtime (wall, this machine)",
        ["seed", "warm-up (0: cached)", "GRPO training", "SFT training", "measurements", "whole seed"],
        [
            [str(s), *(f"{t.get(k, 0.0):.0f} s" for k in ("warmup_s", "grpo_s", "sft_s", "measure_s", "seed_s"))]
            for s, t in per_seed.items()
        ],
    )


def run_json(r: Run) -> dict[str, Any]:
    """A run's numbers (no vectors, no per-item hits) for the JSON file."""

    def cp_json(cp: Checkpoint) -> dict[str, Any]:
        layers = {n: {k: v for k, v in vars(s).items() if k not in ("u1", "U4", "eigs")} for n, s in cp.spectra.items()}
        return {
            "step": cp.step,
            "add_acc": cp.add_acc,
            "sub_acc": cp.sub_acc,
            "kl": cp.kl,
            "update_rel": cp.update_rel,
            "layers": layers,
        }

    return {
        "kind": r.kind,
        "seed": r.seed,
        "seconds": r.seconds,
        "base": cp_json(r.base),
        "checkpoints": [cp_json(cp) for cp in r.checkpoints],
        "substitution": r.substitution,
        "extra": r.extra,
    }


def main() -> int:
    p = parser("GRPO vs supervised controls on the demo's tiny GPT-2: rank-1 share, substitution, α, u₁ lock-in")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="GRPO and SFT steps (default 150, the demo's; quick 4)")
    p.add_argument("--out", default="spectral_runs/bench_science", help="cached bases and the trainers' output")
    args = p.parse_args()
    if args.threads is None:
        torch.set_num_threads(1)  # one thread is fastest for a model this small
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (4 if args.quick else 150)
    checkpoints = sorted({s for s in (1, 2, 5, 10, 20, 30, 50, 75, 100, 125) if s < args.steps} | {args.steps})
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notices
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    res = start("bench_science: GRPO vs SFT controls on the demo's tiny GPT-2 (exact SVDs of ΔW)", args)
    print(
        f"   seeds {seeds}, {args.steps} steps, checkpoints {checkpoints}, {N_TEST} held-out items per task", flush=True
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    runs: list[Run] = []
    for seed in seeds:
        runs += run_seed(seed, args, out, checkpoints, lambda s: print(f"   {s}", flush=True))
        res.data["runs"] = [run_json(r) for r in runs]
        res.save()
    seconds = time.perf_counter() - t0
    report(res, runs, args, seconds)
    print(f"\n   total {seconds:.0f} s", flush=True)
    res.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
