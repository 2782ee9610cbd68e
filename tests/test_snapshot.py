"""Base-weight stores give back exactly the snapshot weights while the model trains on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from spectral_monitor.errors import BaseMismatchError
from spectral_monitor.layers import select_layers
from spectral_monitor.snapshot import (
    CPUStore,
    DeviceStore,
    DiskStore,
    ReferenceStore,
    load_store,
    make_store,
    persist,
    strip_wrappers,
)


class Net(nn.Module):
    """Two blocks of Linear layers plus an embedding and a head (excluded by default)."""

    def __init__(self, d: int = 12, hidden: int = 20, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(d, hidden), "down_proj": nn.Linear(hidden, d)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(d, 10)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = h + block["down_proj"](torch.tanh(block["up_proj"](h)))
        return self.lm_head(h)


def train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 10, (4, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot_weights(specs) -> dict[str, torch.Tensor]:
    return {s.param_name: s.parameter().detach().clone() for s in specs}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("kind", ["device", "cpu", "disk"])
def test_store_returns_exact_snapshot_after_training(model, kind, tmp_path):
    specs = select_layers(model)
    assert len(specs) == 4
    before = snapshot_weights(specs)
    store = make_store(kind, specs, base_dir=str(tmp_path))
    assert store.kind == kind
    train(model)
    for spec in specs:
        assert not torch.equal(spec.parameter(), before[spec.param_name])  # the model did move
        got = store.get(spec, torch.device("cpu"))
        assert got.dtype == before[spec.param_name].dtype
        assert torch.equal(got, before[spec.param_name])
        assert got.data_ptr() != spec.parameter().data_ptr()
    if kind == "disk":
        assert store.nbytes == 0
        described = store.describe()
        assert described["kind"] == "disk" and described["nbytes"] == 0
        path = Path(described["path"])  # one file per run in base_dir
        assert path.parent == tmp_path and path.name.startswith("base-") and path.suffix == ".safetensors"
    else:
        assert store.nbytes == sum(t.numel() * 4 for t in before.values())


def test_disk_store_file_round_trip_and_manifest(model, tmp_path):
    specs = select_layers(model)
    before = snapshot_weights(specs)
    path = tmp_path / "sub" / "base.safetensors"
    DiskStore.snapshot(specs, path)
    assert path.exists() and not path.with_name(path.name + ".tmp").exists()
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["params"] == {k: list(v.shape) for k, v in before.items()}
    assert isinstance(manifest["fingerprint"], str) and len(manifest["fingerprint"]) == 16
    train(model)
    reopened = DiskStore(path)
    reopened.check(specs)
    for spec in specs:
        assert torch.equal(reopened.get(spec, torch.device("cpu")), before[spec.param_name])


def test_disk_store_check_names_first_mismatch_and_both_shapes(model, tmp_path):
    specs = select_layers(model)
    DiskStore.snapshot(specs, tmp_path / "base.safetensors")
    store = DiskStore(tmp_path / "base.safetensors")
    other = Net(hidden=24)  # every up/down layer changes shape
    with pytest.raises(BaseMismatchError) as info:
        store.check(select_layers(other))
    msg = str(info.value)
    assert "'layers.0.up_proj.weight'" in msg
    assert "(20, 12)" in msg and "(24, 12)" in msg
    assert "layers.1" not in msg
    # a parameter the file does not hold at all is named too
    with pytest.raises(BaseMismatchError, match=re.escape("no parameter 'lm_head.weight'")):
        store.check(select_layers(model, ["lm_head"]))


def test_reference_store_holds_no_copy_and_rejects_other_shapes(model):
    specs = select_layers(model)
    reference = Net()
    reference.load_state_dict(model.state_dict())
    store = make_store("auto", specs, reference=reference)
    assert isinstance(store, ReferenceStore) and store.kind == "reference"
    assert store.nbytes == 0
    train(model)
    for spec in specs:
        ref_param = dict(reference.named_parameters())[spec.param_name]
        got = store.get(spec, torch.device("cpu"))
        assert torch.equal(got, ref_param) and got.data_ptr() == ref_param.data_ptr()  # no copy on the same device
    with pytest.raises(BaseMismatchError) as info:
        ReferenceStore(Net(hidden=8), specs)
    msg = str(info.value)
    assert "'layers.0.up_proj.weight'" in msg and "(8, 12)" in msg and "(20, 12)" in msg
    assert "reference" in msg


def test_reference_store_reads_a_ddp_wrapped_reference():
    torch.manual_seed(0)
    model = Net()
    # reference wrapped like DDP: parameters are named "module.<name>"
    wrapped = nn.Module()
    wrapped.module = Net()
    wrapped.module.load_state_dict(model.state_dict())
    store = ReferenceStore(wrapped, select_layers(model))
    spec = select_layers(model)[0]
    assert torch.equal(store.get(spec, torch.device("cpu")), spec.parameter())


@pytest.mark.parametrize(
    ("name", "stripped"),
    [
        ("module.model.layers.0.weight", "model.layers.0.weight"),
        ("_orig_mod.module.x.weight", "x.weight"),
        ("_fsdp_wrapped_module.model.layers.0.weight", "model.layers.0.weight"),
        ("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.q.weight", "model.layers.0.q.weight"),
        ("net.submodule.weight", "net.submodule.weight"),  # a real name ending in "module" is kept
        ("plain.weight", "plain.weight"),
    ],
)
def test_strip_wrappers_removes_whole_components_only(name, stripped):
    assert strip_wrappers(name) == stripped


def test_make_store_auto_kinds_and_errors(model, tmp_path):
    specs = select_layers(model)
    assert isinstance(make_store("auto", specs), DeviceStore)
    assert isinstance(make_store("auto", specs, reference=model), ReferenceStore)
    assert isinstance(make_store("cpu", specs), CPUStore)
    with pytest.raises(BaseMismatchError, match="needs a reference module"):
        make_store("reference", specs)
    with pytest.raises(BaseMismatchError, match="not LoRA layers"):
        make_store("lora", specs)
    with pytest.raises(BaseMismatchError, match="base_dir"):
        make_store("disk", specs)
    assert make_store("device", []) is None  # nothing dense to store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["device", "cpu", "disk"])
def test_persist_then_load_store_round_trip(kind, dtype, tmp_path):
    torch.manual_seed(0)
    model = Net(dtype=dtype)
    specs = select_layers(model)
    before = snapshot_weights(specs)
    store = make_store("cpu", specs)
    path = persist(store, specs, tmp_path / "persisted" / "base.safetensors")
    assert path.exists()
    train(model)
    loaded = load_store(path, kind, specs)
    assert loaded.kind == kind
    for spec in specs:
        got = loaded.get(spec, torch.device("cpu"))
        assert got.dtype == dtype and torch.equal(got, before[spec.param_name])
    # a disk store persists as itself
    disk = make_store("disk", specs, base_dir=str(tmp_path / "d"))
    assert persist(disk, specs, tmp_path / "elsewhere.safetensors") == disk.path
    assert not (tmp_path / "elsewhere.safetensors").exists()


def test_load_store_rejects_a_base_from_another_model(model, tmp_path):
    specs = select_layers(model)
    path = persist(make_store("device", specs), specs, tmp_path / "base.safetensors")
    with pytest.raises(BaseMismatchError, match=re.escape("layers.0.up_proj.weight")):
        load_store(path, "device", select_layers(Net(hidden=7)))
