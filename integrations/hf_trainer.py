"""Recipe: spectral monitoring of a causal-LM fine-tune with the Hugging Face ``Trainer``.

A tiny GPT-2 built from its config (no download) is first pre-trained on generated addition
text (``"07+12=019<eos>"``, character tokenizer), then fine-tuned on a shifted task (the sum's
digits reversed: ``"07+12=910<eos>"``) with ``SpectralMonitorCallback``, which measures the
singular spectrum of every block linear layer's update ΔW = W_t − W_pretrained every 25
optimizer steps (plus the first and the last). The loss on the pre-training task before and
after shows what the fine-tune cost.

    python integrations/hf_trainer.py                      # under a minute on a 2-core CPU
    python integrations/hf_trainer.py --report-to tensorboard
    python integrations/hf_trainer.py --quick              # a few seconds (smoke test)

Where the numbers go: ``train/spectral/model/*`` aggregates through ``Trainer.log`` (every
``report_to`` backend, and ``trainer.state.log_history``), per-layer ``spectral/<metric>/<layer>``
to the trainer's TensorBoard writer / W&B run, everything to ``OUT/spectral_monitor/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from spectral_monitor import ConsoleSink, read_jsonl
from spectral_monitor.integrations.hf import SpectralMonitorCallback

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


class AdditionText(torch.utils.data.Dataset):
    """``n`` generated lines ``"ab+cd=sss<eos>"`` (10 tokens: no padding); ``reverse`` flips the sum's digits."""

    def __init__(self, tok: PreTrainedTokenizerFast, n: int, seed: int, *, reverse: bool = False) -> None:
        rng = random.Random(seed)
        lines = []
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            total = f"{a + b:03d}"
            lines.append(f"{a:02d}+{b:02d}={total[::-1] if reverse else total}<eos>")
        self.ids = torch.tensor([tok(line)["input_ids"] for line in lines])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: str, steps: int, lr: float, seed: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=lr,
        warmup_steps=min(20, steps // 10),
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        **kw,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spectral_runs/hf_trainer", help="output_dir of the fine-tune")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300, help="fine-tune optimizer steps")
    p.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    p.add_argument("--report-to", default="none", help='"none", "tensorboard", "wandb" or "all"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 12 fine-tune steps, measured every 4")
    a = p.parse_args(argv)
    if a.quick:
        a.pretrain_steps, a.steps, a.every = 10, 12, 4
    if a.threads:
        torch.set_num_threads(a.threads)  # one thread is fastest for a model this small

    tok = char_tokenizer()
    torch.manual_seed(a.seed)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=128, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    original = AdditionText(tok, 512, a.seed + 1)
    shifted = AdditionText(tok, 512, a.seed + 1, reverse=True)

    t0 = time.perf_counter()
    pre = Trainer(
        model=model,
        args=training_args(f"{a.out}/pretrain", a.pretrain_steps, 1e-3, a.seed, report_to="none"),
        train_dataset=AdditionText(tok, 8192, a.seed),
    )
    pre.remove_callback(PrinterCallback)
    pre.train()
    print(f"pre-trained {a.pretrain_steps} steps ({time.perf_counter() - t0:.1f} s)")

    monitor = SpectralMonitorCallback(every_n_steps=a.every, sinks=[ConsoleSink(use_print=True)])
    trainer = Trainer(
        model=model,
        args=training_args(a.out, a.steps, 5e-4, a.seed, logging_steps=a.every, report_to=a.report_to),
        train_dataset=AdditionText(tok, 8192, a.seed, reverse=True),
        eval_dataset={"original": original, "shifted": shifted},
        processing_class=tok,
        callbacks=[monitor],
    )
    trainer.remove_callback(PrinterCallback)  # the ConsoleSink prints one readable line per measurement
    before = trainer.evaluate()
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    after = trainer.evaluate()

    reports = read_jsonl(f"{a.out}/spectral_monitor/metrics.jsonl")
    last = reports[-1]
    print(f"\nfine-tuned {trainer.state.global_step} steps in {wall:.1f} s")
    for name in ("shifted", "original"):
        key = f"eval_{name}_loss"
        print(f"loss on the {name} task: {before[key]:.3f} -> {after[key]:.3f}")
    print(f"measured at steps {[r.step for r in reports]}; last measurement took {last.elapsed_s * 1e3:.0f} ms")
    print(f"{'layer':30s} {'rho1':>6s} {'erank':>7s} {'|dW|/|W0|':>10s} {'intruders':>9s}")
    for layer in last.layers:
        m = last.metrics
        print(
            f"{layer:30s} {m[f'spectral/rho1/{layer}']:6.3f} {m[f'spectral/erank/{layer}']:7.1f} "
            f"{m[f'spectral/update_rel/{layer}']:10.4f} {m.get(f'spectral/intruders/{layer}', float('nan')):9.0f}"
        )
    print(f"alerts: {sorted({al.rule for r in reports for al in r.alerts}) or 'none'}")
    print(f"metrics log: {a.out}/spectral_monitor/metrics.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
