"""Recipe: spectral monitoring of GRPO (RL with a verifiable reward) with TRL's ``GRPOTrainer``.

The pieces a user changes are marked: the callback (one line), its probe (held-out data the model
should not forget) and the trainer. The task helpers come from the built-in demo
(``spectral_monitor.demo.tasks``: a character tokenizer, fixed-width addition and subtraction, a
tiny GPT-2 built from its config), so the recipe needs no download.

    python integrations/trl_grpo.py            # about two minutes on an idle 2-core CPU
    python integrations/trl_grpo.py --quick    # a smoke run (no learning expected)
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from spectral_monitor import ConsoleSink, read_jsonl
from spectral_monitor.demo.tasks import ANSWER_LEN, Task, accuracy, char_tokenizer, model, warm_up
from spectral_monitor.integrations.trl import SpectralMonitorCallback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spectral_runs/trl_grpo", help="output_dir of the GRPOTrainer")
    p.add_argument("--steps", type=int, default=150, help="GRPO optimizer steps")
    p.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for tests: short warm-up, 4 GRPO steps")
    a = p.parse_args(argv)
    steps, every, warm = (4, 2, 20) if a.quick else (a.steps, a.every, 1500)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch threads: {torch.get_num_threads()}")

    tok = char_tokenizer()
    add, sub = Task("+", a.seed), Task("-", a.seed)
    net = model(a.seed)
    warm_up(net, tok, [sub], until=sub, target=0.0 if a.quick else 0.6, max_steps=warm, seed=a.seed)
    warm_up(net, tok, [add, sub], until=add, target=0.0 if a.quick else 0.45, max_steps=warm, seed=a.seed)
    acc0 = accuracy(net, tok, add, add.test)

    def exact_match(completions, answer, **kwargs) -> list[float]:
        return [float(c.strip() == s) for c, s in zip(completions, answer)]

    # ---- the monitor: one callback, a held-out probe of what GRPO does not reward ----
    monitor = SpectralMonitorCallback(
        every_n_steps=every, probe=sub.pairs(sub.test[:128]), sinks=[ConsoleSink(use_print=True)]
    )
    trainer = GRPOTrainer(
        model=net,
        reward_funcs=exact_match,
        args=GRPOConfig(
            output_dir=a.out,
            max_steps=steps,
            per_device_train_batch_size=128,
            num_generations=8,
            max_completion_length=ANSWER_LEN,
            temperature=1.0,
            top_k=0,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            beta=0.0,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            disable_dropout=True,
            disable_tqdm=True,
            seed=a.seed,
            data_seed=a.seed,
        ),
        train_dataset=Dataset.from_list(
            [{"prompt": add.prompt(x, y), "answer": add.answer(x, y)} for x, y in add.train]
        ),
        processing_class=tok,
        callbacks=[monitor],
    )
    trainer.remove_callback(PrinterCallback)  # the console sink prints one line per measurement
    trainer.train()

    reports = read_jsonl(f"{a.out}/spectral_monitor/metrics.jsonl")
    last = reports[-1]
    print(f"held-out addition exact match: {acc0:.3f} -> {accuracy(trainer.model, tok, add, add.test):.3f}")
    kl, rise = last.probes.get("kl", float("nan")), last.probes.get("loss_rel", 0.0)
    print(f"probe (subtraction): KL to base {kl:.3f}, loss {rise:+.1%}")
    print(f"{'layer':30s} {'rho1':>6s} {'stable rank':>11s} {'|dW|/|W0|':>10s}")
    for layer, v in last.layers.items():
        print(f"{layer:30s} {v['rho1']:6.3f} {v['stable_rank']:11.2f} {v['update_rel']:10.5f}")
    print(f"alerts: {sorted({al.rule for r in reports for al in r.alerts}) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
