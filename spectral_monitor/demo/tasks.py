"""The demo's tiny world: a character tokenizer, two arithmetic tasks, a GPT-2 small enough for a CPU.

Addition (``"07+12="`` -> ``"19"``) is the task GRPO rewards; subtraction (``"47-12="`` -> ``"35"``,
never negative) is the second skill the supervised warm-up teaches and GRPO does not reward, held
out as the knowledge probe. Prompts have a fixed width, so no padding is needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ANSWER_LEN", "EOS", "PAD", "Task", "accuracy", "char_tokenizer", "model", "warm_up"]

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "-", "="]
PAD, EOS = 0, 1
ANSWER_LEN = 4  # up to 3 digits + <eos>


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def model(seed: int) -> nn.Module:
    """A 3-block GPT-2 (n_embd 96) built from its config: about 0.35 M parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=96, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class Task:
    """One arithmetic task: its operator, answers, and a fixed train / held-out split of operand pairs."""

    def __init__(self, op: str, seed: int, n_test: int = 300) -> None:
        self.op = op
        pairs = [(a, b) for a in range(100) for b in range(100) if op == "+" or a >= b]
        random.Random(f"{op}{seed}").shuffle(pairs)
        self.test, self.train = pairs[:n_test], pairs[n_test:]

    def prompt(self, a: int, b: int) -> str:
        return f"{a:02d}{self.op}{b:02d}="

    def answer(self, a: int, b: int) -> str:
        return str(a + b if self.op == "+" else a - b)

    def pairs(self, split: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
        """``(prompt, answer)`` strings: the probe's input."""
        return [(self.prompt(a, b), self.answer(a, b)) for a, b in split]

    def encode(self, tok, split: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + answer + <eos>, right-padded to a fixed length; labels only on the answer."""
        ids, labels = [], []
        for a, b in split:
            prompt = tok(self.prompt(a, b))["input_ids"]
            answer = tok(self.answer(a, b))["input_ids"] + [EOS]
            pad = [PAD] * (ANSWER_LEN - len(answer))
            ids.append(prompt + answer + pad)
            labels.append([-100] * len(prompt) + answer + [-100] * len(pad))
        return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def accuracy(net: nn.Module, tok, task: Task, split: Sequence[tuple[int, int]]) -> float:
    """Greedy exact match on ``split`` (the whole set in one batch, 4 decoding steps)."""
    training = net.training
    net.eval()
    x = torch.tensor([tok(task.prompt(a, b))["input_ids"] for a, b in split], device=next(net.parameters()).device)
    width = x.shape[1]
    for _ in range(ANSWER_LEN):
        logits = net(input_ids=x, attention_mask=torch.ones_like(x)).logits
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hits = 0
    for row, (a, b) in zip(x[:, width:].tolist(), split):
        digits = row[: row.index(EOS)] if EOS in row else row
        hits += tok.decode(digits) == task.answer(a, b)
    net.train(training)
    return hits / len(split)


def warm_up(
    net: nn.Module, tok, tasks: Sequence[Task], *, until: Task, target: float, max_steps: int, seed: int
) -> int:
    """Supervised training on an equal mixture of ``tasks`` (AdamW 3e-3, batch 128, loss on the
    answers) until ``until``'s held-out exact match reaches ``target`` (checked every 50 steps);
    returns the steps taken."""
    encoded = [task.encode(tok, task.train) for task in tasks]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    share = 128 // len(tasks)
    step = 0
    net.train()
    for step in range(1, max_steps + 1):
        picks = [torch.randint(len(ids), (share,), generator=gen) for ids, _ in encoded]
        ids = torch.cat([e[0][idx] for e, idx in zip(encoded, picks)])
        labels = torch.cat([e[1][idx] for e, idx in zip(encoded, picks)])
        loss = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 and accuracy(net, tok, until, until.test) >= target:
            break
    return step
