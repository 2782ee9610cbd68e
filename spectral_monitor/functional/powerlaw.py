r"""Continuous power-law fit of a spectrum's tail, vectorised over x_min candidates and a batch.

For eigenvalues :math:`x_1 \le \dots \le x_n` (:math:`\lambda_i = \sigma_i^2`) and a candidate
lower cut-off :math:`x_{\min} = x_j`, the tail is :math:`\{x_i \ge x_j\}` with :math:`n_t` values and
the maximum-likelihood exponent of :math:`p(x) \propto x^{-\alpha}` on :math:`[x_{\min}, \infty)` is

.. math::
    \hat\alpha_j = 1 + n_t \Big/ \sum_{x_i \ge x_j} \ln(x_i / x_j)

(Clauset, Shalizi & Newman 2009, eq. 3.1). The fit is judged by the Kolmogorov-Smirnov distance

.. math::
    D_j = \max_{u \ge x_j} \big| P(u) - S(u) \big|, \qquad P(u) = 1 - (u / x_j)^{1 - \hat\alpha_j},

with :math:`u` running over the distinct tail values and :math:`S(u)` the share of tail values
*strictly below* :math:`u` — the convention of the ``powerlaw`` package (Alstott et al. 2014;
2.0.0's ``statistics.cdf``), which is the test oracle. Clauset et al. take the supremum over
both limits of the empirical step function (also the share at or below :math:`u`); that D is
larger by up to :math:`1/n_t` and on tied data can choose another :math:`x_{\min}` (their
Table 6.1 surnames and quakes). The chosen :math:`x_{\min}` minimises
:math:`D` (the first, i.e. smallest, on ties). Candidates follow ``powerlaw.Fit.find_xmin``: the
first occurrence of every distinct value except the two largest, and no fit at all when that leaves
fewer than two candidates (fewer than four distinct positive values).

Every candidate is evaluated at once: the values are sorted, suffix sums of :math:`\ln x` give all
:math:`\hat\alpha_j`, and :math:`D_j` is a masked maximum over a (batch, candidates, values) block,
built block by block in one reused work buffer. For long spectra (k >= 512) a cheap pass first
bounds every :math:`D_j` from above and below using 33 points of its tail (both CDFs are monotone,
so the gaps between points are bounded too), and :math:`D_j` is computed exactly only for the
candidates whose lower bound does not exceed the smallest upper bound — the others cannot be the
minimum, so :math:`x_{\min}`, :math:`\hat\alpha` and :math:`D` are unchanged. All of it runs in
float64 on the input's device; only the results are cast to float32. Time is :math:`O(k^2)` per
spectrum in the worst case, in practice 4-10 ms for k = 4096 on one core of a 2-core CPU (35 ms
without the bounds), where ``powerlaw.Fit`` takes about 1.5 s; memory is the buffer plus
:math:`O(B k)`.

Reference: A. Clauset, C. R. Shalizi, M. E. J. Newman, *Power-law distributions in empirical data*,
SIAM Review 51(4):661-703, 2009.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PowerLawFit", "fit_power_law"]

# Size of the float64 KS work buffer (spectra x candidates x values), reused block after block;
# at least one spectrum's block of _KS_ROWS candidates is always taken, whatever k.
_KS_BLOCK_BYTES = 32 * 2**20
# Candidates per block: small blocks stay in cache, skip most of the i < j triangle, and keep
# the i < j mask to a small square (64 measured fastest on CPU for k = 1024 and 4096).
_KS_ROWS = 64
# Spectra of at least _PRUNE_MIN_K values get D_j exactly only for the candidates that bounds from
# _PRUNE_POINTS + 1 points of each tail cannot rule out (see _ks_bounds): the same x_min and D, 3-8x
# less work at k = 4096 (32 points measured best for 2048-4096 values).
_PRUNE_MIN_K = 512
_PRUNE_POINTS = 32


class PowerLawFit(NamedTuple):
    """Result of :func:`fit_power_law`; every field has the input's batch shape ``(*,)``."""

    alpha: Tensor
    """float32 MLE exponent; NaN when no fit."""
    xmin: Tensor
    """float32 chosen lower cut-off (a data value); NaN when no fit."""
    ks: Tensor
    """float32 Kolmogorov-Smirnov distance D of the chosen fit; NaN when no fit."""
    n_tail: Tensor
    """int64 number of values >= xmin; 0 when no fit."""
    covered: Tensor
    """bool; False when the input is a truncated top-k (``total > k``) and xmin is among its
    ``edge`` smallest values, or there is no fit: the tail may extend beyond the kept values."""
    reliable: Tensor
    """bool; covered and n_tail >= min_tail and ks <= max_ks and alpha finite."""


def fit_power_law(
    eigs: Tensor,
    *,
    min_tail: int = 1,
    max_ks: float = 0.1,
    total: int | None = None,
    edge: int = 1,
    xmin_max_quantile: float | None = None,
) -> PowerLawFit:
    """Fit a continuous power law to the tail of each spectrum in a batch.

    Args:
        eigs: ``(*, k)`` eigenvalues (lambda = sigma^2), any order, any float dtype and device.
            Values that are not finite and positive (0, NaN, inf, negative) are ignored, so ragged
            spectra can be padded with 0 or NaN.
        min_tail: only x_min candidates with at least this many values >= x_min are considered.
            The default 1 keeps every candidate, as ``powerlaw`` does.
        max_ks: a fit with D above this is not ``reliable``.
        total: the size of the full spectrum when ``eigs`` holds only its top k values (e.g. from
            a randomized SVD); ``None`` means ``eigs`` is the whole spectrum.
        edge: with ``total > k``, a fit whose x_min is among the ``edge`` smallest kept values is
            not ``covered`` (the KS-optimal tail may reach below what was kept).
        xmin_max_quantile: if given, x_min is at most the q-quantile (linear, as ``numpy.quantile``)
            of each spectrum's positive values, i.e. at most ``floor(q * (n - 1))`` values lie
            below it. The per-spectrum analogue of the upper end of ``powerlaw.Fit(xmin=(lo, hi))``
            and of WeightWatcher's ``xmin_max``; unlike ``min_tail`` it scales with each spectrum's
            length.

    Returns:
        :class:`PowerLawFit` of ``(*,)`` tensors on ``eigs.device``. A spectrum with no admissible
        candidate (e.g. fewer than four distinct positive values, or ``min_tail`` larger than it)
        gets alpha = xmin = ks = NaN, n_tail = 0, reliable = False; nothing raises or warns.
    """
    if eigs.ndim < 1 or eigs.is_complex():
        raise ValueError(f"eigs must be a real tensor of shape (*, k), got {eigs.dtype} {tuple(eigs.shape)}")
    k = eigs.shape[-1]
    if min_tail < 1:
        raise ValueError(f"min_tail must be >= 1, got {min_tail}")
    if not max_ks >= 0:
        raise ValueError(f"max_ks must be >= 0, got {max_ks}")
    if total is not None and total < k:
        raise ValueError(f"total must be >= k = {k} (the number of values given), got {total}")
    if edge < 0:
        raise ValueError(f"edge must be >= 0, got {edge}")
    if xmin_max_quantile is not None and not 0 <= xmin_max_quantile <= 1:
        raise ValueError(f"xmin_max_quantile must be in [0, 1], got {xmin_max_quantile}")

    batch_shape = eigs.shape[:-1]
    x = eigs.detach().reshape(batch_shape.numel(), k).to(torch.float64)
    alpha, xmin, ks, n_tail, below = _fit_sorted(
        torch.where(torch.isfinite(x) & (x > 0), x, 0.0).sort(dim=-1).values,
        min_tail=min_tail,
        xmin_max_quantile=xmin_max_quantile,
    )
    found = torch.isfinite(alpha)
    truncated = total is not None and total > k
    covered = found & (below >= edge) if truncated else torch.ones_like(found)
    reliable = covered & found & (n_tail >= min_tail) & (ks <= max_ks)
    return PowerLawFit(
        alpha=alpha.float().reshape(batch_shape),
        xmin=xmin.float().reshape(batch_shape),
        ks=ks.float().reshape(batch_shape),
        n_tail=n_tail.reshape(batch_shape),
        covered=covered.reshape(batch_shape),
        reliable=reliable.reshape(batch_shape),
    )


def _fit_sorted(
    x: Tensor, *, min_tail: int, xmin_max_quantile: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fit rows of ``x`` (``(B, k)`` float64, ascending, ignored values set to 0 and so in front).

    Returns ``(alpha, xmin, ks, n_tail, below)``, each ``(B,)``: float64 alpha, xmin and D (NaN
    where no fit), int64 tail size and int64 count of positive values below xmin (0 where no fit).
    """
    if x.shape[-1] == 0:  # an empty spectrum is one absent value
        x = x.new_zeros(x.shape[0], 1)
    k = x.shape[-1]
    idx = torch.arange(k, device=x.device)
    valid = x > 0
    n_pos = valid.sum(dim=-1, keepdim=True)
    n_tail = k - idx  # values >= x_j for the first occurrence j of a value; (k,)
    log_x = torch.where(valid, x.log(), 0.0)

    is_new = torch.ones_like(valid)
    is_new[:, 1:] = x[:, 1:] != x[:, :-1]
    first = torch.where(is_new, idx, 0).cummax(dim=-1).values  # first index of x_i's value
    distinct = is_new.cumsum(dim=-1)
    cand = valid & is_new & (distinct[:, -1:] - distinct >= 2)  # powerlaw drops the two largest
    cand &= cand.sum(dim=-1, keepdim=True) >= 2  # ... and gives up with fewer than 2 candidates
    cand &= n_tail >= min_tail
    if xmin_max_quantile is not None:
        below = idx - (k - n_pos)  # positive values below x_j
        cand &= below <= torch.floor(xmin_max_quantile * (n_pos - 1) + 1e-9)  # 1e-9: rounding of q * (n - 1)

    # alpha_j = 1 + n_t / (sum_{i >= j} ln x_i - n_t ln x_j), from suffix sums of ln x.
    suffix = log_x.flip(-1).cumsum(dim=-1).flip(-1)
    alpha = 1 + n_tail / (suffix - n_tail * log_x)
    exact = cand
    if k >= _PRUNE_MIN_K:  # D_j exactly only where the bounds leave j a chance of the minimum
        lower, upper = _ks_bounds(log_x, first, 1 - alpha, n_tail, cand, _PRUNE_POINTS)
        best_upper = torch.where(cand, upper, math.inf).amin(dim=-1, keepdim=True)
        exact = cand & ~(lower > best_upper * (1 + 1e-9) + 1e-12)  # margin: rounding only adds rows
    ks = torch.where(exact, _ks_distances(log_x, first, 1 - alpha, n_tail, exact, k >= _PRUNE_MIN_K), math.inf)

    best = ks.argmin(dim=-1, keepdim=True)
    found = cand.gather(-1, best).squeeze(-1)
    nan = torch.tensor(math.nan, dtype=x.dtype, device=x.device)
    alpha_best = torch.where(found, alpha.gather(-1, best).squeeze(-1), nan)
    xmin_best = torch.where(found, x.gather(-1, best).squeeze(-1), nan)
    ks_best = torch.where(found, ks.gather(-1, best).squeeze(-1), nan)
    best = best.squeeze(-1)
    n_tail_best = torch.where(found, k - best, 0)
    below_best = torch.where(found, best - (k - n_pos.squeeze(-1)), 0)
    return alpha_best, xmin_best, ks_best, n_tail_best, below_best


def _ks_bounds(
    log_x: Tensor, first: Tensor, slope: Tensor, n_tail: Tensor, cand: Tensor, points: int
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds on every candidate's D_j from ``points + 1`` evenly spaced
    points of its own tail (its first and last value included), ``(B, k)`` each.

    With P_i the fitted and S_i the empirical CDF of candidate j (P_j = S_j = 0), D_j = max_i
    |P_i - S_i|. The maximum over the sampled points is a lower bound; P and S are both
    non-decreasing in i, so between neighbouring sampled points a < b every term is at most
    max(P_b - S_a, S_b - P_a), and the largest of those is an upper bound. Spacing the points
    by the tail's length keeps the two within ~1/points of each other for every j.
    Cost O(k * points).
    """
    b = log_x.shape[0]
    steps = torch.linspace(0.0, 1.0, points + 1, dtype=log_x.dtype, device=log_x.device)
    lower = torch.full_like(log_x, math.inf)
    upper = torch.full_like(log_x, math.inf)
    positions = cand.any(dim=0).nonzero().squeeze(-1)
    rows = max(1, 2**18 // (b * len(steps)))  # blocks of ~2 MB: cache-resident
    for p0 in range(0, len(positions), rows):
        j = positions[p0 : p0 + rows]
        n_t = n_tail[j]
        idx = j[:, None] + (steps * (n_t[:, None] - 1)).round().long()  # (rows, points), from j to k - 1
        fit_cdf = torch.addcmul(-slope[:, j, None] * log_x[:, j, None], slope[:, j, None], log_x[:, idx])
        fit_cdf = fit_cdf.exp_().neg_().add_(1)
        emp_cdf = (first[:, idx] - j[:, None]).to(log_x.dtype) / n_t[:, None].to(log_x.dtype)
        lower[:, j] = (fit_cdf - emp_cdf).abs_().amax(dim=-1)
        rise = torch.maximum(fit_cdf[..., 1:] - emp_cdf[..., :-1], emp_cdf[..., 1:] - fit_cdf[..., :-1])
        upper[:, j] = rise.amax(dim=-1).clamp_min(0)
    return lower, upper


def _ks_distances(
    log_x: Tensor, first: Tensor, slope: Tensor, n_tail: Tensor, cand: Tensor, one_by_one: bool = False
) -> Tensor:
    """KS distance of the fit at every candidate position j, for every row.

    Args:
        log_x: ``(B, k)`` ln of the sorted values.
        first: ``(B, k)`` int64 index of the first occurrence of each value.
        slope: ``(B, k)`` 1 - alpha_j.
        n_tail: ``(k,)`` tail size k - j.
        cand: ``(B, k)`` bool, the candidate positions. Only positions that are a candidate in
            some spectrum of a batch chunk get a row, so padding, runs of tied values and tails
            shorter than ``min_tail`` cost nothing.
        one_by_one: one spectrum per chunk (after pruning, the candidates left differ between
            spectra, and a chunk evaluates the union of its spectra's rows).

    Returns:
        ``(B, k)`` D_j = max_{i >= j} |1 - exp(slope_j (ln x_i - ln x_j)) - (first_i - j) / n_t|.
        Entries for positions that are not candidates are meaningless (may be NaN or inf).
    """
    b, k = log_x.shape
    inv_n = 1.0 / n_tail.to(log_x.dtype)
    center = 1 + (k - n_tail) * inv_n  # 1 + j / n_t: D_j = max_i |exp(...) + first_i / n_t - center_j|
    first = first.to(log_x.dtype)
    neg_bias = -slope * log_x
    rows = min(_KS_ROWS, k)
    batch_step = 1 if one_by_one else max(1, _KS_BLOCK_BYTES // (rows * k * log_x.element_size()))
    buffer = log_x.new_empty(min(b, batch_step) * rows * k)
    out = torch.full_like(log_x, math.inf)
    for b0 in range(0, b, batch_step):
        bs = slice(b0, b0 + batch_step)
        nb = min(batch_step, b - b0)
        # Rows: the positions that are a candidate in some spectrum of this chunk, `rows` at a time.
        positions = cand[bs].any(dim=0).nonzero().squeeze(-1)
        bounds = positions.cpu()
        for p0 in range(0, len(positions), rows):
            j = positions[p0 : p0 + rows]
            j0, j_last = int(bounds[p0]), int(bounds[p0 : p0 + rows][-1])
            # (nb, rows, k - j0) block, row j and column i: exp(slope_j (ln x_i - ln x_j)) + first_i / n_t.
            block = buffer[: nb * len(j) * (k - j0)].view(nb, len(j), k - j0)
            torch.addcmul(neg_bias[bs, j, None], slope[bs, j, None], log_x[bs, None, j0:], out=block)
            block.exp_().addcmul_(first[bs, None, j0:], inv_n[j, None])
            # Columns i < j lie in the block's first j_last - j0 columns; give them the value centre_j.
            head = block[:, :, : j_last - j0]
            before = torch.arange(j0, j_last, device=j.device) < j[:, None]
            head.copy_(torch.where(before, center[j, None], head))
            lo, hi = block.aminmax(dim=-1)
            out[bs, j] = torch.maximum(hi - center[j], center[j] - lo)
    return out
