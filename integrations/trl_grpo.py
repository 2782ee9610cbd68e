"""Recipe: spectral monitoring of GRPO (RL with a verifiable reward) with TRL's ``GRPOTrainer``.

A miniature RLVR run on a 2-core CPU: a tiny GPT-2 built from its config (no download) first
learns fixed-width addition (``"07+12="`` -> ``"19<eos>"``) in a short supervised warm-up (until
held-out greedy exact match reaches ``--warmup-acc``: GRPO needs some correct samples to get
a signal), then GRPO improves it with an exact-match reward while ``SpectralMonitorCallback``
measures the singular spectrum of every block linear layer's update ΔW = W_t − W_warm-up.

    python integrations/trl_grpo.py            # about a minute on an idle 2-core CPU
    python integrations/trl_grpo.py --quick    # a few seconds (smoke test; no learning expected)

Printed: held-out accuracy before and after GRPO, the reward line, and the spectral summary
(rank-1 energy ρ₁ per layer: RL updates are known to be strongly low-rank).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from spectral_monitor import ConsoleSink, read_jsonl
from spectral_monitor.integrations.trl import SpectralMonitorCallback

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]
PAD, EOS = 0, 1
ANSWER_LEN = 4  # up to 3 digits + <eos>


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def split_pairs(seed: int, n_test: int = 500) -> tuple[list, list]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def encode(tok, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + answer + <eos>, right-padded to a fixed length; labels only on the answer."""
    ids, labels = [], []
    for a, b in pairs:
        prompt = tok(f"{a:02d}+{b:02d}=")["input_ids"]
        answer = tok(str(a + b))["input_ids"] + [EOS]
        pad = [PAD] * (ANSWER_LEN - len(answer))
        ids.append(prompt + answer + pad)
        labels.append([-100] * len(prompt) + answer + [-100] * len(pad))
    return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def accuracy(model, tok, pairs) -> float:
    """Greedy exact match on ``pairs`` (4 decoding steps, the whole set in one batch)."""
    model.eval()
    x = torch.tensor([tok(f"{a:02d}+{b:02d}=")["input_ids"] for a, b in pairs])
    for _ in range(ANSWER_LEN):
        x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hits = 0
    for row, (a, b) in zip(x[:, 6:].tolist(), pairs):
        digits = row[: row.index(EOS)] if EOS in row else row
        hits += tok.decode(digits) == str(a + b)
    model.train()
    return hits / len(pairs)


def warm_up(model, tok, train, test, *, target: float, max_steps: int, seed: int) -> tuple[int, float]:
    """Supervised warm-up (AdamW 3e-3, batch 128, loss on the answer) until greedy accuracy >= target."""
    ids, labels = encode(tok, train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    acc, step = 0.0, 0
    model.train()
    for step in range(1, max_steps + 1):
        idx = torch.randint(len(ids), (128,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == max_steps:
            acc = accuracy(model, tok, test)
            if acc >= target:
                break
    return step, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spectral_runs/trl_grpo", help="output_dir of the GRPOTrainer")
    p.add_argument("--steps", type=int, default=150, help="GRPO optimizer steps")
    p.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    p.add_argument("--warmup-acc", type=float, default=0.4, help="held-out accuracy that ends the warm-up")
    p.add_argument("--warmup-max", type=int, default=800, help="at most this many warm-up steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for tests: short warm-up, 4 GRPO steps")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.every, a.warmup_max = 4, 2, 20

    if a.threads:
        torch.set_num_threads(a.threads)  # one thread is fastest for a model this small
    torch.manual_seed(a.seed)
    tok = char_tokenizer()
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    train, test = split_pairs(a.seed)
    t0 = time.perf_counter()
    steps, acc0 = warm_up(model, tok, train, test, target=a.warmup_acc, max_steps=a.warmup_max, seed=a.seed)
    print(f"warm-up: {steps} steps, held-out exact match {acc0:.3f} ({time.perf_counter() - t0:.1f} s)")

    def exact_match(completions, answer, **kwargs) -> list[float]:
        return [float(c.strip() == s) for c, s in zip(completions, answer)]

    prompts = Dataset.from_list([{"prompt": f"{x:02d}+{y:02d}=", "answer": str(x + y)} for x, y in train])
    args = GRPOConfig(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=128,  # completions per step: 16 prompts x 8 generations
        num_generations=8,
        max_completion_length=ANSWER_LEN,
        temperature=1.0,
        top_k=0,
        learning_rate=1e-4,  # 1e-6 (TRL's default) does nothing at this size; 3e-4 collapses
        lr_scheduler_type="constant",
        beta=0.0,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16
        activation_checkpointing=False,  # TRL defaults to on
        disable_dropout=True,
        disable_tqdm=True,
        seed=a.seed,
        data_seed=a.seed,
    )
    monitor = SpectralMonitorCallback(every_n_steps=a.every, sinks=[ConsoleSink(use_print=True)])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=args,
        train_dataset=prompts,
        processing_class=tok,
        callbacks=[monitor],
    )
    trainer.remove_callback(PrinterCallback)  # the ConsoleSink prints one readable line per measurement
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    acc1 = accuracy(trainer.model, tok, test)

    rewards = [(e["step"], e["reward"]) for e in trainer.state.log_history if "reward" in e]
    reports = read_jsonl(f"{a.out}/spectral_monitor/metrics.jsonl")
    last = reports[-1]
    print(
        f"\nGRPO: {trainer.state.global_step} steps in {wall:.1f} s (base: {monitor.run.monitor.store.kind} snapshot)"
    )
    print("reward (step: mean): " + ", ".join(f"{s}: {r:.3f}" for s, r in rewards))
    print(f"held-out exact match: {acc0:.3f} -> {acc1:.3f}")
    print(f"measured at steps {[r.step for r in reports]}")
    print(f"{'layer':30s} {'rho1':>6s} {'stable rank':>11s} {'|dW|/|W0|':>10s}")
    for layer in last.layers:
        m = last.metrics
        print(
            f"{layer:30s} {m[f'spectral/rho1/{layer}']:6.3f} {m[f'spectral/stable_rank/{layer}']:11.2f} "
            f"{m[f'spectral/update_rel/{layer}']:10.5f}"
        )
    print(f"model rho1 mean {last.metrics.get('spectral/model/rho1_mean', float('nan')):.3f}")
    print(f"alerts: {sorted({al.rule for r in reports for al in r.alerts}) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
