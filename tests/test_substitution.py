"""Rank-k substitution on planted updates: W_t = W_0 + σ₁u₁v₁ᵀ + σ₂u₂v₂ᵀ with σ₁ ≫ σ₂.

The expected weights are built by hand from the planted factors (or from a float64 SVD of the
update actually stored), never from the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spectral_monitor.engine import SpectralMonitor
from spectral_monitor.errors import NonFiniteError
from spectral_monitor.run import MonitorRun
from spectral_monitor.substitution import rank_k_probe, substitute_, substituted

SIG = (5.0, 0.5)


# ------------------------------------------------------------------ helpers
def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def linear_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"q_proj": nn.Linear(24, 16, dtype=dtype), "v_proj": nn.Linear(16, 16, dtype=dtype)})


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def canonical(spec) -> torch.Tensor:
    return spec.canonical(spec.parameter().detach()).double().clone()


def set_canonical(spec, W: torch.Tensor) -> None:
    p = spec.parameter()
    with torch.no_grad():
        p.copy_((W.T if spec.transposed else W).to(p.dtype))


def plant(mon: SpectralMonitor, sig=SIG, seed: int = 0) -> dict[str, tuple]:
    """Set every monitored W_t = W_0 + Σ σ_i u_i v_iᵀ (W_0 from the store); returns name -> (W0, U, V), float64."""
    out = {}
    for i, spec in enumerate(mon.specs):
        m, n = spec.shape
        W0 = spec.canonical(mon.store.get(spec, torch.device("cpu"))).double()
        U, V = orthonormal(m, len(sig), seed + 2 * i), orthonormal(n, len(sig), seed + 2 * i + 1)
        set_canonical(spec, W0 + (U * torch.tensor(sig, dtype=torch.float64)) @ V.T)
        out[spec.name] = (W0, U, V)
    return out


def planted(model: nn.Module, **kw) -> tuple[SpectralMonitor, dict[str, tuple]]:
    mon = SpectralMonitor(model, rank=4, intruders=False, **kw)
    mon.snapshot()
    return mon, plant(mon)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN == NaN and -0.0 != 0.0)."""
    return t.detach().contiguous().view(torch.uint8)


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(bits(after[k]), bits(v)), k


def rank1(W0, U, V, c: float = 1.0) -> torch.Tensor:
    return W0 + c * SIG[0] * torch.outer(U[:, 0], V[:, 0])


MODELS = {"linear": linear_model, "gpt2_conv1d": gpt2}


# ------------------------------------------------------------------ dense and Conv1D
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_rank1_inside_then_bit_identical_after(make):
    model = make()
    mon, planted_ = planted(model)
    if make is gpt2:
        assert {s.kind for s in mon.specs} == {"conv1d"} and len(mon.specs) == 8
    before = clone_state(model)
    rng = torch.get_rng_state()
    with substituted(mon, rank=1) as info:
        for spec in mon.specs:
            W0, U, V = planted_[spec.name]
            torch.testing.assert_close(canonical(spec), rank1(W0, U, V), rtol=0, atol=2e-5)
            assert spec.parameter().dtype == torch.float32
            layer = info.layers[spec.name]
            total = math.hypot(*SIG)
            assert layer.rank == 1 and layer.scale == 1.0
            assert layer.update_norm == pytest.approx(total, rel=1e-5)
            assert layer.kept_norm == pytest.approx(SIG[0], rel=1e-5)
            assert layer.energy_share == pytest.approx(SIG[0] ** 2 / total**2, rel=1e-5)
            assert layer.norm_ratio == pytest.approx(SIG[0] / total, rel=1e-5)
        assert info.norm_ratio == pytest.approx(SIG[0] / math.hypot(*SIG), rel=1e-5)
        assert not info.skipped
        m = info.metrics()
        assert m["spectral/probe/substitution/energy_share"] == pytest.approx(SIG[0] ** 2 / (SIG[0] ** 2 + SIG[1] ** 2))
        assert f"spectral/probe/substitution/norm_ratio/{mon.specs[0].name}" in m
    assert_bit_identical(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_rescale_stretches_the_rank1_part_to_the_update_norm(make):
    model = make()
    mon, planted_ = planted(model)
    before = clone_state(model)
    c = math.hypot(*SIG) / SIG[0]
    with substituted(mon, rank=1, rescale=True) as info:
        for spec in mon.specs:
            W0, U, V = planted_[spec.name]
            torch.testing.assert_close(canonical(spec), rank1(W0, U, V, c), rtol=0, atol=2e-5)
            assert info.layers[spec.name].scale == pytest.approx(c, rel=1e-5)
            # the substituted update has the full update's norm
            assert float((canonical(spec) - W0).norm()) == pytest.approx(math.hypot(*SIG), rel=1e-5)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_rank0_is_the_base_exactly_and_full_rank_gives_wt_back(make):
    model = make()
    mon, _ = planted(model)
    before = clone_state(model)
    with substituted(mon, rank=0) as info:
        for spec in mon.specs:
            assert torch.equal(spec.parameter(), mon.store.get(spec, torch.device("cpu")))
            assert info.layers[spec.name].rank == 0 and info.layers[spec.name].kept_norm == 0.0
    with substituted(mon, rank=0, rescale=True):  # nothing to stretch: still the base
        for spec in mon.specs:
            assert torch.equal(spec.parameter(), mon.store.get(spec, torch.device("cpu")))
    for k in (2, 3, 10_000):  # at or above the true rank 2 (10_000 is clamped per layer)
        for exact in (False, True):
            with substituted(mon, rank=k, exact=exact):
                for spec in mon.specs:
                    torch.testing.assert_close(spec.parameter(), before[spec.param_name], rtol=0, atol=2e-5)
    assert_bit_identical(model, before)


def test_exact_svd_matches_the_randomized_one():
    model = gpt2()
    mon, _ = planted(model)
    for rescale in (False, True):
        with substituted(mon, rank=1, rescale=rescale, exact=True):
            exact = {s.name: canonical(s) for s in mon.specs}
        with substituted(mon, rank=1, rescale=rescale):
            for s in mon.specs:
                torch.testing.assert_close(canonical(s), exact[s.name], rtol=0, atol=2e-5)


def test_restored_when_the_body_raises():
    model = gpt2()
    mon, _ = planted(model)
    before = clone_state(model)
    with pytest.raises(KeyError, match="boom"), substituted(mon, rank=1):
        assert not torch.equal(mon.specs[0].parameter(), before[mon.specs[0].param_name])
        raise KeyError("boom")
    assert_bit_identical(model, before)


def test_gpt2_forward_inside_matches_a_hand_built_model():
    model = gpt2().eval()
    mon, planted_ = planted(model)
    hand = copy.deepcopy(model)
    hand_specs = {s.name: s for s in SpectralMonitor(hand, intruders=False).specs}
    for name, (W0, U, V) in planted_.items():
        set_canonical(hand_specs[name], rank1(W0, U, V))
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        want = hand(ids).logits
        full = model(ids).logits
        with substituted(mon, rank=1):
            got = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, full)


def test_substitute_keeps_the_weights_storage_and_optimizer_state():
    model = linear_model()
    mon, planted_ = planted(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(3))
    model["v_proj"](model["q_proj"](x)).square().mean().backward()
    opt.step()
    plant(mon)  # the step moved the weights: plant again on top of the same base
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    ptrs = {s.name: s.parameter().data_ptr() for s in mon.specs}
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("bias")}
    info = substitute_(mon, rank=1)
    for spec in mon.specs:
        W0, U, V = planted_[spec.name]
        torch.testing.assert_close(canonical(spec), rank1(W0, U, V), rtol=0, atol=2e-5)
        assert spec.parameter().data_ptr() == ptrs[spec.name]
        assert spec.parameter().requires_grad
    assert info.layers["q_proj"].rank == 1
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, moments[id(p)][k])
    for k, v in biases.items():  # unmonitored parameters stay trained
        assert torch.equal(model.state_dict()[k], v)
    # a later measurement sees the rank-1 update
    report = mon.measure(2)
    assert report.metrics["spectral/rho1/q_proj"] == pytest.approx(1.0, abs=1e-5)


def test_substitute_is_all_or_nothing_and_nonfinite_layers_are_skipped():
    model = linear_model()
    mon, _ = planted(model)
    with torch.no_grad():
        model["v_proj"].weight[0, 0] = float("nan")
    before = clone_state(model)
    with pytest.raises(NonFiniteError, match="v_proj"):
        substitute_(mon, rank=1, strict=True)  # q_proj was written first, then v_proj failed
    assert_bit_identical(model, before)
    info = substitute_(mon, rank=1)  # not strict: the bad layer is left as trained
    assert "v_proj" in info.skipped and "q_proj" in info.layers
    assert torch.equal(bits(model["v_proj"].weight), bits(before["v_proj.weight"]))
    assert not torch.equal(model["q_proj"].weight, before["q_proj.weight"])


def test_bf16_weights():
    model = linear_model(torch.bfloat16)
    mon, planted_ = planted(model)
    before = clone_state(model)
    with substituted(mon, rank=1) as info:
        for spec in mon.specs:
            p = spec.parameter()
            assert p.dtype == torch.bfloat16
            W0 = mon.store.get(spec, p.device).double()
            # oracle: top singular triple of the stored (bf16-rounded) update, in float64
            Dt = before[spec.param_name].double() - W0
            U, S, Vh = torch.linalg.svd(Dt)
            want = (W0 + S[0] * torch.outer(U[:, 0], Vh[0])).to(torch.bfloat16)
            diff = (p.double() - want.double()).abs().max()
            assert diff <= 2 * 2**-8 * want.double().abs().max()  # a couple of bf16 ulps
            _, Up, Vp = planted_[spec.name]
            planted_part = SIG[0] * torch.outer(Up[:, 0], Vp[:, 0])
            assert float((p.detach().double() - W0 - planted_part).norm()) < 0.05 * SIG[0]
            assert info.layers[spec.name].energy_share == pytest.approx(SIG[0] ** 2 / sum(s * s for s in SIG), rel=1e-2)
    with substituted(mon, rank=0):
        for spec in mon.specs:
            assert torch.equal(spec.parameter(), mon.store.get(spec, torch.device("cpu")))
    assert_bit_identical(model, before)


# ------------------------------------------------------------------ unmonitored parameters
def test_revert_unmonitored_needs_a_full_base_and_restores():
    model = gpt2()
    base_sd = clone_state(model)
    mon, planted_ = planted(model)
    with torch.no_grad():  # "training" moved embeddings, norms and biases too
        model.transformer.wte.weight.add_(0.1)
        model.transformer.ln_f.weight.add_(0.1)
        model.transformer.h[0].attn.c_attn.bias.add_(0.1)
    before = clone_state(model)
    with pytest.raises(ValueError, match="base_state_dict"), substituted(mon, rank=1, revert_unmonitored=True):
        pass
    partial = {k: v for k, v in base_sd.items() if k != "transformer.ln_f.weight"}
    with substituted(mon, rank=1, revert_unmonitored=True, base_state_dict=partial) as info:
        assert torch.equal(model.transformer.wte.weight, base_sd["transformer.wte.weight"])  # tied lm_head too
        assert torch.equal(model.lm_head.weight, base_sd["transformer.wte.weight"])
        assert torch.equal(model.transformer.h[0].attn.c_attn.bias, base_sd["transformer.h.0.attn.c_attn.bias"])
        assert set(info.reverted) == {"transformer.wte.weight", "transformer.h.0.attn.c_attn.bias"}
        assert info.not_reverted == ["transformer.ln_f.weight"]
        spec = mon.specs[0]
        W0, U, V = planted_[spec.name]
        torch.testing.assert_close(canonical(spec), rank1(W0, U, V), rtol=0, atol=2e-5)
    assert_bit_identical(model, before)
    # default: unmonitored parameters stay trained
    with substituted(mon, rank=1):
        assert torch.equal(model.transformer.ln_f.weight, before["transformer.ln_f.weight"])


def test_revert_unmonitored_from_the_reference_module():
    model = gpt2()
    ref = copy.deepcopy(model)
    mon = SpectralMonitor(model, intruders=False, reference=ref)
    mon.snapshot()
    assert mon.store.kind == "reference"
    plant(mon)
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(1.0)
    before = clone_state(model)
    with substituted(mon, rank=0, revert_unmonitored=True) as info:  # the whole model is W_0
        assert info.reverted == ["transformer.ln_f.bias"]
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    assert_bit_identical(model, before)


# ------------------------------------------------------------------ probe
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_rank_k_probe_keys_values_and_no_side_effects():
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.randn(32, 8, generator=gen), torch.randn(32, 6, generator=gen)

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = model(X)
        return {"loss": float((out - Y).square().mean()), "out_mean": out.mean()}  # a tensor is accepted

    model = Tiny()
    run = MonitorRun(model, rank=4, intruders=False)
    run.start()
    mon = run.monitor
    planted_ = plant(mon)
    with torch.no_grad():
        model.fc1.bias.add_(0.05)  # trained bias: stays trained in every variant
    before = clone_state(model)

    # hand-built oracles: the rank-1 model and the base model
    hand1, hand0 = copy.deepcopy(model), copy.deepcopy(model)
    for spec in mon.specs:
        W0, U, V = planted_[spec.name]
        getattr(hand1, spec.name).weight.data.copy_(rank1(W0, U, V).float())
        getattr(hand0, spec.name).weight.data.copy_(mon.store.get(spec, torch.device("cpu")))
    rng = torch.get_rng_state()
    probe = rank_k_probe(run, evaluate, ranks=(1, 2), include_base=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_bit_identical(model, before)

    full, base = evaluate(model)["loss"], evaluate(hand0)["loss"]
    r1 = evaluate(hand1)["loss"]
    assert probe["spectral/probe/full/loss"] == full
    assert probe["spectral/probe/base/loss"] == pytest.approx(base, rel=1e-6)
    assert probe["spectral/probe/rank1/loss"] == pytest.approx(r1, rel=1e-5)
    assert probe["spectral/probe/rank2/loss"] == pytest.approx(full, rel=1e-5)  # rank 2 = the whole update
    assert probe["spectral/probe/rank1/loss_share"] == pytest.approx((r1 - base) / (full - base), rel=1e-4)
    assert probe["spectral/probe/rank2/loss_share"] == pytest.approx(1.0, abs=1e-4)
    assert "spectral/probe/rank1/out_mean" in probe
    assert all(isinstance(v, float) for v in probe.values())

    rescaled = rank_k_probe(mon, evaluate, rescale=True)
    assert set(rescaled) == {
        "spectral/probe/full/loss",
        "spectral/probe/full/out_mean",
        "spectral/probe/rank1_rescaled/loss",
        "spectral/probe/rank1_rescaled/out_mean",
    }
    assert_bit_identical(model, before)

    # the values go into the run's context and come out in the next report
    run.record_context(probe)
    report = run.on_optimizer_step(25).report
    assert report.metrics["spectral/probe/rank1/loss_share"] == pytest.approx(probe["spectral/probe/rank1/loss_share"])


def test_probe_share_is_nan_without_a_gain_and_arguments_are_checked():
    model = Tiny()
    mon = SpectralMonitor(model, intruders=False)
    with pytest.raises(RuntimeError, match="snapshot"), substituted(mon):
        pass
    mon.snapshot()  # nothing trained yet: full == base
    probe = rank_k_probe(mon, lambda m: {"x": 1.0}, include_base=True)
    assert math.isnan(probe["spectral/probe/rank1/x_share"])
    with pytest.raises(ValueError, match="rank"):
        substitute_(mon, rank=-1)
    with pytest.raises(ValueError, match="rank"):
        rank_k_probe(mon, lambda m: {"x": 1.0}, ranks=(1.5,))
    with pytest.raises(TypeError, match="mapping"):
        rank_k_probe(mon, lambda m: 1.0)
    with pytest.raises(TypeError, match="SpectralMonitor"):
        substitute_(model)
    with substituted(mon, rank=1) as info:  # zero update: defined, nothing moves
        assert info.layers["fc1"].update_norm == 0.0 and math.isnan(info.layers["fc1"].energy_share)


# ------------------------------------------------------------------ LoRA
peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.q_proj = nn.Linear(12, 10)
        self.v_proj = nn.Linear(12, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.v_proj(x)


LSIG = (5.0, 1.0, 0.3, 0.1)


def lora_model(**kw) -> nn.Module:
    return peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))


def set_lora(layer, adapter: str, sig, seed: int) -> torch.Tensor:
    """Factors with scale·B·A = U diag(sig) Vᵀ (mixed by a random invertible R); returns that dense ΔW."""
    m = layer.lora_B[adapter].weight.shape[0]
    n = layer.lora_A[adapter].weight.shape[1]
    U, V = orthonormal(m, len(sig), seed), orthonormal(n, len(sig), seed + 1)
    R = torch.randn(len(sig), len(sig), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    R = R + 3 * torch.eye(len(sig), dtype=torch.float64)
    scale = layer.scaling[adapter]
    B = (U * torch.tensor(sig, dtype=torch.float64)) @ R / scale
    A = torch.linalg.solve(R, V.T)
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_(B)
        layer.lora_A[adapter].weight.copy_(A)
    return scale * layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()


def lora_dense(layer) -> torch.Tensor:
    """Σ_a s_a B_a A_a over active adapters, float64, canonical."""
    return sum(
        layer.scaling[a] * layer.lora_B[a].weight.double() @ layer.lora_A[a].weight.double()
        for a in layer.active_adapters
    )


def truncate(D: torch.Tensor, k: int, rescale: bool = False) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D)
    Dk = (U[:, :k] * S[:k]) @ Vh[:k]
    return Dk * (D.norm() / Dk.norm()) if rescale else Dk


def test_lora_writes_the_rank_k_update_into_the_factors():
    model = lora_model()
    mon = SpectralMonitor(model, rank=4, intruders=False)
    assert mon.snapshot() is None and all(s.kind == "lora" for s in mon.specs)
    layers = {s.name: s.module for s in mon.specs}
    dense = {name: set_lora(layer, "default", LSIG, seed=i) for i, (name, layer) in enumerate(layers.items())}
    before = clone_state(model)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))
    for k in (1, 2):
        for rescale in (False, True):
            with substituted(mon, rank=k, rescale=rescale) as info:
                for name, layer in layers.items():
                    want = truncate(dense[name], k, rescale)
                    torch.testing.assert_close(lora_dense(layer), want, rtol=0, atol=2e-5)
                    assert torch.equal(layer.get_base_layer().weight, before[f"{name}.base_layer.weight"])
                    sub = info.layers[name]
                    assert sub.kind == "lora" and sub.rank == k
                    assert sub.energy_share == pytest.approx(sum(s * s for s in LSIG[:k]) / sum(s * s for s in LSIG))
                # the model's own forward is the dense computation W_0 + c·ΔW_k
                q, v = layers["base_model.model.q_proj"], layers["base_model.model.v_proj"]
                Wq = q.get_base_layer().weight.double() + truncate(dense["base_model.model.q_proj"], k, rescale)
                Wv = v.get_base_layer().weight.double() + truncate(dense["base_model.model.v_proj"], k, rescale)
                want_out = x.double() @ (Wq + Wv).T + q.get_base_layer().bias.double()
                with torch.no_grad():
                    torch.testing.assert_close(model(x).double(), want_out, rtol=1e-5, atol=1e-5)
            assert_bit_identical(model, before)
    with substituted(mon, rank=0):
        for layer in layers.values():
            assert not layer.lora_B["default"].weight.any()
        with torch.no_grad():
            base_out = model.base_model.model.q_proj.get_base_layer()(
                x
            ) + model.base_model.model.v_proj.get_base_layer()(x)
            assert torch.equal(model(x), base_out)
    with substituted(mon, rank=4):  # the full rank: W_t again
        for name, layer in layers.items():
            torch.testing.assert_close(lora_dense(layer), dense[name], rtol=0, atol=2e-5)
    assert_bit_identical(model, before)


def test_lora_two_adapters_rank_beyond_the_first_adapter():
    model = lora_model()
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    mon = SpectralMonitor(model, rank=8, intruders=False)
    mon.snapshot()
    layer = mon.specs[0].module
    assert list(layer.active_adapters) == ["default", "second"]
    set_lora(layer, "default", LSIG, seed=1)
    set_lora(layer, "second", (2.0, 0.7, 0.2), seed=5)
    dense = lora_dense(layer)
    before = clone_state(model)
    for k in (1, 5, 7):  # 5 and 7 need both adapters (r = 4 + 3)
        with substituted(mon, rank=k) as info:
            torch.testing.assert_close(lora_dense(layer), truncate(dense, k), rtol=0, atol=2e-5)
            assert info.layers[mon.specs[0].name].rank == k
        assert_bit_identical(model, before)


def test_lora_on_gpt2_conv1d_fan_in_fan_out_forward():
    model = peft.get_peft_model(
        gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    mon = SpectralMonitor(model, rank=4, intruders=False)
    mon.snapshot()
    name = "base_model.model.transformer.h.0.attn.c_attn"
    layer = dict(model.named_modules())[name]
    dense = set_lora(layer, "default", LSIG, seed=3)  # canonical (out=192, in=64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    before = clone_state(model)
    with substituted(mon, rank=1), torch.no_grad():
        base = layer.get_base_layer()
        want = x.double() @ (base.weight.double() + truncate(dense, 1).T) + base.bias.double()  # stored (in, out)
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert_bit_identical(model, before)


def test_lora_periodic_mode_keeps_the_adapter_trainable():
    model = lora_model()
    mon = SpectralMonitor(model, rank=4, intruders=False)
    mon.snapshot()
    layer = mon.specs[0].module
    dense = set_lora(layer, "default", LSIG, seed=1)
    substitute_(mon, rank=1)
    torch.testing.assert_close(lora_dense(layer), truncate(dense, 1), rtol=0, atol=2e-5)
    B = layer.lora_B["default"].weight
    assert not B[:, 1:].any()  # the rank-1 part lives in the first component
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    model(x).square().sum().backward()
    assert B.grad[:, 1:].abs().sum() > 0  # the other LoRA directions still learn


def test_lora_variants_are_skipped_or_raise():
    model = lora_model(use_dora=True)
    mon = SpectralMonitor(model, rank=4, intruders=False)
    mon.snapshot()
    before = clone_state(model)
    with substituted(mon, rank=1) as info:
        assert set(info.skipped) == {s.name for s in mon.specs} and "DoRA" in next(iter(info.skipped.values()))
        assert_bit_identical(model, before)
    with pytest.raises(ValueError, match="DoRA"):
        substitute_(mon, rank=1, strict=True)
    assert_bit_identical(model, before)
