"""A fixed-seed monitoring run whose JSONL output is committed as a reference (``tests/data/golden_run.jsonl``).

It covers the engine's paths that a refactor could change without a unit test noticing: GPT-2
``Conv1D`` layers (stored transposed) of three shapes, plain ``nn.Linear`` layers, PEFT LoRA
layers (ΔW from the factors), full-spectrum measurements (``full_every``), the adaptive rank,
warm starts, intruders, the default alert rules and the context keys.

Regenerate (only when a change is *meant* to change the numbers; say why in the commit)::

    python -m tests.golden --write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

REFERENCE = Path(__file__).parent / "data" / "golden_run.jsonl"
#: per-record fields that measure time, not the spectrum
TIMING = ("elapsed_s",)
TIMING_METRICS = ("spectral/model/measure_s", "spectral/model/overhead")


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=48, n_head=4, vocab_size=40, n_positions=16, resid_pdrop=0.0, bos_token_id=1, eos_token_id=1
    )
    cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 24))


def _train_lm(model: nn.Module, run, steps: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 40, (8, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.record_context({"loss": round(float(loss.detach()), 6)})
        run.on_optimizer_step(step, final=step == steps)


def _train_mlp(model: nn.Module, run, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    teacher = torch.randn(24, 24, generator=gen)
    for step in range(1, steps + 1):
        x = torch.randn(32, 24, generator=gen)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.on_optimizer_step(step, final=step == steps)


def golden_run(out: Path) -> list[dict]:
    """Run the three monitored trainings into ``out`` and return the records (one list, tagged by run)."""
    from spectral_monitor import JsonlSink, MonitorRun

    records: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 1) tiny GPT-2: Conv1D layers, adaptive rank, full spectrum every 2nd measurement
        path = out / "gpt2.jsonl"
        model = _gpt2()
        run = MonitorRun(model, sinks=[JsonlSink(path)], every_n_steps=3, rank=8, full_every=2, max_rank=16)
        run.start()
        _train_lm(model, run, steps=12, lr=3e-3, seed=2)
        run.finish()
        records += [{"run": "gpt2", **r} for r in _read(path)]
        # 2) an MLP of nn.Linear layers: cold and warm sketches, no full spectrum
        path = out / "mlp.jsonl"
        model = _mlp()
        run = MonitorRun(model, sinks=[JsonlSink(path)], every_n_steps=4, rank=6, base_k=16)
        run.start()
        _train_mlp(model, run, steps=12, seed=3)
        run.finish()
        records += [{"run": "mlp", **r} for r in _read(path)]
        # 3) PEFT LoRA over the GPT-2: ΔW from the adapter factors
        import peft

        path = out / "lora.jsonl"
        model = peft.get_peft_model(
            _gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        )
        run = MonitorRun(model, sinks=[JsonlSink(path)], every_n_steps=3)
        run.start()
        _train_lm(model, run, steps=9, lr=1e-2, seed=4)
        run.finish()
        records += [{"run": "lora", **r} for r in _read(path)]
    finally:
        torch.set_num_threads(threads)
    return records


def _read(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "step" not in rec:
            continue
        for key in TIMING:
            rec.pop(key, None)
        for key in TIMING_METRICS:
            rec["metrics"].pop(key, None)
        out.append(rec)
    return out


def _close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= atol + rtol * abs(b)


def compare(got: list[dict], want: list[dict], rtol: float = 1e-4, atol: float = 1e-6) -> list[str]:
    """Differences between two record lists (empty when equal to the tolerance)."""
    problems: list[str] = []
    if len(got) != len(want):
        return [f"{len(got)} records, want {len(want)}"]
    for g, w in zip(got, want):
        where = f"{w['run']} step {w['step']}"
        if (g["run"], g["step"]) != (w["run"], w["step"]):
            problems.append(f"{where}: got {g['run']} step {g['step']}")
            continue
        missing, extra = set(w["metrics"]) - set(g["metrics"]), set(g["metrics"]) - set(w["metrics"])
        if missing or extra:
            problems.append(f"{where}: keys missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
        for key in set(w["metrics"]) & set(g["metrics"]):
            if not _close(g["metrics"][key], w["metrics"][key], rtol, atol):
                problems.append(f"{where}: {key} = {g['metrics'][key]!r}, want {w['metrics'][key]!r}")
        if set(g["spectra"]) != set(w["spectra"]):
            problems.append(f"{where}: spectra layers differ")
        for layer in set(g["spectra"]) & set(w["spectra"]):
            a, b = g["spectra"][layer], w["spectra"][layer]
            if len(a) != len(b) or not all(_close(x, y, rtol, atol) for x, y in zip(a, b)):
                problems.append(f"{where}: spectrum of {layer} differs")
        if [(a["rule"], a["reason"]) for a in g["alerts"]] != [(a["rule"], a["reason"]) for a in w["alerts"]]:
            problems.append(f"{where}: alerts {g['alerts']} != {w['alerts']}")
        if g["skipped"] != w["skipped"]:
            problems.append(f"{where}: skipped {g['skipped']} != {w['skipped']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="overwrite the committed reference")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        records = golden_run(Path(tmp))
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        print(f"wrote {len(records)} records to {REFERENCE}")
        return 0
    want = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    problems = compare(records, want)
    print("\n".join(problems) or "equal")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
