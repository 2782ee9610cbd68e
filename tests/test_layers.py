"""Layer selection: GPT-2 Conv1D, a Llama-style module, regex/explicit/exclusions, PEFT LoRA."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from spectral_monitor.layers import LayerSpec, select_layers

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------ models
class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d // 2, bias=False)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, 3 * d, bias=False)
        self.up_proj = nn.Linear(d, 3 * d, bias=False)
        self.down_proj = nn.Linear(3 * d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attn(d)
        self.mlp = MLP(d)


class Inner(nn.Module):
    def __init__(self, d: int, n: int, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)


class TinyLlama(nn.Module):
    """Llama naming: model.embed_tokens, model.layers.<i>.{self_attn,mlp}.*_proj, lm_head."""

    def __init__(self, d: int = 16, n: int = 3, vocab: int = 40) -> None:
        super().__init__()
        self.model = Inner(d, n, vocab)
        self.lm_head = nn.Linear(d, vocab, bias=False)


LLAMA_TYPES = {
    "self_attn.q_proj": ("q", (16, 16)),
    "self_attn.k_proj": ("k", (8, 16)),
    "self_attn.v_proj": ("v", (8, 16)),
    "self_attn.o_proj": ("o", (16, 16)),
    "mlp.gate_proj": ("gate", (48, 16)),
    "mlp.up_proj": ("up", (48, 16)),
    "mlp.down_proj": ("down", (16, 48)),
}


def gpt2(n_layer: int = 2):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


GPT2_BLOCK = {
    "attn.c_attn": ("qkv", (192, 64)),
    "attn.c_proj": ("o", (64, 64)),
    "mlp.c_fc": ("up", (256, 64)),
    "mlp.c_proj": ("down", (64, 256)),
}


# ------------------------------------------------------------------ GPT-2
def test_gpt2_all_linear_selects_conv1d_blocks_in_canonical_orientation():
    model = gpt2()
    specs = select_layers(model)
    expected = [f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in GPT2_BLOCK]
    assert [s.name for s in specs] == expected
    for spec in specs:
        suffix = spec.name.split(".", 3)[3]
        layer_type, shape = GPT2_BLOCK[suffix]
        assert spec.kind == "conv1d" and spec.transposed
        assert spec.layer_type == layer_type
        assert spec.depth == int(spec.name.split(".")[2])
        assert spec.shape == shape  # (out, in)
        param = spec.parameter()
        assert tuple(param.shape) == (shape[1], shape[0])  # Conv1D stores (in, out)
        assert spec.param_name == spec.name + ".weight"
        assert dict(model.named_parameters())[spec.param_name] is param
        # canonical() is the (out, in) matrix: y = W x for the layer's input x
        x = torch.randn(3, shape[1])
        W = spec.canonical(param)
        assert tuple(W.shape) == shape
        module = dict(model.named_modules())[spec.name]
        torch.testing.assert_close(module(x), x @ W.T + module.bias)
    names = {s.name for s in specs}
    assert not any(n.endswith(("lm_head", "wte", "wpe")) for n in names)


def test_gpt2_regex_explicit_and_exclusions():
    model = gpt2()
    attn = select_layers(model, "re:attn\\.c_attn$")
    assert [s.name for s in attn] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # extra exclusions on top of the defaults
    no_mlp = select_layers(model, "all-linear", exclude=[r"\.mlp\."])
    assert [s.name for s in no_mlp] == [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")]
    # explicit names, in the order given, and lm_head may be asked for explicitly
    chosen = select_layers(model, ["transformer.h.1.mlp.c_fc", "lm_head", "transformer.h.0.attn.c_proj"])
    assert [s.name for s in chosen] == ["transformer.h.1.mlp.c_fc", "lm_head", "transformer.h.0.attn.c_proj"]
    assert chosen[1].kind == "dense" and chosen[1].shape == (64, 64)
    # exclusions apply to explicit names and regexes too
    assert [s.name for s in select_layers(model, "re:c_attn", exclude=["h\\.0"])] == ["transformer.h.1.attn.c_attn"]


def test_missing_explicit_name_raises_with_close_candidates():
    model = gpt2()
    with pytest.raises(KeyError) as info:
        select_layers(model, ["transformer.h.1.mlp.c_projj"])
    msg = str(info.value)
    assert "transformer.h.1.mlp.c_projj" in msg
    assert "transformer.h.1.mlp.c_proj" in msg.replace("c_projj", "")  # the near miss is suggested
    # a module that exists but is not a linear layer is not selectable either
    with pytest.raises(KeyError, match=re.escape("transformer.ln_f")):
        select_layers(model, ["transformer.ln_f"])


# ------------------------------------------------------------------ Llama-style
def test_llama_style_types_depths_and_default_exclusions():
    model = TinyLlama()
    specs = select_layers(model)
    expected = [f"model.layers.{i}.{suffix}" for i in range(3) for suffix in LLAMA_TYPES]
    assert [s.name for s in specs] == expected
    for spec in specs:
        suffix = spec.name.split(".", 3)[3]
        layer_type, shape = LLAMA_TYPES[suffix]
        assert (spec.layer_type, spec.shape, spec.kind) == (layer_type, shape, "dense")
        assert spec.depth == int(spec.name.split(".")[2])
        assert not spec.transposed
        assert spec.canonical(spec.parameter()) is spec.parameter()
    # with re: the defaults are not applied: lm_head is a linear layer like any other
    assert [s.name for s in select_layers(model, "re:lm_head")] == ["lm_head"]
    # lm_head has no depth and type "other"
    head = select_layers(model, ["lm_head"])[0]
    assert head.depth is None and head.layer_type == "other"


def test_layer_without_block_index_and_plain_sequential():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    specs = select_layers(model)
    assert [(s.name, s.shape, s.depth) for s in specs] == [("0", (5, 4), None), ("2", (3, 5), None)]
    assert isinstance(specs[0], LayerSpec)


# ------------------------------------------------------------------ PEFT LoRA
peft = pytest.importorskip("peft")


def test_peft_lora_on_gpt2_one_spec_per_adapted_layer():
    model = peft.get_peft_model(
        gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    specs = select_layers(model)
    prefix = "base_model.model.transformer.h"
    assert [s.name for s in specs] == [f"{prefix}.{i}.{suffix}" for i in range(2) for suffix in GPT2_BLOCK]
    for spec in specs:
        assert not any(part in spec.name for part in ("base_layer", "lora_A", "lora_B"))
        suffix = spec.name.split(".", 5)[5]
        assert spec.shape == GPT2_BLOCK[suffix][1]
        if suffix in ("attn.c_attn", "mlp.c_fc"):
            assert spec.kind == "lora" and spec.transposed
            assert spec.param_name == spec.name + ".base_layer.weight"
            assert spec.parameter() is dict(model.named_parameters())[spec.param_name]
            B, A = spec.lora_factors()
            assert B.shape == (spec.shape[0], 4) and A.shape == (4, spec.shape[1])
        else:
            assert spec.kind == "conv1d"


def test_peft_lora_on_linear_model():
    model = peft.get_peft_model(TinyLlama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    specs = select_layers(model)
    assert len(specs) == 3 * len(LLAMA_TYPES)
    lora = [s for s in specs if s.kind == "lora"]
    assert [s.name.rsplit(".", 1)[1] for s in lora] == ["q_proj", "v_proj"] * 3
    assert all(not s.transposed and s.layer_type in ("q", "v") for s in lora)
    assert [s.shape for s in lora[:2]] == [(16, 16), (8, 16)]
    # fresh LoRA: B = 0, so ΔW = 0, with scaling alpha/r = 2 folded into B
    B, A = lora[0].lora_factors()
    assert torch.count_nonzero(B) == 0 and A.shape == (2, 16)


def test_heads_are_left_out_by_all_linear():
    """A Lightning module's ``head``, a ``cls_head``, ``lm_head``: output heads, not blocks."""
    model = nn.ModuleDict(
        {
            "body": nn.Linear(4, 4),
            "head": nn.Linear(4, 2),
            "cls_head": nn.Linear(4, 2),
            "lm_head": nn.Linear(4, 2),
            "heads_proj": nn.Linear(4, 4),
        }
    )
    assert [s.name for s in select_layers(model)] == ["body", "heads_proj"]
    assert [s.name for s in select_layers(model, "re:head")] == ["head", "cls_head", "lm_head", "heads_proj"]
