"""Tests of spectral_monitor.functional.divergence against full-vocabulary float64 numpy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_monitor.functional.divergence import LOG_EPS, base_topk, kl_from_topk, top1_agreement

F64 = torch.float64


def _logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _oracle(base: torch.Tensor, model: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Full-vocabulary KL, the bucketed KL and the chain-rule gap, per row, in float64 numpy.

    The bucket K is the base's ``k`` largest probabilities (numpy's argsort, not torch.topk).
    """
    lp = _np_log_softmax(base.double().numpy())
    lq = _np_log_softmax(model.double().numpy())
    p = np.exp(lp)
    V = lp.shape[-1]
    keep = np.zeros(lp.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(-lp, axis=-1)[..., : min(k, V)], True, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0 via the where()s
        terms = np.where(p > 0, p * (lp - lq), 0.0)
        full = terms.sum(-1)
        kept = np.where(keep, terms, 0.0).sum(-1)
        lpT = _np_logsumexp(np.where(keep, -np.inf, lp))
        lqT = _np_logsumexp(np.where(keep, -np.inf, lq))
        pT = np.exp(lpT)
        bucketed = kept + np.where(pT > 0, pT * (lpT - lqT), 0.0)
        # p_T · KL(p(.|T) || q(.|T)) with p(j|T) = p_j / p_T and q(j|T) = q_j / q_T
        cond = (p / pT[..., None]) * ((lp - lpT[..., None]) - (lq - lqT[..., None]))
        gap = np.where(pT > 0, pT * np.where(keep | (p == 0), 0.0, cond).sum(-1), 0.0)
    return {"full": full, "bucketed": bucketed, "gap": gap, "tail": lpT}


# --------------------------------------------------------------------------- base_topk


def test_base_topk_against_numpy() -> None:
    logits = _logits(4, 6, 20, seed=1)
    logp, index, tail = base_topk(logits, 5)
    assert logp.shape == index.shape == (4, 6, 5) and tail.shape == (4, 6)
    assert logp.dtype == torch.float32 and index.dtype == torch.int64
    lp = _np_log_softmax(logits.double().numpy())
    order = np.argsort(-lp, axis=-1)[..., :5]
    np.testing.assert_array_equal(index.numpy(), order)
    np.testing.assert_allclose(logp.numpy(), np.take_along_axis(lp, order, -1), atol=2e-6)
    expected_tail = np.log1p(-np.exp(np.take_along_axis(lp, order, -1)).sum(-1))
    np.testing.assert_allclose(tail.numpy(), expected_tail, atol=2e-6)


def test_base_topk_tiny_tail_is_accurate_in_float32() -> None:
    # Two tokens share almost all the mass; the other 8 together hold about e^-60.
    logits = torch.tensor([[30.0, 30.0] + [-30.0 + 0.1 * j for j in range(8)]])
    logp, _, tail = base_topk(logits, 2)
    exact = _oracle(logits, logits, 2)["tail"]
    assert math.isfinite(tail.item())
    assert tail.item() == pytest.approx(float(exact[0]), rel=1e-6)
    # the naive float32 complement cancels to log(0)
    naive = torch.log1p(-logp.exp().sum(-1))
    assert naive.item() == -math.inf


def test_base_topk_k_at_least_vocab_has_empty_tail() -> None:
    logits = _logits(3, 7, seed=2)
    for k in (7, 50):
        logp, index, tail = base_topk(logits, k)
        assert logp.shape == (3, 7)
        assert torch.equal(index.sort(-1).values, torch.arange(7).expand(3, 7))
        assert torch.all(tail == -math.inf)


def test_base_topk_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be"):
        base_topk(_logits(2, 5), 0)
    with pytest.raises(ValueError, match="k must be"):
        base_topk(_logits(2, 5), True)
    with pytest.raises(TypeError, match="floating-point"):
        base_topk(torch.zeros(2, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="V >= 1"):
        base_topk(torch.zeros(2, 0), 2)


# --------------------------------------------------------------------------- kl_from_topk


@pytest.mark.parametrize("k", [13, 40])
def test_kl_exact_when_k_covers_vocabulary(k: int) -> None:
    base, model = _logits(5, 6, 13, seed=3), _logits(5, 6, 13, seed=4)
    kl = kl_from_topk(*base_topk(base, k), model)
    assert kl.shape == (5, 6) and kl.dtype == torch.float32
    oracle = _oracle(base, model, k)
    assert oracle["full"].min() > 0.1  # the two distributions are far apart
    np.testing.assert_allclose(kl.numpy(), oracle["full"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_kl_lower_bound_with_the_documented_gap(k: int) -> None:
    base, model = _logits(64, 20, seed=5), _logits(64, 20, seed=6, scale=2.0)
    kl = kl_from_topk(*base_topk(base, k), model).double().numpy()
    oracle = _oracle(base, model, k)
    np.testing.assert_allclose(kl, oracle["bucketed"], atol=2e-6, rtol=2e-6)
    assert np.all(kl <= oracle["full"] + 2e-6)
    # true − bucketed = p_T · KL(p(.|T) || q(.|T)), and the gap is not trivially 0 here
    np.testing.assert_allclose(oracle["full"] - kl, oracle["gap"], atol=4e-6)
    assert oracle["gap"].max() > 1e-2


def test_kl_zero_for_the_base_itself_and_invariant_to_a_constant_shift() -> None:
    base, model = _logits(4, 8, 30, seed=7), _logits(4, 8, 30, seed=8)
    cache = base_topk(base, 5)
    assert torch.all(kl_from_topk(*cache, base) == 0.0)
    shifted = kl_from_topk(*cache, base + torch.randn(4, 8, 1) * 50.0)
    assert shifted.abs().max() < 1e-5
    kl = kl_from_topk(*cache, model)
    torch.testing.assert_close(kl_from_topk(*cache, model - 17.0), kl, atol=2e-6, rtol=1e-5)
    # the cached base is itself shift-invariant
    for a, b in zip(base_topk(base + 9.0, 5), cache):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    # log-probabilities are valid input for the model side
    torch.testing.assert_close(kl_from_topk(*cache, torch.log_softmax(model, -1)), kl, atol=2e-6, rtol=1e-5)


def test_kl_batched_shapes_match_row_by_row() -> None:
    base, model = _logits(2, 3, 4, 11, seed=9), _logits(2, 3, 4, 11, seed=10)
    kl = kl_from_topk(*base_topk(base, 4), model)
    assert kl.shape == (2, 3, 4)
    rows = torch.stack([kl_from_topk(*base_topk(b, 4), m) for b, m in zip(base.reshape(-1, 11), model.reshape(-1, 11))])
    torch.testing.assert_close(kl.reshape(-1), rows, atol=1e-7, rtol=1e-6)
    single = kl_from_topk(*base_topk(base[0, 0, 0], 4), model[0, 0, 0])
    assert single.shape == ()
    torch.testing.assert_close(single, kl[0, 0, 0])


def test_kl_on_masked_tokens_equals_the_selected_rows() -> None:
    base, model = _logits(3, 10, 12, seed=11), _logits(3, 10, 12, seed=12)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.4
    full = kl_from_topk(*base_topk(base, 3), model)
    picked = kl_from_topk(*base_topk(base[mask], 3), model[mask])
    assert picked.shape == (int(mask.sum()),)
    torch.testing.assert_close(picked, full[mask])


def test_kl_defined_when_the_base_tail_is_empty() -> None:
    # the base gives -inf to every token outside its top 3: p_T = 0 although k < V
    base = _logits(6, 9, seed=13)
    base[:, 3:] = -math.inf
    model = _logits(6, 9, seed=14)
    logp, index, tail = base_topk(base, 3)
    assert torch.all(tail == -math.inf)
    kl = kl_from_topk(logp, index, tail, model)
    assert torch.isfinite(kl).all()
    np.testing.assert_allclose(kl.numpy(), _oracle(base, model, 3)["full"], atol=1e-6, rtol=1e-6)
    # k larger than the finite support: the kept -inf log-probabilities add 0
    kl9 = kl_from_topk(*base_topk(base, 9), model)
    np.testing.assert_allclose(kl9.numpy(), _oracle(base, model, 9)["full"], atol=1e-6, rtol=1e-6)


def test_kl_finite_and_floored_when_the_model_gives_a_bucket_zero_mass() -> None:
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    model = torch.tensor([[-math.inf, 1.0, 0.0, -1.0, -2.0]])  # no mass on the base's top token
    logp, index, tail = base_topk(base, 2)
    kl = kl_from_topk(logp, index, tail, model)
    assert torch.isfinite(kl).all()
    # oracle: the model's zero probability replaced by exp(LOG_EPS)
    lp = _np_log_softmax(base.double().numpy())[0]
    lq = _np_log_softmax(model.double().numpy())[0]
    lq_bucket = np.array([LOG_EPS, lq[1], _np_logsumexp(lq[2:])])
    lp_bucket = np.array([lp[0], lp[1], _np_logsumexp(lp[2:])])
    expected = float((np.exp(lp_bucket) * (lp_bucket - lq_bucket)).sum())
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    assert expected < -LOG_EPS  # the documented per-token cap
    # the model's whole tail at -inf (every kept token finite): the tail bucket is floored the same way
    model_no_tail = torch.tensor([[2.0, 1.0, -math.inf, -math.inf, -math.inf]])
    kl_tail = kl_from_topk(logp, index, tail, model_no_tail)
    lq2 = _np_log_softmax(model_no_tail.double().numpy()[0])
    lq2_bucket = np.array([lq2[0], lq2[1], LOG_EPS])
    assert kl_tail.item() == pytest.approx(float((np.exp(lp_bucket) * (lp_bucket - lq2_bucket)).sum()), rel=1e-5)


def test_kl_dtypes_and_no_autograd() -> None:
    base, model = _logits(4, 10, seed=15), _logits(4, 10, seed=16)
    cache = base_topk(base, 3)
    out = kl_from_topk(*cache, model.bfloat16())
    assert out.dtype == torch.float32
    exact = kl_from_topk(*cache, model.bfloat16().float())
    torch.testing.assert_close(out, exact)
    cache64 = base_topk(base.double(), 3)
    assert cache64[0].dtype == F64 and kl_from_topk(*cache64, model.double()).dtype == F64
    # int32 indices (as a cache may store them) give the same numbers
    torch.testing.assert_close(kl_from_topk(cache[0], cache[1].int(), cache[2], model), kl_from_topk(*cache, model))
    leaf = model.clone().requires_grad_(True)
    assert not kl_from_topk(*cache, leaf).requires_grad


def test_kl_rejects_mismatched_shapes() -> None:
    logp, index, tail = base_topk(_logits(4, 10), 3)
    with pytest.raises(ValueError, match="disagree"):
        kl_from_topk(logp, index[:, :2], tail, _logits(4, 10))
    with pytest.raises(ValueError, match="disagree"):
        kl_from_topk(logp, index, tail[:3], _logits(4, 10))
    with pytest.raises(ValueError, match="logits_t must have shape"):
        kl_from_topk(logp, index, tail, _logits(5, 10))


# --------------------------------------------------------------------------- top1_agreement


def test_top1_agreement_hand_cases() -> None:
    base = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.5, 1.0]])
    model = torch.tensor([[9.0, 1.0, 0.0], [0.0, 1.0, 2.0], [-1.0, -2.0, 5.0]])
    _, index, _ = base_topk(base, 2)
    assert top1_agreement(index, model).tolist() == [True, False, True]
    batched = top1_agreement(index.expand(2, 3, 2), model.expand(2, 3, 3))
    assert batched.shape == (2, 3) and batched.dtype == torch.bool
    with pytest.raises(ValueError, match="disagree"):
        top1_agreement(index, model[:2])
