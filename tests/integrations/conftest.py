"""Shared tiny-model fixtures for the framework integration tests (no downloads).

* ``tiny_gpt2(**overrides)``: a factory returning a fresh, seeded ``GPT2LMHeadModel`` built from
  ``GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=14, n_positions=32)``, dropout off, float32.
* ``char_tokenizer``: a character-level ``PreTrainedTokenizerFast`` over ``<pad>``, ``<eos>``, the
  digits, ``+`` and ``=`` (14 tokens), for the tiny addition task (``"07+12="`` -> ``"19<eos>"``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Integration tests must never reach the network or a logged-in W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]


def build_char_tokenizer():
    """The 14-token character tokenizer of the addition task."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def build_tiny_gpt2(seed: int = 0, **overrides):
    """A seeded tiny GPT-2 (float32, dropout 0); ``overrides`` go to ``GPT2Config``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "vocab_size": len(VOCAB),
        "n_positions": 32,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        **overrides,
    }
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg))


@pytest.fixture
def tiny_gpt2():
    """Factory: ``tiny_gpt2(seed=0, **config_overrides) -> GPT2LMHeadModel``."""
    pytest.importorskip("transformers")
    return build_tiny_gpt2


@pytest.fixture(scope="session")
def char_tokenizer():
    """The 14-token character tokenizer (``<pad>``=0, ``<eos>``=1, digits, ``+``, ``=``)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return build_char_tokenizer()


def run_recipe(name: str, out: Path) -> subprocess.CompletedProcess:
    """Run ``integrations/<name>.py --quick --out <out>`` in a subprocess (cwd ``out``); asserts exit 0."""
    script = Path(__file__).resolve().parents[2] / "integrations" / f"{name}.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- a base that knows a task
def addition_texts(task: str, n: int, seed: int) -> list[str]:
    """``"07+12=019"``-style strings: ``add`` (the base's task), ``conflict`` (the same prompts with
    another answer: learning it forgets addition) or ``continue`` (more addition)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        answer = (a * b) % 1000 if task == "conflict" else a + b
        out.append(f"{a:02d}+{b:02d}={answer:03d}")
    return out


def probe_pairs(n: int = 64, seed: int = 99) -> list[tuple[str, str]]:
    """Held-out addition as ``(prompt, reference answer)`` pairs: the knowledge probe."""
    return [(t[:6], t[6:]) for t in addition_texts("add", n, seed)]


@pytest.fixture(scope="session")
def addition_base():
    """``factory() -> GPT2LMHeadModel`` that knows fixed-width addition a little (300 AdamW steps,
    held-out answer loss ~1 nat/token), built once per session (~6 s) and copied per call."""
    pytest.importorskip("transformers")
    import copy

    import torch

    tok = build_char_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny_gpt2(seed=0)
        ids = torch.tensor([tok(t)["input_ids"] + [1] for t in addition_texts("add", 2000, 0)])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(len(ids), (64,), generator=gen)
            loss = model(input_ids=ids[idx], labels=ids[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return lambda: copy.deepcopy(model).train()
