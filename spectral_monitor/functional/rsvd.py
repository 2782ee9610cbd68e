r"""Truncated SVDs of weight updates: randomized (dense :math:`W_t - W_0`) and exact (LoRA factors).

**Randomized SVD** (Halko, Martinsson & Tropp 2011). For :math:`A \in \mathbb{R}^{m \times n}`
(optionally :math:`A - A_0`, applied as an operator), target rank :math:`r` and sketch width
:math:`\ell = \min(r + p, m, n)`:

1. draw a Gaussian test matrix :math:`\Omega \in \mathbb{R}^{n \times \ell}` (its first columns may
   be a warm start, see below) and orthonormalise the sketch: :math:`Q = \operatorname{qr}(A\Omega)`;
2. run :math:`q` power (subspace) iterations, re-orthonormalising after every half step
   (Alg. 4.4): :math:`\tilde Q = \operatorname{qr}(A^\top Q)`, :math:`Q = \operatorname{qr}(A\tilde Q)`
   — without the QRs every direction below :math:`\sigma_1 \epsilon_{\text{mach}}^{1/(2q+1)}`
   would be lost to round-off (HMT §4.5);
3. project and decompose the small matrix (Alg. 5.1): :math:`B = Q^\top A \in \mathbb{R}^{\ell
   \times n}`, :math:`B = \hat U \Sigma V^\top`, :math:`U = Q \hat U`; keep the top :math:`r`.

The expected spectral error is :math:`\big[1 + 4\sqrt{\ell \min(m,n)}/(p-1)\big]^{1/(2q+1)}
\sigma_{r+1}` (HMT §1.6 and §10.4): power iterations matter most when the spectrum decays slowly, and with
:math:`q = 0` the singular *vectors* are unusable unless the gap :math:`\sigma_1/\sigma_2` is large.
The computed values are Ritz values, so they never exceed the true ones (they are biased low near
the cut-off :math:`r`).

Cost: :math:`2q + 2` products of :math:`A` with an :math:`n \times \ell` or :math:`m \times \ell`
block, :math:`2q + 1` thin QRs and one SVD of an :math:`\ell \times n` matrix. The sketch always
starts on the right (column) side of :math:`A`, the side a warm start :math:`V` lives on, so a warm
start costs nothing extra; torch's ``svd_lowrank`` transposes wide inputs instead, which buys no
flops here (the QRs alternate between both sides anyway and the final small SVD costs about one
thin QR) and would cost a warm start one extra product with :math:`A`.

**Warm start.** The update :math:`\Delta W` moves slowly between measurements, so the previous
right singular subspace :math:`V_{\text{prev}}` is a good start: the test matrix becomes
:math:`\Omega = [V_{\text{prev}}, G/\sqrt{n}]` (Gaussian :math:`G` fills the remaining columns,
scaled to unit expected norm like :math:`V`'s; only the span of :math:`A\Omega` matters, so
:math:`\Omega` is not orthonormalised). If :math:`V_{\text{prev}}` spans the true top-:math:`r`
subspace, even :math:`q = 0` returns the top-:math:`r` SVD to round-off.

**Randomness.** The Gaussian block is drawn from a :class:`torch.Generator` — the caller's, or a
fresh one seeded with a constant — never from the global RNG, so monitoring does not perturb the
training run's random stream. One :math:`n \times \ell` block is drawn per call and shared by every
matrix of a batch: a layer's result does not depend on which layers it was batched with.

**Dtypes.** Arithmetic runs in float32 (bf16/fp16 are upcast per call; float64 stays float64) on
the input's device. For low-precision inputs the upcast copy of :math:`A` is needed anyway, so
:math:`A_0` is subtracted into that buffer (no further :math:`m \times n` allocation, half the
products); float32 inputs are never copied and :math:`A - A_0` is never formed.

**Mixed precision** (``sketch_dtype=torch.bfloat16``). Only the products with :math:`A` run in
bf16 (AMX / AVX512-BF16 on CPUs that have them, tensor cores on CUDA: 2-8x the float32 rate, half
the memory traffic); every QR, the Gram eigendecomposition and the Ritz step stay in float32/64.
Rounding :math:`A` to bf16 (relative :math:`2^{-9}` per entry) is a perturbation :math:`E` whose
effect on a singular value is first order only through :math:`u_i^\top E v_i`, an average of
independent roundings, so :math:`\sigma_i` moves by ~1e-5..1e-4 relative, far below the
randomized error near the cut. The one systematic error would come from the basis: :math:`Q`
rounded to bf16 is orthonormal only to ~:math:`10^{-3}`, which would scale every Ritz value by up
to that much, so the final projection uses the rounded basis :math:`\tilde Q` itself and
re-orthonormalises it exactly afterwards (:math:`\tilde Q = Q' L^\top` with :math:`L` the Cholesky
factor of :math:`\tilde Q^\top \tilde Q`, :math:`Q'^\top A = L^{-1} \tilde Q^\top A`).

**LoRA.** :math:`\Delta W = s\,BA` with :math:`B \in \mathbb{R}^{m \times r}`, :math:`A \in
\mathbb{R}^{r \times n}` has an exact SVD from its factors: :math:`B = Q_B R_B`, :math:`A^\top = Q_A
R_A`, :math:`s R_B R_A^\top = \hat U \Sigma \hat V^\top`, so :math:`U = Q_B \hat U`, :math:`V = Q_A
\hat V` — :math:`O((m + n) r^2)`, without the :math:`m \times n` product.

References: N. Halko, P.-G. Martinsson, J. A. Tropp, *Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions*, SIAM Review
53(2):217-288, 2011 (arXiv:0909.4061), Algorithms 4.4 and 5.1; ``torch/_lowrank.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["lora_svd", "randomized_svd", "sketch_left_vectors"]

# Seed of the private generator used when the caller passes none (any constant would do).
_DEFAULT_SEED = 0x5EC7


def _working_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64; rejects non-floating inputs."""
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"expected a real floating-point tensor, got dtype={t.dtype}")
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def randomized_svd(
    A: Tensor,
    rank: int,
    *,
    niter: int = 2,
    oversample: int = 10,
    base: Tensor | None = None,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    block_rows: int | None = None,
    sketch_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Top-``rank`` SVD of ``A`` (or of ``A - base``) by randomized subspace iteration.

    Args:
        A: ``(*, m, n)`` real floating-point matrix or batch of matrices.
        rank: number of singular triplets wanted; silently clamped to ``min(m, n)``.
        niter: power iterations :math:`q \ge 0` (2 is accurate unless the gap is tiny).
        oversample: extra sketch columns :math:`p \ge 0`; the sketch has
            ``l = min(rank + oversample, m, n)`` columns.
        base: optional ``(*, m, n)`` matrix (batch dims broadcastable to ``A``'s); the SVD is of
            ``A - base``, applied as ``A @ X - base @ X`` without forming the difference.
        init: optional ``(*, n, r0)`` warm start, e.g. ``V`` of the previous measurement; it is
            orthonormalised and used as the first ``min(r0, l)`` columns of the test matrix.
            ``V`` of an all-zero matrix is arbitrary (coordinate vectors): pass ``None`` then.
        generator: source of the Gaussian test matrix (drawn on the generator's device, then
            moved to ``A``'s); ``None`` uses a private generator with a fixed seed. The global
            RNG is never used.
        block_rows: when set, every product runs over blocks of this many rows of ``A`` (and
            ``base``), each upcast on the fly: no float32 copy of a low-precision ``A`` and no
            ``A - base`` is ever formed, at the cost of re-reading ``A`` in every pass. For
            matrices larger than a memory budget (embedding-sized layers).
        sketch_dtype: dtype of the products with ``A`` (``torch.bfloat16``: see *Mixed precision*
            in the module doc; ``A - base`` is formed and rounded once). ``None``: the working
            dtype. QRs and the final small SVD always run in float32/float64.

    Returns:
        ``(U, S, V)`` with ``U: (*, m, r)``, ``S: (*, r)`` descending and non-negative,
        ``V: (*, n, r)``, ``r = min(rank, m, n)``, so that ``A - base ≈ U diag(S) Vᵀ``. Batch
        dims are those of ``A``, ``base`` and ``init`` broadcast; dtype float32 (float64 for
        float64 input). No autograd graph is recorded.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got rank={rank}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got niter={niter}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got oversample={oversample}")
    if A.dim() < 2:
        raise ValueError(f"A must have shape (*, m, n), got shape={tuple(A.shape)}")
    dtype = _working_dtype(A) if base is None else _working_dtype(A, base)

    if base is not None:
        if base.shape[-2:] != A.shape[-2:]:
            raise ValueError(f"base must have A's matrix shape {tuple(A.shape[-2:])}, got shape={tuple(base.shape)}")
        if torch.broadcast_shapes(A.shape, base.shape) != A.shape:
            raise ValueError(
                f"base's batch dims must broadcast to A's: A.shape={tuple(A.shape)}, base.shape={tuple(base.shape)}"
            )
    lp = None if sketch_dtype in (None, dtype) else sketch_dtype
    if block_rows is not None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got block_rows={block_rows}")
        return _blocked(A, base, rank, niter, oversample, init, generator, block_rows, dtype, lp)
    if lp is not None:  # one rounded copy of A - base; products in lp, results back in dtype
        work = A.to(lp) if base is None else (A.to(dtype) - base.to(dtype)).to(lp)
        return _subspace_iteration(
            lambda X: _mm(work, X.to(lp), dtype),
            lambda Y: _mm(work.mT, Y.to(lp), dtype),
            A, rank, niter, oversample, init, generator, dtype, lp,
        )  # fmt: skip
    work = A.to(dtype)
    if base is not None and work is not A:
        # Low-precision A was copied anyway: hold A - base in that copy (no further m x n buffer,
        # half the products).
        work.sub_(base)
        base = None
    if base is not None:
        base = base.to(dtype)

    def apply(X: Tensor) -> Tensor:  # (A - base) @ X
        return _mm(work, X) if base is None else _mm(work, X) - _mm(base, X)

    def apply_t(Y: Tensor) -> Tensor:  # (A - base)^T @ Y
        return _mm(work.mT, Y) if base is None else _mm(work.mT, Y) - _mm(base.mT, Y)

    return _subspace_iteration(apply, apply_t, A, rank, niter, oversample, init, generator, dtype)


def _mm(M: Tensor, X: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``M @ X`` (cast to ``dtype``) for a large ``M`` and a thin ``X``; when ``M`` is a transposed
    (column-major) view, computed as ``(Xᵀ Mᵀ)ᵀ``: CPU BLAS runs a column-major left operand 2.6x
    slower (float32). The cast comes before the final transpose (a batched transposed copy is slow)."""
    if M.stride(-2) == 1 and M.stride(-1) != 1:
        out = X.mT @ M.mT
        return (out if dtype is None else out.to(dtype)).mT
    out = M @ X
    return out if dtype is None else out.to(dtype)


def _blocked(
    A: Tensor,
    base: Tensor | None,
    rank: int,
    niter: int,
    oversample: int,
    init: Tensor | None,
    generator: torch.Generator | None,
    rows: int,
    dtype: torch.dtype,
    lp: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``randomized_svd`` with every product taken over row blocks of ``A - base`` (see ``block_rows``)."""
    m = A.shape[-2]
    pdt = lp or dtype  # dtype of the products

    def block(r0: int) -> Tensor:
        blk = A[..., r0 : r0 + rows, :].to(dtype)
        blk = blk if base is None else blk - base[..., r0 : r0 + rows, :].to(dtype)
        return blk.to(pdt)

    def apply(X: Tensor) -> Tensor:
        X = X.to(pdt)
        return torch.cat([block(r0) @ X for r0 in range(0, m, rows)], dim=-2).to(dtype)

    def apply_t(Y: Tensor) -> Tensor:
        Y = Y.to(pdt)
        out = None
        for r0 in range(0, m, rows):
            part = (block(r0).mT @ Y[..., r0 : r0 + rows, :]).to(dtype)
            out = part if out is None else out + part
        return out

    return _subspace_iteration(apply, apply_t, A, rank, niter, oversample, init, generator, dtype, lp)


def _subspace_iteration(
    apply: Callable[[Tensor], Tensor],
    apply_t: Callable[[Tensor], Tensor],
    A: Tensor,
    rank: int,
    niter: int,
    oversample: int,
    init: Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    lp: torch.dtype | None = None,
    *,
    shape: tuple[int, int] | None = None,
    orth: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """HMT Alg. 4.4 + 5.1 on the operator ``apply`` (X -> M X) / ``apply_t`` (Y -> Mᵀ Y) of A's shape;
    ``lp``: the dtype the operator rounds its argument to (the final basis is corrected for it).

    For an operator whose rows are spread over processes (``A`` is then this process's block of
    rows, on the device the test matrix goes to): ``shape`` is the global ``(m, n)`` (it sets the
    sketch width, which must agree everywhere) and ``orth`` orthonormalises a row-distributed
    ``(*, m, l)`` block ``Y``, returning ``(Q, T)`` with ``Q = Y T`` (``T: (*, l, l)``) orthonormal.
    It replaces every left-side (m-side) QR and the basis correction; the right-side QRs act on
    replicated ``(*, n, l)`` blocks and stay local. Default: Householder QR of the local block."""
    m, n = A.shape[-2:] if shape is None else shape
    r = min(rank, m, n)
    l = min(rank + oversample, m, n)
    if generator is None:
        generator = torch.Generator(device=A.device)
        generator.manual_seed(_DEFAULT_SEED)
    omega = torch.randn(n, l, generator=generator, device=generator.device, dtype=dtype).to(A.device)
    if init is not None:
        omega = _warm_test_matrix(init, omega, dtype)

    def left(Y: Tensor) -> Tensor:  # orthonormal basis of an m-side block
        return torch.linalg.qr(Y).Q if orth is None else orth(Y)[0]

    Q = left(apply(omega))
    for _ in range(niter):
        Q = torch.linalg.qr(apply_t(Q)).Q
        Q = left(apply(Q))
    if lp is None:
        return _small_svd(Q, apply_t(Q).mT, r)
    Q = Q.to(lp).to(dtype)  # the basis the product sees, exactly
    B = apply_t(Q).mT
    if orth is not None:  # Q' = Q̃ T orthonormal: Q'ᵀ A = Tᵀ Q̃ᵀ A
        Q, T = orth(Q)
        return _small_svd(Q, T.mT.to(B.dtype) @ B, r)
    # Q̃ = Q' Lᵀ with Q' orthonormal: Q'ᵀ A = L⁻¹ Q̃ᵀ A (module doc, *Mixed precision*)
    L = torch.linalg.cholesky_ex(Q.mT @ Q).L  # QᵀQ = I + O(2⁻⁹): float32 is ample
    B = torch.linalg.solve_triangular(L, B, upper=False)
    Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT
    return _small_svd(Q, B, r)


def _small_svd(Q: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the projected ``B = Qᵀ A`` ``(*, l, n)`` through the eigenvalues of its ``l x l`` Gram
    matrix in float64 (several times faster than a float32 SVD of B; the float64 Gram keeps the
    squared condition number harmless down to ~1e-6 σ₁). Returns the top-``r`` triplets of A."""
    B64 = B.to(torch.float64)
    evals, Ub = torch.linalg.eigh(B64 @ B64.mT)  # ascending
    Ub = Ub.flip(-1)[..., :r].to(B.dtype)
    S = evals.flip(-1)[..., :r].clamp_min(0).sqrt().to(B.dtype)
    V = (B.mT @ Ub) / torch.where(S > 0, S, 1.0).unsqueeze(-2)  # zero columns where σ = 0
    return Q @ Ub, S, V


def _warm_test_matrix(init: Tensor, omega: Tensor, dtype: torch.dtype) -> Tensor:
    """``[init, omega]`` cut to ``omega``'s ``l`` columns: ``(*, n, l)``. Not orthonormalised: only
    the span of the sketch ``A Ω`` matters, and it is orthonormalised next."""
    n, l = omega.shape
    if init.dim() < 2 or init.shape[-2] != n:
        raise ValueError(f"init must have shape (*, n={n}, r0), got shape={tuple(init.shape)}")
    init = init[..., :l].to(device=omega.device, dtype=dtype)
    fill = (omega[:, : l - init.shape[-1]] / n**0.5).expand(*init.shape[:-2], n, -1)
    return torch.cat([init, fill], dim=-1)


@torch.no_grad()
def sketch_left_vectors(matrices: Sequence[Tensor], start: Tensor, k: int) -> Tensor:
    r"""Top-``k`` left singular vectors of each sketch :math:`A_i \Omega_i`, one pass over each :math:`A_i`.

    Args:
        matrices: ``b`` matrices :math:`A_i` ``(m, n)`` of one shape, any float dtype, used as they
            are (no copy; a transposed view is multiplied in its fast orientation).
        start: ``(b, n, l)`` columns that span (about) each :math:`A_i`'s leading right subspace;
            orthonormalised here to :math:`\Omega_i`.
        k: vectors wanted, ``<= l``.

    Returns:
        ``(b, m, k)`` float32: the left singular vectors of :math:`A_i \Omega_i` (QR, then the SVD
        of the ``l x l`` factor), by decreasing singular value. They are :math:`A_i`'s own when
        :math:`\Omega_i` spans its top-``l`` right subspace, and otherwise those of :math:`A_i`
        restricted to that span: the one-pass estimate the monitor uses for W_t = W_0 + ΔW, with
        :math:`\Omega` from W_0's and ΔW's top right vectors. Non-finite products give zeros.
    """
    omega = torch.linalg.qr(start.float()).Q
    Y = torch.stack(
        [_mm(A, omega[i].to(device=A.device, dtype=A.dtype), torch.float32) for i, A in enumerate(matrices)]
    )
    Q, R = torch.linalg.qr(torch.nan_to_num(Y, nan=0.0, posinf=0.0, neginf=0.0))
    return Q @ torch.linalg.svd(R).U[..., :k]


@torch.no_grad()
def lora_svd(B: Tensor, A: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Exact SVD of a LoRA update ``scale * B @ A`` from its factors, never forming the product.

    Args:
        B: ``(*, m, r)`` LoRA "up" factor.
        A: ``(*, r, n)`` LoRA "down" factor (batch dims broadcastable with ``B``'s).
        scale: the adapter's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA); any sign.

    Returns:
        ``(U, S, V)`` with ``U: (*, m, k)``, ``S: (*, k)`` descending and non-negative,
        ``V: (*, n, k)``, ``k = min(r, m, n)`` (``= r`` for every real adapter), so that
        ``scale * B @ A = U diag(S) Vᵀ`` up to round-off; the product has rank ``<= k``, so the
        rest of its spectrum is exactly zero. float32 (float64 for float64 input), no autograd.
    """
    if B.dim() < 2 or A.dim() < 2 or B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"expected B: (*, m, r) and A: (*, r, n), got B.shape={tuple(B.shape)}, A.shape={tuple(A.shape)}"
        )
    dtype = _working_dtype(B, A)
    Qb, Rb = torch.linalg.qr(B.to(dtype))
    Qa, Ra = torch.linalg.qr(A.to(dtype).mT)
    Uc, S, Vch = torch.linalg.svd(scale * (Rb @ Ra.mT), full_matrices=False)
    return Qb @ Uc, S, Qa @ Vch.mT
