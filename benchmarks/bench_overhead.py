"""Training-time overhead of SpectralMonitorCallback() in a Hugging Face Trainer run.

A small GPT-2 from config (n_layer=4, n_embd=256, n_head=4, vocab 8192, 64-token sequences,
batch 8, no dropout; its 16 block matrices are monitored) trains for 200 optimizer steps on
generated tokens (``report_to="none"``, no checkpoints, CPU), without and with
``spectral_monitor.integrations.hf.SpectralMonitorCallback()`` at its DEFAULT schedule (every 25
steps plus the first and the last: 9 measurements in 200 steps; base snapshot at train start;
per-layer metrics to the JSONL sink in output_dir, aggregates through ``Trainer.log``).

Runs are interleaved (off, on, off, on, ...; ``--pairs`` pairs) so slow drifts of a shared
machine hit both alike (default 2 pairs). Reported:

* wall time of ``trainer.train()`` per run, and the overhead ratio (on - off) / off from the
  medians -- the end-to-end number, but noisy on a shared machine;
* the callback's own time (every callback event timed from outside, by wrapping its methods) as a
  share of the training time: the same overhead measured directly, without the run-to-run noise;
* step time (median interval between ``on_step_end`` events of the runs without the monitor),
  the same median with the monitor on (it leaves out the few intervals that hold a measurement,
  so it shows whether the steps in between got slower), the median ``measure_s`` of the monitor,
  and one measurement's cost in training steps;
* a per-phase profile of one extra measurement of the trained model after the last run.

Run: ``python benchmarks/bench_overhead.py [--quick] [--threads N] [--seq N] [--json out.json]``
(``--quick``: 50 steps, one pair; ``--seq N``: N-token sequences instead of 64, the same model and
measurements against a longer training step.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import tempfile
import time

import torch
from _common import PhaseProfile, base_parser, fmt_s, loadavg, machine_info, print_machine, print_table, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ, BATCH, VOCAB = 64, 8, 8192


class TokenDataset(torch.utils.data.Dataset):
    """Generated token sequences (a seeded Markov-ish stream so the loss can fall)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        steps = torch.randint(1, 8, (n, SEQ - 1), generator=g)
        self.ids = torch.cat([start, start + steps.cumsum(1)], dim=1) % VOCAB

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def timed_callback(cb):
    """Wrap every event method of ``cb`` with a timer; returns the list of (event, seconds)."""
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


def make_step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.train_s = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.train_s = time.perf_counter() - self.t0

    return StepClock()


def one_run(monitor: bool, steps: int, data: TokenDataset, profile: bool = False) -> dict:
    from transformers import Trainer, TrainingArguments

    from spectral_monitor.integrations.hf import SpectralMonitorCallback

    model = build_model()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=5e-4,
            warmup_steps=0,
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        clock = make_step_clock()
        callbacks = [clock]
        cb = events = None
        if monitor:
            cb = SpectralMonitorCallback()
            events = timed_callback(cb)
            callbacks.append(cb)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
        out_row = {
            "monitor": monitor,
            "train_s": wall,
            "step_intervals": list(b - a for a, b in zip(clock.ends, clock.ends[1:])),
        }
        if monitor:
            run = cb.run
            out_row["callback_s"] = sum(dt for _, dt in events)
            by_event: dict[str, float] = {}
            for name, dt in events:
                by_event[name] = by_event.get(name, 0.0) + dt
            out_row["callback_by_event"] = by_event
            out_row["measurements"] = run.monitor.measurements
            out_row["layers"] = len(run.monitor.specs)
            if profile:  # one extra measurement of the trained model, timed per phase
                with PhaseProfile("cpu") as prof:
                    rep = run.monitor.measure(steps + 1)
                out_row["profile"] = (prof, rep.elapsed_s)
    return out_row


def main() -> None:
    global SEQ
    p = base_parser(__doc__.splitlines()[0], device=False)
    p.add_argument("--pairs", type=int, default=None, help="interleaved (off, on) pairs (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; quick 50)")
    p.add_argument("--seq", type=int, default=SEQ, help=f"tokens per sequence (default {SEQ})")
    args = p.parse_args()
    SEQ = args.seq
    info = machine_info("cpu")
    print_machine(info, "bench_overhead: HF Trainer with and without SpectralMonitorCallback()")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    steps = args.steps or (50 if args.quick else 200)
    pairs = args.pairs or (1 if args.quick else 2)
    data = TokenDataset(steps * BATCH)

    # measure_s of every measurement: read from the monitor's reports through a sink-less hook
    from spectral_monitor.engine import SpectralMonitor

    measure_times: list[float] = []
    orig_measure = SpectralMonitor.measure

    def measure(self, step):
        rep = orig_measure(self, step)
        measure_times.append(rep.elapsed_s)
        return rep

    SpectralMonitor.measure = measure
    one_run(False, 5, data)  # warm-up: imports, first-call kernels
    runs = []
    for i in range(pairs):
        for monitor in (False, True):
            r = one_run(monitor, steps, data, profile=monitor and i == pairs - 1)
            runs.append(r)
            extra = f", callback {fmt_s(r['callback_s'])} ({r['measurements']} measurements)" if monitor else ""
            print(
                f"   pair {i + 1}, monitor {'on ' if monitor else 'off'}: train {fmt_s(r['train_s'])}{extra} "
                f"(load {loadavg()})",
                flush=True,
            )
    SpectralMonitor.measure = orig_measure

    off = [r["train_s"] for r in runs if not r["monitor"]]
    on = [r["train_s"] for r in runs if r["monitor"]]
    cb_s = [r["callback_s"] for r in runs if r["monitor"]]
    step_s = statistics.median([dt for r in runs if not r["monitor"] for dt in r["step_intervals"]])
    # with the monitor on, the median leaves out the few intervals that hold a measurement: it shows
    # whether the steps in between got slower (cache pollution, memory pressure, per-step hooks)
    step_on_s = statistics.median([dt for r in runs if r["monitor"] for dt in r["step_intervals"]])
    med_off, med_on = statistics.median(off), statistics.median(on)
    wall_overhead = (med_on - med_off) / med_off
    direct = statistics.median(c / t for c, t in zip(cb_s, off))
    measure_med = statistics.median(measure_times)
    on_run = next(r for r in runs if r["monitor"])
    n_meas = on_run["measurements"]
    print(
        f"\n-- {steps} optimizer steps, GPT-2 (4 x 256, vocab {VOCAB}), batch {BATCH} x {SEQ} tokens; "
        f"{on_run['layers']} monitored layers; {n_meas} measurements per run"
    )
    print_table(
        ["quantity", "value"],
        [
            ["train() wall, monitor off (runs)", ", ".join(fmt_s(x) for x in off)],
            ["train() wall, monitor on (runs)", ", ".join(fmt_s(x) for x in on)],
            ["overhead from wall medians (on - off) / off", f"{100 * wall_overhead:+.2f}%"],
            ["callback's own time per run (all events)", ", ".join(fmt_s(x) for x in cb_s)],
            ["overhead measured directly: callback time / train time off", f"{100 * direct:.2f}%"],
            ["median step time (monitor off)", fmt_s(step_s)],
            [
                "median step time (monitor on), change vs off",
                f"{fmt_s(step_on_s)}, {100 * (step_on_s / step_s - 1):+.2f}%",
            ],
            ["median measure() time", fmt_s(measure_med)],
            ["one measurement in training steps", f"{measure_med / step_s:.2f}"],
            [
                "callback time by event (last run)",
                ", ".join(f"{k}: {fmt_s(v)}" for k, v in sorted(runs[-1]["callback_by_event"].items()) if v > 1e-4),
            ],
        ],
    )
    prof_row = next((r for r in runs if "profile" in r), None)
    if prof_row is not None:
        prof, measure_s = prof_row.pop("profile")
        print("\n-- one extra measurement of the trained model after the last run, per phase (wall)")
        print_table(["phase", "time", "share", "calls"], prof.table(measure_s))
        profile_json = {"measure_s": measure_s, "phases": prof.totals, "calls": prof.calls}
    else:
        profile_json = None
    print(
        f"   target: overhead <= 1% at the default schedule -> {'MET' if direct <= 0.01 else 'MISSED'} "
        f"(direct measure); wall-median difference {100 * wall_overhead:+.2f}%"
    )
    info["loadavg_1m_at_end"] = loadavg()
    print(f"   load average (1 min) at end: {info['loadavg_1m_at_end']}")
    write_json(
        args.json,
        {
            "machine": info,
            "args": vars(args),
            "steps": steps,
            "train_off_s": off,
            "train_on_s": on,
            "callback_s": cb_s,
            "wall_overhead": wall_overhead,
            "direct_overhead": direct,
            "step_s": step_s,
            "step_on_s": step_on_s,
            "measure_s": measure_times,
            "measure_median_s": measure_med,
            "measure_in_steps": measure_med / step_s,
            "measurements_per_run": n_meas,
            "callback_by_event": runs[-1]["callback_by_event"],
            "profile": profile_json,
        },
    )


if __name__ == "__main__":
    main()
