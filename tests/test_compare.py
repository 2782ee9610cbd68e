"""``spectral-monitor compare``: two real checkpoints written by save_pretrained, one planted update."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spectral_monitor.compare import compare, main  # noqa: E402
from spectral_monitor.config import MonitorConfig  # noqa: E402
from spectral_monitor.sinks.jsonl import read_jsonl  # noqa: E402
from tests.integrations.conftest import build_tiny_gpt2  # noqa: E402

PLANTED = "transformer.h.1.mlp.c_fc"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """BASE (one file), TUNED (sharded) with a rank-1 update of norm 2 in one matrix, an adapter."""
    root = tmp_path_factory.mktemp("ckpt")
    base = build_tiny_gpt2(seed=0)
    base.save_pretrained(root / "base")
    tuned = build_tiny_gpt2(seed=0)
    gen = torch.Generator().manual_seed(3)
    layer = tuned.get_submodule(PLANTED)  # Conv1D: weight stored (in, out)
    u, v = torch.randn(layer.nf, generator=gen), torch.randn(layer.nx, generator=gen)
    with torch.no_grad():
        layer.weight += 2.0 * torch.outer(v / v.norm(), u / u.norm())
    tuned.save_pretrained(root / "tuned", max_shard_size="40KB")
    return root


def test_the_planted_layer_reads_rank_one_and_the_others_no_update(checkpoints):
    report = compare(checkpoints / "base", checkpoints / "tuned", config=MonitorConfig(rank=8), device="cpu")
    assert len(list((checkpoints / "tuned").glob("model-*.safetensors"))) > 1  # really sharded
    assert len(report.layers) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    planted = report.layers[PLANTED]
    assert planted["update_norm"] == pytest.approx(2.0, rel=1e-5)
    assert planted["rho1"] == pytest.approx(1.0, abs=1e-5) and planted["sigma1"] == pytest.approx(2.0, rel=1e-5)
    for name, values in report.layers.items():
        if name != PLANTED:
            assert values["update_norm"] == 0.0, name
    assert report.model["layers"] == 1.0 and report.model["zero_update"] == 7.0


def test_a_peft_adapter_is_compared_from_its_factors(checkpoints, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        build_tiny_gpt2(seed=0), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    report = compare(checkpoints / "base", tmp_path / "adapter", device="cpu")
    assert set(report.layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    for name, values in report.layers.items():
        delta = merged.get_submodule(name).weight.detach().T - build_tiny_gpt2(seed=0).get_submodule(name).weight.T
        assert values["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
        assert values["rank"] == 2.0 and values["erank_exact"] == 1.0


def test_cli_writes_the_table_jsonl_csv_and_report(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(checkpoints / "base"), str(checkpoints / "tuned"), "--out", str(out), "--rank", "8"]) == 0
    printed = capsys.readouterr().out
    assert PLANTED in printed and "[up]" in printed
    [report] = read_jsonl(out / "compare.jsonl")
    assert report.layers[PLANTED]["rho1"] == pytest.approx(1.0, abs=1e-5)
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "layer" and "rho1" in header
    if pytest.importorskip("matplotlib"):
        assert (out / "report.html").stat().st_size > 1000


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda root, tmp: (root / "base", tmp / "missing"), "no such file or folder"),
        (lambda root, tmp: (root / "base", _other_model(tmp)), "shape"),
        (lambda root, tmp: (root / "base", _truncated(root, tmp)), "model.safetensors"),
    ],
)
def test_bad_checkpoints_get_one_clear_error(checkpoints, tmp_path, capsys, make, shown):
    base, tuned = make(checkpoints, tmp_path)
    assert main([str(base), str(tuned), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "spectral-monitor compare: error:" in err and shown in err and "Traceback" not in err


def _other_model(tmp):
    build_tiny_gpt2(seed=0, n_embd=32).save_pretrained(tmp / "other")
    return tmp / "other"


def _truncated(root, tmp):
    import shutil

    shutil.copytree(root / "base", tmp / "cut")
    path = tmp / "cut" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return tmp / "cut"
