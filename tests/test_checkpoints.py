"""Checkpoints on disk: HF folders (single file, sharded), bare files, PEFT adapters; their pairs and every error.

Oracles: the in-memory weights of the saved models (Conv1D transposed by hand), a planted rank-1
update checked by a float64 SVD, and PEFT's own ``merge_and_unload`` for the LoRA factors.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spectral_monitor.checkpoints import AdapterCheckpoint, open_checkpoint, pair_updates, plan_updates
from spectral_monitor.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers.pytorch_utils import Conv1D  # noqa: E402

PLANTED = "transformer.h.1.mlp.c_fc"
BLOCKS = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=14, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def canonical(model: torch.nn.Module, name: str) -> torch.Tensor:
    """Oracle: the module's weight as (out, in); HF Conv1D stores (in, out)."""
    module = model.get_submodule(name)
    w = module.weight.detach()
    return w.T if isinstance(module, Conv1D) else w


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the safetensors file ``src`` to ``dst`` with its tensor dict changed by ``edit``."""
    tensors = safetensors_torch.load_file(str(src))
    tensors = edit(tensors) or tensors
    dst.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata={"format": "pt"})
    return dst


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SimpleNamespace:
    """A tiny GPT-2, a tuned copy with a rank-1 update planted in one matrix, both single-file and sharded."""
    root = tmp_path_factory.mktemp("checkpoints")
    base = tiny_gpt2()
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(128, generator=gen, dtype=torch.float64)
    v = torch.randn(32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        tuned.get_submodule(PLANTED).weight += torch.outer(u, v).T.float()  # stored (in, out)
    base.save_pretrained(root / "base")
    base.save_pretrained(root / "base_sharded", max_shard_size="20KB")
    tuned.save_pretrained(root / "tuned")
    tuned.save_pretrained(root / "tuned_sharded", max_shard_size="20KB")
    return SimpleNamespace(root=root, base=base, tuned=tuned, planted=torch.outer(u, v))


LORA_CONFIGS = {
    "conv1d": dict(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True),
    "rslora": dict(r=4, lora_alpha=16, target_modules=["c_fc"], fan_in_fan_out=True, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "mlp.c_proj"],
        fan_in_fan_out=True,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"mlp.c_proj": 3},
    ),
}


def make_adapter(base: torch.nn.Module, folder: Path, seed: int = 2, **config) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter with random factors; return PEFT's merged ΔW (out, in) float64 per target."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    targets = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")]
    targets = [n for n in targets if not n.endswith(("lora_A", "lora_B"))]
    merged = model.merge_and_unload()
    return {n: canonical(merged, n).double() - canonical(base, n).double() for n in targets}


@pytest.fixture(scope="module")
def adapters(saved) -> dict[str, SimpleNamespace]:
    out = {}
    for label, config in LORA_CONFIGS.items():
        folder = saved.root / f"adapter_{label}"
        out[label] = SimpleNamespace(path=folder, delta=make_adapter(saved.base, folder, **config))
    return out


# ------------------------------------------------------------------------------------- dense pairs


@pytest.mark.parametrize(
    ("base_dir", "tuned_dir"), [("base", "tuned"), ("base_sharded", "tuned_sharded"), ("base", "tuned_sharded")]
)
def test_dense_pairs_match_the_saved_models(saved, base_dir, tuned_dir):
    base, tuned = open_checkpoint(saved.root / base_dir), open_checkpoint(saved.root / tuned_dir)
    assert (base.model_type, base.conv1d) == ("gpt2", True)
    if tuned_dir.endswith("sharded"):
        assert len(tuned.files) > 2
    plan = plan_updates(base, tuned)
    assert plan.prefixes == ("", "") and plan.notes == () and plan.skipped == ()
    assert [p.name for p in plan.pairs] == BLOCKS

    for pair in pair_updates(base, tuned):
        module = saved.base.get_submodule(pair.name)
        assert pair.plan.shape == (module.nf, module.weight.shape[0])  # Conv1D: (out, in) = (nf, nx)
        assert pair.base.shape == pair.plan.shape and pair.tuned.shape == pair.plan.shape
        assert pair.plan.transposed and pair.plan.kind == "dense" and pair.lora is None
        assert torch.equal(pair.base, canonical(saved.base, pair.name))
        assert torch.equal(pair.tuned, canonical(saved.tuned, pair.name))
        delta = pair.delta()
        assert delta.dtype == torch.float32 and delta.shape == pair.plan.shape
        if pair.name == PLANTED:
            d = delta.double().numpy()
            s = np.linalg.svd(d, compute_uv=False)
            assert s[1] < 1e-6 * s[0]  # rank 1 up to float32 rounding
            np.testing.assert_allclose(d, saved.planted.numpy(), rtol=0, atol=1e-5)
        else:
            assert torch.count_nonzero(delta) == 0


def test_layer_types_and_depths(saved):
    plan = plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(saved.root / "tuned"))
    got = [(p.layer_type, p.depth) for p in plan.pairs]
    assert got == [("qkv", 0), ("o", 0), ("up", 0), ("down", 0), ("qkv", 1), ("o", 1), ("up", 1), ("down", 1)]
    # largest pair: c_fc or c_proj, 32*128 float32 on each side
    assert plan.max_layer_bytes == 2 * 32 * 128 * 4


def test_bf16_delta_is_computed_in_float32(saved, tmp_path):
    for side in ("base", "tuned"):
        src = saved.root / side / "model.safetensors"
        rewrite(src, tmp_path / side / "model.safetensors", lambda t: {k: v.bfloat16() for k, v in t.items()})
    pairs = pair_updates(open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "tuned"))
    pair = next(p for p in pairs if p.name == PLANTED)
    assert pair.base.dtype == pair.tuned.dtype == torch.bfloat16
    # float64 difference of the bf16 values; a bf16 subtraction would be off by ~1e-2 relative
    want = canonical(saved.tuned, PLANTED).bfloat16().double() - canonical(saved.base, PLANTED).bfloat16().double()
    np.testing.assert_allclose(pair.delta().double().numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_bare_file_without_config_infers_conv1d_layout(saved, tmp_path):
    bare = tmp_path / "weights.safetensors"
    shutil.copy(saved.root / "base" / "model.safetensors", bare)
    base = open_checkpoint(bare)
    assert base.kind == "file" and base.config == {} and base.conv1d
    assert "(32, 96)" in base.layout_source
    plan = plan_updates(base, open_checkpoint(saved.root / "tuned"))
    assert any("no config.json" in n for n in plan.notes)
    pair = plan.read(plan.pairs[0])
    assert pair.base.shape == (96, 32) and torch.equal(pair.base, canonical(saved.base, BLOCKS[0]))


def test_names_match_across_prefixes_and_wrappers(saved, tmp_path):
    # GPT2Model has no "transformer." prefix; a compiled/DDP state dict carries _orig_mod. / module.
    saved.base.transformer.save_pretrained(tmp_path / "backbone")
    rewrite(
        saved.root / "tuned" / "model.safetensors",
        tmp_path / "wrapped" / "model.safetensors",
        lambda t: {f"module._orig_mod.{k}": v for k, v in t.items()},
    )
    backbone, wrapped = open_checkpoint(tmp_path / "backbone"), open_checkpoint(tmp_path / "wrapped")
    plan = plan_updates(backbone, open_checkpoint(saved.root / "tuned"))
    assert plan.prefixes == ("", "transformer.")
    assert [p.name for p in plan.pairs] == [n.removeprefix("transformer.") for n in BLOCKS]
    assert any("GPT2Model" in n for n in plan.notes)  # same model_type, other head: accepted, noted
    plan = plan_updates(backbone, wrapped)
    assert plan.prefixes == ("", "transformer.")
    for pair in (plan.read(p) for p in plan.pairs):
        assert torch.equal(pair.base, canonical(saved.base.transformer, pair.name))
        assert torch.equal(pair.tuned, canonical(saved.tuned, "transformer." + pair.name))


def test_layer_selection(saved):
    base, tuned = open_checkpoint(saved.root / "base"), open_checkpoint(saved.root / "tuned")
    plan = plan_updates(base, tuned, layers="re:attn", exclude=[r"\.1\."])
    assert [p.name for p in plan.pairs] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    plan = plan_updates(base, tuned, layers=[PLANTED])
    assert [p.name for p in plan.pairs] == [PLANTED]
    with pytest.raises(ConfigError, match=r"transformer\.h\.1\.mlp\.c_fc"):
        plan_updates(base, tuned, layers=["transformer.h.1.mlp.c_fcc"])
    with pytest.raises(CheckpointError, match=r"no weights to compare"):
        plan_updates(base, tuned, layers="re:nothing")


def test_iterator_keeps_no_reference_to_yielded_pairs(saved):
    base, tuned = open_checkpoint(saved.root / "base_sharded"), open_checkpoint(saved.root / "tuned_sharded")
    refs = []
    for pair in pair_updates(base, tuned):
        refs += [weakref.ref(pair.base), weakref.ref(pair.tuned)]
        del pair
        assert all(r() is None for r in refs)  # freed as soon as the caller drops the pair
    assert len(refs) == 2 * len(BLOCKS)


# ------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("label", list(LORA_CONFIGS))
def test_lora_factors_reproduce_peft_merge(saved, adapters, label):
    adapter = open_checkpoint(adapters[label].path)
    assert isinstance(adapter, AdapterCheckpoint) and adapter.kind == "adapter"
    want = adapters[label].delta
    pairs = list(pair_updates(open_checkpoint(saved.root / "base"), adapter))
    assert sorted(p.name for p in pairs) == sorted(want)
    for pair in pairs:
        b, a = pair.lora
        out, inp = pair.plan.shape
        assert pair.tuned is None and pair.plan.kind == "lora"
        assert b.shape[0] == out and a.shape[1] == inp and b.shape[1] == a.shape[0]
        assert torch.equal(pair.base, canonical(saved.base, pair.name))
        np.testing.assert_allclose(pair.delta().double().numpy(), want[pair.name].numpy(), rtol=1e-5, atol=1e-6)
    if label == "patterns":
        ranks = {p.name: p.lora[1].shape[0] for p in pairs}
        assert ranks == {
            "transformer.h.0.attn.c_attn": 4,
            "transformer.h.1.attn.c_attn": 2,
            "transformer.h.0.mlp.c_proj": 4,
            "transformer.h.1.mlp.c_proj": 4,
        }
        scales = {p.name: p.plan.scale for p in pairs}
        assert scales["transformer.h.1.attn.c_attn"] == 8 / 2 and scales["transformer.h.0.mlp.c_proj"] == 3 / 4
    if label == "rslora":
        assert all(p.plan.scale == 16 / 2 for p in pairs)  # alpha / sqrt(r)


def test_adapter_keys_with_adapter_name(saved, adapters, tmp_path):
    src = adapters["conv1d"].path
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(src / "adapter_config.json", folder / "adapter_config.json")

    def add_name(tensors):
        return {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                for k, v in tensors.items()}  # fmt: skip

    rewrite(src / "adapter_model.safetensors", folder / "adapter_model.safetensors", add_name)
    adapter = open_checkpoint(folder)
    assert any(".lora_A.default.weight" in k for k in adapter.names())
    want = adapters["conv1d"].delta
    for pair in pair_updates(open_checkpoint(saved.root / "base"), adapter):
        np.testing.assert_allclose(pair.delta().double().numpy(), want[pair.name].numpy(), rtol=1e-5, atol=1e-6)


def test_adapter_on_a_backbone_without_prefix(saved, adapters, tmp_path):
    saved.base.transformer.save_pretrained(tmp_path / "backbone")
    plan = plan_updates(open_checkpoint(tmp_path / "backbone"), open_checkpoint(adapters["conv1d"].path))
    assert plan.prefixes == ("", "transformer.")
    want = adapters["conv1d"].delta
    assert sorted(p.name for p in plan.pairs) == sorted(n.removeprefix("transformer.") for n in want)
    for pair in (plan.read(p) for p in plan.pairs):
        np.testing.assert_allclose(
            pair.delta().double().numpy(), want["transformer." + pair.name].numpy(), rtol=1e-5, atol=1e-6
        )


def test_adapter_on_tied_head_and_embedding_is_skipped(saved, tmp_path):
    # lm_head is tied to wte: the base stores no lm_head.weight, which must not count as missing.
    with warnings.catch_warnings():  # PEFT warns that a tied layer is adapted
        warnings.simplefilter("ignore")
        make_adapter(saved.base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["c_attn", "lm_head", "wte"])
    plan = plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(tmp_path / "a"))
    assert [p.name for p in plan.pairs] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    skipped = dict(plan.skipped)
    assert "lm_head" in skipped and "transformer.wte" in skipped


def test_modules_to_save_weight_is_a_dense_update(saved, tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["mlp.c_fc"], fan_in_fan_out=True)
    model = peft.get_peft_model(copy.deepcopy(saved.base), config)
    with torch.no_grad():
        dict(model.named_parameters())["base_model.model.transformer.h.1.mlp.c_fc.modules_to_save.default.weight"] += (
            saved.planted.T.float()
        )
    model.save_pretrained(tmp_path / "a")
    pairs = {p.name: p for p in pair_updates(open_checkpoint(saved.root / "base"), open_checkpoint(tmp_path / "a"))}
    assert pairs[PLANTED].plan.kind == "dense" and pairs["transformer.h.0.mlp.c_fc"].plan.kind == "dense"
    np.testing.assert_allclose(pairs[PLANTED].delta().double().numpy(), saved.planted.numpy(), rtol=0, atol=1e-5)
    assert torch.count_nonzero(pairs["transformer.h.0.mlp.c_fc"].delta()) == 0


# -------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.*no such file"):
        open_checkpoint(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a checkpoint.*found nothing"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"not a checkpoint.*pytorch_model\.bin"):
        open_checkpoint(tmp_path / "bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a safetensors checkpoint"):
        open_checkpoint(tmp_path / "bin" / "pytorch_model.bin")


def test_other_architecture(saved, tmp_path):
    other = copy_folder(saved.root / "tuned", tmp_path / "neo")
    edit_json(other / "config.json", model_type="gpt_neo", architectures=["GPTNeoForCausalLM"])
    with pytest.raises(CheckpointError, match=r"other architecture: .*base is model_type 'gpt2'.*neo is 'gpt_neo'"):
        pair_updates(open_checkpoint(saved.root / "base"), open_checkpoint(other))  # raised before iterating
    # Without model_type on one side, differing architectures are enough.
    bare = copy_folder(saved.root / "base", tmp_path / "bare")
    (bare / "config.json").write_text(json.dumps({"architectures": ["GPT2Model"]}))
    with pytest.raises(CheckpointError, match=r"other architecture: .*\['GPT2Model'\].*\['GPTNeoForCausalLM'\]"):
        plan_updates(open_checkpoint(bare), open_checkpoint(other))


def test_conv1d_layout_differs(saved, tmp_path):
    # A bare file (no config) whose c_attn/c_fc/c_proj are stored (out, in), as nn.Linear would.
    def as_linear(tensors):
        conv1d = ("c_attn.weight", "c_fc.weight", "c_proj.weight")
        return {k: v.T if k.endswith(conv1d) else v for k, v in tensors.items()}

    rewrite(saved.root / "tuned" / "model.safetensors", tmp_path / "lin" / "model.safetensors", as_linear)
    linear = open_checkpoint(tmp_path / "lin")
    assert not linear.conv1d and "(96, 32)" in linear.layout_source
    with pytest.raises(CheckpointError, match=r"stores Conv1D weights \(in, out\) .*lin \(out, in\)"):
        plan_updates(open_checkpoint(saved.root / "base"), linear)


def test_tensor_missing_on_one_side(saved, tmp_path):
    name = "transformer.h.1.mlp.c_proj.weight"

    def drop(tensors):
        del tensors[name]

    for side in ("base", "tuned"):
        rewrite(saved.root / side / "model.safetensors", tmp_path / side / "model.safetensors", drop)
    cut_base, cut_tuned = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "tuned")
    with pytest.raises(CheckpointError, match=rf"{name}.*of BASE .*base/model\.safetensors is missing in TUNED"):
        plan_updates(open_checkpoint(saved.root / "base"), cut_tuned)
    with pytest.raises(CheckpointError, match=rf"{name}.*tuned/model\.safetensors is missing in BASE"):
        plan_updates(cut_base, open_checkpoint(saved.root / "tuned"))


def test_shape_mismatch(saved, tmp_path):
    def shrink(tensors):
        tensors[PLANTED + ".weight"] = tensors[PLANTED + ".weight"][:, :64]

    rewrite(saved.root / "tuned" / "model.safetensors", tmp_path / "t" / "model.safetensors", shrink)
    with pytest.raises(
        CheckpointError, match=rf"shape mismatch for '{PLANTED}': BASE .*\(32, 128\), TUNED .*\(32, 64\)"
    ):
        plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(tmp_path / "t"))


def test_dtype_not_floating(saved, tmp_path):
    name = "transformer.h.0.attn.c_proj.weight"

    def quantize(tensors):
        tensors[name] = (tensors[name] * 100).to(torch.int8)

    rewrite(saved.root / "tuned" / "model.safetensors", tmp_path / "t" / "model.safetensors", quantize)
    with pytest.raises(CheckpointError, match=rf"t/model\.safetensors: tensor '{name}' has dtype I8, not floating"):
        plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(tmp_path / "t"))


def test_corrupt_or_truncated_files(saved, tmp_path):
    data = (saved.root / "tuned" / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    variants = {
        "half": data[: len(data) // 2],
        "after_header": data[:header],  # header intact, no tensor data
        "header_cut": data[: header // 2],
        "garbage_header": data[:8] + b"{" * (header - 8) + data[header:],
        "empty": b"",
    }
    for label, blob in variants.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"{label}/model\.safetensors: corrupt or truncated") as info:
            open_checkpoint(folder)
        assert type(info.value) is CheckpointError


def test_file_truncated_after_opening(saved, tmp_path):
    folder = copy_folder(saved.root / "tuned", tmp_path / "t")
    tuned = open_checkpoint(folder)
    pairs = pair_updates(open_checkpoint(saved.root / "base"), tuned)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"t/model\.safetensors: cannot read tensor 'transformer\.h\.0\.attn"):
        next(pairs)


def test_sharded_checkpoint_with_a_missing_shard(saved, tmp_path):
    folder = copy_folder(saved.root / "tuned_sharded", tmp_path / "s")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in model\.safetensors\.index\.json"):
        open_checkpoint(folder)


def test_adapter_target_not_in_base(saved, adapters, tmp_path):
    folder = copy_folder(adapters["conv1d"].path, tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    rewrite(path, path, lambda t: {k.replace(".h.1.", ".h.7."): v for k, v in t.items()})
    with pytest.raises(
        CheckpointError,
        match=r"adapter .*a/adapter_model\.safetensors targets module 'transformer\.h\.7\.attn\.c_attn'",
    ):
        plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(folder))


def test_adapter_factor_shape_mismatch(saved, adapters, tmp_path):
    folder = copy_folder(adapters["conv1d"].path, tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"

    def widen(tensors):
        tensors[key] = torch.zeros(4, 48)

    rewrite(path, path, widen)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for 'transformer\.h\.0\.attn\.c_attn'.*\(96, 32\).*\(96, 48\)"
    ):
        plan_updates(open_checkpoint(saved.root / "base"), open_checkpoint(folder))


def test_unsupported_adapters(saved, adapters, tmp_path):
    dora = copy_folder(adapters["conv1d"].path, tmp_path / "dora")
    edit_json(dora / "adapter_config.json", use_dora=True)
    with pytest.raises(CheckpointError, match=r"dora/adapter_config\.json: LoRA variant use_dora=True"):
        open_checkpoint(dora)
    ia3 = copy_folder(adapters["conv1d"].path, tmp_path / "ia3")
    edit_json(ia3 / "adapter_config.json", peft_type="IA3")
    with pytest.raises(CheckpointError, match=r"peft_type 'IA3' is not supported"):
        open_checkpoint(ia3)


def test_adapter_in_the_wrong_place(saved, adapters, tmp_path):
    adapter = open_checkpoint(adapters["conv1d"].path)
    with pytest.raises(CheckpointError, match=r"BASE is a LoRA adapter"):
        plan_updates(adapter, open_checkpoint(saved.root / "base"))
    loose = tmp_path / "lora.safetensors"
    shutil.copy(adapters["conv1d"].path / "adapter_model.safetensors", loose)
    with pytest.raises(CheckpointError, match=r"lora\.safetensors: holds LoRA factors"):
        open_checkpoint(loose)
    # the adapter file itself opens its folder
    assert isinstance(open_checkpoint(adapters["conv1d"].path / "adapter_model.safetensors"), AdapterCheckpoint)
