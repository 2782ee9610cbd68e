"""Tests of spectral_monitor.probes.Probe against direct float64 computations with a kept copy of the base."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from spectral_monitor.errors import BaseMismatchError, ConfigError
from spectral_monitor.probes import Probe, ProbeResult

F64 = torch.float64
V = 14  # vocabulary of the tiny models


def _gpt2(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=V,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batches(n: int = 2, rows: int = 4, T: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded random sequences; the first 3 tokens of each row are a prompt that does not count."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, V, (rows, T), generator=g)
        lengths = torch.randint(T // 2, T + 1, (rows,), generator=g)
        attn = (torch.arange(T)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(attn == 0, 0)
        labels = ids.masked_fill(attn == 0, -100)
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return out


def _perturb(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _train(model: nn.Module, batches: list[dict], steps: int, lr: float = 0.05) -> nn.Module:
    out = copy.deepcopy(model).train()
    opt = torch.optim.SGD(out.parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        out(**batches[i % len(batches)]).loss.backward()
        opt.step()
    return out.eval()


def _direct(base: nn.Module, model: nn.Module, batches: list[dict], k: int) -> dict[str, float]:
    """Full-vocabulary float64 KL, the bucketed KL (base's top-k + tail, by plain sums), NLL and top-1 agreement."""
    tot = {"full": 0.0, "bucketed": 0.0, "nll": 0.0, "agree": 0.0, "n": 0}
    with torch.no_grad():
        for b in batches:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            mask = b["labels"][:, 1:] != -100
            lb = base(**inputs).logits[:, :-1][mask].to(F64)
            lm = model(**inputs).logits[:, :-1][mask].to(F64)
            lp, lq = torch.log_softmax(lb, -1), torch.log_softmax(lm, -1)
            p, q = lp.exp(), lq.exp()
            terms = p * (lp - lq)
            keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, lp.topk(min(k, V), -1).indices, True)
            pT, qT = (p * ~keep).sum(-1), (q * ~keep).sum(-1)
            tail = torch.where(pT > 0, pT * (pT.log() - qT.log()), 0.0)
            tot["full"] += float(terms.sum())
            tot["bucketed"] += float((terms * keep).sum() + tail.sum())
            tot["nll"] += float(-lq.gather(-1, b["labels"][:, 1:][mask].unsqueeze(-1)).sum())
            tot["agree"] += float((lm.argmax(-1) == lb.argmax(-1)).sum())
            tot["n"] += int(mask.sum())
    n = tot["n"]
    return {"full": tot["full"] / n, "bucketed": tot["bucketed"] / n, "loss": tot["nll"] / n, "agree": tot["agree"] / n}


# --------------------------------------------------------------------------- against direct computations


@pytest.mark.parametrize("k", [V, 64])
def test_kl_loss_top1_match_a_direct_computation_when_k_covers_the_vocabulary(k: int) -> None:
    base, batches = _gpt2(), _batches()
    model = _perturb(base, 0.05)
    probe = Probe(batches, k=k)
    start = probe.start(base)
    res = probe.measure(model)
    oracle = _direct(base, model, batches, k)
    assert oracle["full"] > 1e-3  # the perturbation moved the distribution
    assert res.kl == pytest.approx(oracle["full"], rel=1e-5, abs=1e-7)
    assert res.loss == pytest.approx(oracle["loss"], rel=1e-6)
    assert res.top1_agree == pytest.approx(oracle["agree"], abs=1e-12)
    assert res.loss_rel == pytest.approx(res.loss / start.loss - 1.0, rel=1e-12)
    assert res.tokens == start.tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_base_loss_equals_the_models_own_loss() -> None:
    base, batch = _gpt2(), _batches(n=1)[0]
    start = Probe([batch]).start(base)
    with torch.no_grad():
        hf_loss = float(base(**batch).loss)  # HF shifts and ignores -100 by itself
    assert start.loss == pytest.approx(hf_loss, rel=1e-6)
    assert (start.kl, start.loss_rel, start.top1_agree) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("k", [1, 3])
def test_small_k_gives_the_bucketed_lower_bound(k: int) -> None:
    base, batches = _gpt2(), _batches()
    model = _perturb(base, 0.2)
    probe = Probe(batches, k=k)
    probe.start(base)
    res = probe.measure(model)
    oracle = _direct(base, model, batches, k)
    assert res.kl == pytest.approx(oracle["bucketed"], rel=1e-5, abs=1e-7)
    assert res.kl < oracle["full"] - 1e-3  # a strict lower bound here, not equal by accident


def test_unchanged_model_reads_zero() -> None:
    base, batches = _gpt2(), _batches()
    probe = Probe(batches, k=4)
    start = probe.start(base)
    res = probe.measure(base)
    # the same forwards and the same float32 arithmetic as start(): exactly 0, not just small
    assert res.kl == 0.0 and res.loss_rel == 0.0 and res.loss == start.loss
    assert res.top1_agree == 1.0


def test_perturbations_move_the_numbers_in_the_expected_direction() -> None:
    base, batches = _gpt2(), _batches()
    probe = Probe(batches, k=V)
    probe.start(base)
    kls = [probe.measure(_perturb(base, s)).kl for s in (0.01, 0.05, 0.2)]
    assert 0 < kls[0] < kls[1] < kls[2]
    # fitting the probe data itself lowers its loss below the base's, and moves further with more steps
    short, long = probe.measure(_train(base, batches, 3)), probe.measure(_train(base, batches, 12))
    assert short.loss_rel < 0 and long.loss_rel < short.loss_rel
    assert 0 < short.kl < long.kl
    assert long.top1_agree < 1.0


# --------------------------------------------------------------------------- model state


def test_train_modes_and_rng_are_restored_also_on_errors() -> None:
    model = _gpt2(dropout=0.3).train()
    model.transformer.h[0].eval()  # mixed modes must come back per module
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []

    def metric(m: nn.Module) -> float:
        seen.append(any(x.training for x in m.modules()))
        return float(torch.rand(()))  # consumes the global RNG

    probe = Probe(_batches(), metrics={"draw": metric})
    probe.start(model)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = probe.measure(model)
    assert torch.equal(torch.rand(4), expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    second = probe.measure(model)
    assert seen == [False, False, False]  # eval mode inside
    assert second.kl == first.kl == 0.0  # dropout 0.3 was off in every forward

    def broken(m: nn.Module) -> float:
        torch.rand(10)
        raise RuntimeError("metric failed")

    probe = Probe(_batches(), metrics={"broken": broken})
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="metric failed"):
        probe.start(model)
    assert torch.equal(torch.rand(4), expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not probe.has_base
    assert torch.is_grad_enabled()


def test_forward_gets_no_labels_and_no_cache() -> None:
    model = _gpt2()
    calls = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True)
    Probe(_batches(n=1)).start(model)
    assert calls == [["attention_mask", "input_ids", "use_cache"]]
    calls.clear()
    Probe(_batches(n=1), forward_kwargs={}).start(model)
    assert calls == [["attention_mask", "input_ids"]]


# --------------------------------------------------------------------------- micro-batching and state


def test_micro_batching_gives_the_same_numbers() -> None:
    base, batches = _gpt2(), _batches(n=2, rows=5, T=12)
    model = _perturb(base, 0.1)
    rows_seen = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    whole, split = Probe(batches, k=3), Probe(batches, k=3, max_tokens_per_forward=24)
    whole.start(base)
    split.start(base)
    torch.testing.assert_close(split._logp, whole._logp, rtol=1e-5, atol=1e-6)
    a = whole.measure(model)
    rows_seen.clear()
    b = split.measure(model)
    assert rows_seen == [2, 2, 1, 2, 2, 1]  # 24 tokens // T = 12 -> 2 rows per forward
    assert b.kl == pytest.approx(a.kl, rel=1e-5)
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    assert b.top1_agree == a.top1_agree and b.tokens == a.tokens
    one_row = Probe(batches, k=3, max_tokens_per_forward=1)  # below one row: still one row at a time
    one_row.start(base)
    assert one_row.measure(model).kl == pytest.approx(a.kl, rel=1e-5)


def test_state_round_trip_through_torch_save() -> None:
    base, batches = _gpt2(), _batches()
    model = _perturb(base, 0.1)
    probe = Probe(batches, k=5, metrics={"one": lambda m: 1.0})
    probe.start(base)
    buf = io.BytesIO()
    torch.save(probe.state_dict(), buf)
    buf.seek(0)
    resumed = Probe(copy.deepcopy(batches), k=5, metrics={"one": lambda m: 1.0})
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.has_base and resumed.base == probe.base
    a, b = probe.measure(model), resumed.measure(model)
    assert (a.kl, a.loss, a.loss_rel, a.top1_agree, a.metrics) == (b.kl, b.loss, b.loss_rel, b.top1_agree, b.metrics)
    # a cache from other batches, another k or another shift is refused
    other = _batches(seed=1)
    with pytest.raises(BaseMismatchError, match="other batches"):
        Probe(other, k=5).load_state_dict(probe.state_dict())
    with pytest.raises(BaseMismatchError, match="k=5"):
        Probe(batches, k=6).load_state_dict(probe.state_dict())
    with pytest.raises(BaseMismatchError, match="shift"):
        Probe(batches, k=5, shift=False).load_state_dict(probe.state_dict())
    # a state saved before start() restores "no base"
    empty = Probe(batches, k=5).state_dict()
    resumed.load_state_dict(empty)
    assert not resumed.has_base and resumed.cache_bytes == 0


def test_cache_bytes() -> None:
    base, batches = _gpt2(), _batches()
    small, full = Probe(batches, k=4), Probe(batches, k=32)
    small.start(base)
    full.start(base)
    assert small.cache_bytes == small.tokens * (8 * 4 + 4)
    assert full.cache_bytes == full.tokens * (8 * V + 4)  # k is capped at the vocabulary


# --------------------------------------------------------------------------- plain modules and token rules


class _Bigram(nn.Module):
    """A plain module: ``forward(input_ids) -> logits (rows, T, V)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 16)
        self.out = nn.Linear(16, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(input_ids))


def _bigram_kl(base: nn.Module, model: nn.Module, ids: torch.Tensor, shift: bool) -> float:
    with torch.no_grad():
        lb, lm = base(ids).to(F64), model(ids).to(F64)
    if shift:
        lb, lm = lb[:, :-1], lm[:, :-1]
    lp, lq = torch.log_softmax(lb, -1), torch.log_softmax(lm, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("shift", [True, False])
def test_plain_module_counts_all_tokens_without_labels_or_mask(shift: bool) -> None:
    base = _Bigram()
    model = _perturb(base, 0.3)
    ids = torch.randint(0, V, (6, 9), generator=torch.Generator().manual_seed(0))
    probe = Probe([{"input_ids": ids}], k=V, shift=shift)
    start = probe.start(base)
    res = probe.measure(model)
    assert res.tokens == 6 * (9 - int(shift))
    assert res.kl == pytest.approx(_bigram_kl(base, model, ids, shift), rel=1e-5)
    if shift:  # causal: targets are the next input ids
        with torch.no_grad():
            expected = nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        assert res.loss == pytest.approx(float(expected), rel=1e-6)
        assert math.isfinite(start.loss)
    else:  # no targets
        assert math.isnan(res.loss) and math.isnan(res.loss_rel) and math.isnan(start.loss)


def test_non_causal_labels_and_batches_without_targets() -> None:
    base = _Bigram()
    model = _perturb(base, 0.3)
    g = torch.Generator().manual_seed(2)
    ids_a, ids_b = torch.randint(0, V, (3, 5), generator=g), torch.randint(0, V, (2, 5), generator=g)
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0, :2] = -100
    probe = Probe([{"input_ids": ids_a, "labels": labels}, {"input_ids": ids_b}], k=V, shift=False)
    assert probe.tokens == 13 + 10  # batch b has no targets but counts every position for the KL
    probe.start(base)
    res = probe.measure(model)
    with torch.no_grad():  # the loss pools only the batch with labels, unshifted
        expected = nn.functional.cross_entropy(model(ids_a).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        lp, lq = (
            torch.log_softmax(m(torch.cat([ids_a[labels != -100], ids_b.reshape(-1)])).double(), -1)
            for m in (base, model)
        )
    assert res.loss == pytest.approx(float(expected), rel=1e-6)
    assert res.kl == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-5)


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        logits = self.inner(input_ids)
        return {"logits": logits} if self.kind == "dict" else (logits, None)


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_attention_mask_rule_and_other_output_types(kind: str) -> None:
    base = _Bigram()
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    probe = Probe([{"input_ids": ids, "attention_mask": attn}], k=2)
    assert probe.tokens == 5 + 2 + 1  # target positions 1..5 with attention_mask 1
    start = probe.start(_Wrapped(base, kind))
    mask = attn[:, 1:].bool()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(base(ids)[:, :-1][mask], ids[:, 1:][mask])
    assert start.loss == pytest.approx(float(expected), rel=1e-6)
    assert probe.measure(_Wrapped(base, kind)).kl == 0.0


# --------------------------------------------------------------------------- errors and results


def test_errors() -> None:
    base, batches = _gpt2(), _batches(n=1)
    with pytest.raises(RuntimeError, match="no base"):
        Probe(batches).measure(base)
    with pytest.raises(ConfigError, match="taken"):
        Probe(batches, metrics={"kl": lambda m: 0.0})
    with pytest.raises(ConfigError, match="k must be"):
        Probe(batches, k=0)
    with pytest.raises(ConfigError, match="no counted tokens"):
        Probe([{"input_ids": batches[0]["input_ids"], "labels": torch.full_like(batches[0]["labels"], -100)}])
    with pytest.raises(ConfigError, match="no \\(rows, T\\) tensor"):
        Probe([{"x": torch.zeros(3)}])
    with pytest.raises(TypeError, match="not a number"):
        Probe(batches, metrics={"bad": lambda m: "high"}).start(base)
    probe = Probe(batches)
    probe.start(base)
    transformers = pytest.importorskip("transformers")
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=V + 2))
    with pytest.raises(BaseMismatchError, match="vocabulary"):
        probe.measure(wider)


def test_result_as_dict() -> None:
    res = ProbeResult(kl=0.5, loss=2.0, loss_rel=0.1, top1_agree=0.9, seconds=0.01, tokens=7, metrics={"acc": 0.3})
    assert res.as_dict() == {
        "kl": 0.5,
        "loss": 2.0,
        "loss_rel": 0.1,
        "top1_agree": 0.9,
        "seconds": 0.01,
        "tokens": 7.0,
        "acc": 0.3,
    }
