r"""KL divergence to a base model from a cached top-k summary of its next-token distributions.

A probe compares the model :math:`\pi_t` with the base :math:`\pi_0` on fixed tokens without
keeping the base in memory: for every token it caches the base's top-``k`` log-probabilities
:math:`\log p_i` (:math:`i \in K`, the base's ``k`` most likely tokens) and the log of the rest,
:math:`\log p_T` with :math:`T = V \setminus K` and :math:`p_T = 1 - \sum_{i \in K} p_i`
(:func:`base_topk`). Later the model's distribution :math:`q` is read on the same ``k + 1``
buckets — :math:`q_i` for :math:`i \in K` and :math:`q_T = 1 - \sum_{i \in K} q_i` — and

.. math::  \widehat{KL} = \sum_{i \in K} p_i \log \frac{p_i}{q_i} + p_T \log \frac{p_T}{q_T}

is the KL divergence between the two bucketed distributions (:func:`kl_from_topk`).

**Bound.** Merging outcomes never increases a KL divergence (data-processing inequality); the
chain rule gives the exact gap:

.. math::  KL(p \,\|\, q) - \widehat{KL} = p_T \; KL\big(p(\cdot \mid T) \,\|\, q(\cdot \mid T)\big) \ge 0,

with :math:`p(j \mid T) = p_j / p_T` and :math:`q(j \mid T) = q_j / q_T` the distributions inside
the tail. So :math:`\widehat{KL}` is a lower bound: exact when ``k >= V`` (no tail,
:math:`p_T = 0`) or when the model keeps the base's proportions inside the tail, and close when the
base's tail mass :math:`p_T` is small.

**Numerics.** Arithmetic is float32 (bf16/fp16 logits are upcast, float64 stays float64), on the
input's device, batched over any leading dims ``*``; no autograd graph is recorded. Both tail
log-masses are a ``logsumexp`` over the tokens outside :math:`K`, so they are accurate relative to
the tail mass itself (a tail of :math:`e^{-60}` reads :math:`-60`, where :math:`\log(1 - \sum_K p_i)`
in float32 reads :math:`-\infty`). A zero tail (``k >= V``, or the base gives :math:`-\infty` logits
to every token outside :math:`K`) is :math:`\log p_T = -\infty` and adds 0 (:math:`0 \log 0 = 0`).
The model's bucket log-probabilities are raised to :data:`LOG_EPS` :math:`= \log \varepsilon`,
:math:`\varepsilon` = the smallest normal float32 (1.18e-38, :math:`\log \varepsilon \approx -87.3`):
where the model puts (numerically) zero mass on a bucket the base uses — a :math:`-\infty` logit,
or a log-probability below :math:`-87.3` — the divergence stays finite, each token's at most
:math:`-\log \varepsilon \approx 87.3` nats, instead of :math:`+\infty`. The gap formula above holds
where the clamp is inactive. Per-token values are clamped at 0 (float32 round-off can make the
divergence of two nearly equal distributions slightly negative). NaN logits give NaN.

Reference: I. Shenfeld, J. Pari, P. Agrawal, *RL's Razor: why online reinforcement learning
forgets less*, arXiv:2509.04259 (forgetting tracks :math:`KL(\pi_0 \,\|\, \pi_t)` on the new task's inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LOG_EPS", "base_topk", "kl_from_topk", "top1_agreement"]

#: floor of the model's bucket log-probabilities in :func:`kl_from_topk`: log of the smallest normal float32
LOG_EPS = math.log(torch.finfo(torch.float32).tiny)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any floating input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """``log_softmax`` over the last dim in ``dtype``: always a new tensor, safe to overwrite."""
    if not logits.is_floating_point():
        raise TypeError(f"expected floating-point logits, got dtype={logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (*, V) with V >= 1, got shape={tuple(logits.shape)}")
    return torch.log_softmax(logits.to(dtype), dim=-1)


def _rest_logsumexp_(logp: Tensor, index: Tensor) -> Tensor:
    """``log Σ_{j ∉ index} exp(logp_j)`` per row; overwrites ``logp`` (``-inf`` at ``index``)."""
    return logp.scatter_(-1, index, -math.inf).logsumexp(-1)


@torch.no_grad()
def base_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The base's top-``k`` log-probabilities per token and the log of the remaining mass.

    Args:
        logits: ``(*, V)`` unnormalised next-token logits (any constant shift per token is removed).
        k: tokens kept per position, ``>= 1``; ``k >= V`` keeps all ``V`` (exact KL later).

    Returns:
        ``(logp, index, tail_logp)``: ``logp`` ``(*, k')`` the top ``k' = min(k, V)``
        log-probabilities, descending; ``index`` ``(*, k')`` int64 their token ids; ``tail_logp``
        ``(*,)`` :math:`\log(1 - \sum \exp(\text{logp}))`, computed as a ``logsumexp`` over the
        other tokens (``-inf`` when they have no mass, e.g. ``k >= V``). Float32 (float64 for
        float64 logits).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got k={k!r}")
    logp = _log_probs(logits, _compute_dtype(logits))
    top, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top, index, _rest_logsumexp_(logp, index)


@torch.no_grad()
def kl_from_topk(base_logp: Tensor, base_index: Tensor, base_tail: Tensor, logits_t: Tensor) -> Tensor:
    r"""Per-token :math:`KL(\pi_0 \,\|\, \pi_t)` between the bucketed distributions (``k`` tokens + tail).

    A lower bound on the full-vocabulary KL, exact when the cache holds every token; the gap is
    :math:`p_T\,KL(p(\cdot|T) \,\|\, q(\cdot|T))` (module docstring). The model's log-mass on the
    tail is a ``logsumexp`` of its log-probabilities outside ``base_index``.

    Args:
        base_logp: ``(*, k)`` the base's cached log-probabilities (from :func:`base_topk`).
        base_index: ``(*, k)`` their token ids (any integer dtype).
        base_tail: ``(*,)`` the base's tail log-mass (``-inf`` for an empty tail).
        logits_t: ``(*, V)`` the model's logits (or log-probabilities) at the same positions.

    Returns:
        ``(*,)`` in nats, ``>= 0``, finite for finite inputs (model log-probabilities are floored
        at :data:`LOG_EPS`); 0 where the model's distribution equals the base's. Float32
        (float64 when an input is float64).
    """
    if base_logp.shape != base_index.shape or base_logp.shape[:-1] != base_tail.shape:
        raise ValueError(
            f"base_logp (*, k), base_index (*, k) and base_tail (*,) disagree: {tuple(base_logp.shape)}, "
            f"{tuple(base_index.shape)}, {tuple(base_tail.shape)}"
        )
    if logits_t.shape[:-1] != base_tail.shape:
        raise ValueError(
            f"logits_t must have shape (*, V) with * = {tuple(base_tail.shape)}, got {tuple(logits_t.shape)}"
        )
    dtype = _compute_dtype(base_logp, base_tail, logits_t)
    index = base_index.long()
    logq = _log_probs(logits_t, dtype)
    q_kept = logq.gather(-1, index)
    q_tail = _rest_logsumexp_(logq, index)
    log_p = torch.cat([base_logp.to(dtype), base_tail.to(dtype).unsqueeze(-1)], dim=-1)  # (*, k + 1)
    log_q = torch.cat([q_kept, q_tail.unsqueeze(-1)], dim=-1).clamp(min=LOG_EPS)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), 0.0)  # 0 log 0 = 0, also for log p = -inf
    return terms.sum(-1).clamp(min=0.0)


@torch.no_grad()
def top1_agreement(base_index: Tensor, logits_t: Tensor) -> Tensor:
    r"""Whether the model's most likely token is the base's (``argmax`` of ``logits_t == base_index[..., 0]``).

    Args:
        base_index: ``(*, k)`` the base's top-k token ids, most likely first (from :func:`base_topk`).
        logits_t: ``(*, V)`` the model's logits.

    Returns:
        ``(*,)`` bool. Ties in either distribution are broken by the index order ``torch.argmax``
        / ``torch.topk`` pick, so exactly tied tokens can read as disagreeing.
    """
    if logits_t.shape[:-1] != base_index.shape[:-1] or base_index.shape[-1] < 1:
        raise ValueError(
            f"base_index (*, k >= 1) and logits_t (*, V) disagree: {tuple(base_index.shape)}, {tuple(logits_t.shape)}"
        )
    return logits_t.argmax(-1) == base_index[..., 0].long()
