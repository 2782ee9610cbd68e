r"""Randomized SVDs of weight updates under data-parallel and sharded training (``torch.distributed``).

Every rank calls :func:`distributed_update_svd` with the same layer list; each layer's update
:math:`\Delta W = W_t - W_0` is decomposed along one of three *routes*, chosen from its parameter's
type (:func:`shard_kind`) and size, never from trainer flags:

* ``local`` — a replicated parameter (DDP, or no wrapper): one owner rank, picked by
  longest-processing-time-first over the layer costs (:func:`lpt_assign`), runs the ordinary
  :func:`~spectral_monitor.functional.rsvd.randomized_svd`; only the owner keeps that layer's base.
* ``sharded`` — a DTensor sharded on one dim of a 1-D mesh (FSDP2 ``fully_shard`` gives
  ``Shard(0)`` of the stored weight, tensor-parallel row-wise layers ``Shard(1)``) with more than
  ``gather_max_numel`` elements: :func:`sharded_randomized_svd` on every rank's own block, with the
  base stored shard-local. Only ``n x l`` and ``l x l`` blocks cross the wire (``l`` = sketch width).
* ``gather`` — any other sharded parameter (FSDP1 flat views, DeepSpeed ZeRO-3 partitions, small
  or multi-dim-mesh DTensors): each rank forms its piece of :math:`\Delta W` from its shard-local
  base, the pieces are all-gathered, and an owner decomposes the whole matrix.

Results of owner-computed layers travel in one packed, fixed-shape ``all_reduce`` (owners write
their slots, everyone else zeros), so every rank ends with every layer's ``U, S, V`` and
:math:`\|\Delta W\|_F^2`.

**Collective discipline.** A rank that skips a collective, or enters them in another order,
hangs the job. Here the sequence of collectives and their shapes depend only on data that is the
same on every rank (the layer list, global shapes, routes, ``rank``/``oversample``/``niter``, and
all-reduced values); a fingerprint of that plan is compared across ranks first and a mismatch
raises on every rank. Per-layer local work (forming :math:`\Delta W`, products, factorisations,
the owner's SVD) runs under a guard: an exception there is recorded, the rank continues with
zeros of the right shape and still enters every collective, and the all-reduced failure flags
mark the layer failed on every rank (``LayerResult.error`` holds the message; the texts are
all-gathered only when something failed). A rank that dies or stalls outside this code is
caught by the process group's own timeout (``init_process_group(timeout=...)``; with NCCL,
keep ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default so the watchdog aborts the job).

**Sharded randomized SVD.** Rank :math:`i` holds rows :math:`D_i` of :math:`\Delta W`. The
sketch :math:`Y_i = D_i \Omega` is local (:math:`\Omega` drawn from identically seeded generators);
the row-distributed :math:`Y` is orthonormalised by CholeskyQR2 — two passes of
:math:`G = \sum_i Y_i^\top Y_i` (float64, all-reduced), :math:`Y \leftarrow Y L^{-\top}` — and
:math:`\Delta W^\top Q = \sum_i D_i^\top Q_i` is an all-reduced sum, so the algorithm of
:mod:`spectral_monitor.functional.rsvd` runs unchanged on these operators. One CholeskyQR pass
leaves :math:`Q` orthonormal to :math:`O(\kappa(Y)^2 u)` only; the second pass restores it to
working precision (Yamamoto et al. 2015). Where Cholesky fails or a pivot falls below
:math:`\sqrt{\ell\,\epsilon}` of the largest (a zero or rank-deficient update: :math:`Y` has fewer
than :math:`\ell` directions), the factor comes from the eigendecomposition of :math:`G` over its
eigenvalues above :math:`\ell\,\epsilon\,\lambda_{\max}`, and the missing directions become zero
columns of :math:`Q` (hence zero singular values, zero columns of ``U``/``V``). Column-sharded
layers (``Shard(1)`` in canonical orientation) run the same algorithm on :math:`\Delta W^\top`
with the roles of ``U`` and ``V`` swapped — nothing is gathered. Decisions inside the algorithm
read only all-reduced values, so every rank takes the same branch.

Assumes every rank runs the same software on the same kind of device (replicated small
factorisations must agree to round-off) and that the group's rank order is the shard order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spectral_monitor.errors import BaseMismatchError, NonFiniteError, SpectralMonitorError
from spectral_monitor.functional.rsvd import _mm, _subspace_iteration, _working_dtype, randomized_svd
from spectral_monitor.functional.spectrum import frobenius_sq
from spectral_monitor.layers import LayerSpec
from spectral_monitor.snapshot import BaseStore

__all__ = [
    "DEFAULT_GATHER_MAX_NUMEL",
    "DistLayer",
    "DistributedError",
    "LayerResult",
    "ShardedBase",
    "all_reduce_max",
    "distributed_update_svd",
    "global_shape",
    "local_piece",
    "lpt_assign",
    "shard_kind",
    "sharded_randomized_svd",
]

# DTensor layers with at most this many elements (3 Mi: every GPT-2-small matrix) are gathered to
# an LPT owner, larger ones (2048x2048 and up) decomposed in place. benchmarks/bench_distributed.py,
# gloo, 2 ranks, 2 shared CPU cores, CPU time of the busiest rank, cold (niter 6), gathered vs
# sharded: one 768x3072 layer 73 vs 69 ms (another run 61 vs 99: a tie), 2048x2048 116 vs 92 ms,
# 4096x4096 539 vs 254 ms; 8 GPT-2-small block matrices 265 vs 368 ms (warm: 136 vs 146 ms). The
# sharded route pays 3 niter + 6 collectives per batch of same-shape layers and the n-side QRs on
# every rank; gathering sends the whole ΔW and leaves one rank all of the layer's products.
DEFAULT_GATHER_MAX_NUMEL = 3 << 20

# Memory for one batch of same-shape sharded layers (their local ΔW rows, float32).
_BATCH_BYTES = 256 << 20

_F64 = torch.float64


class DistributedError(SpectralMonitorError, RuntimeError):
    """Ranks disagree on what to compute (layer list, shapes, routes, warm starts), or a collective
    computation failed; raised on every rank at the same point, never on one alone."""


# ----------------------------------------------------------------------------------------------
# scheduling and detection


def all_reduce_max(values: Sequence[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise maximum of ``values`` over the ranks of ``group`` (collective), on the device the
    backend needs (the current CUDA device for NCCL, the CPU otherwise)."""
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def lpt_assign(costs: Sequence[float], world: int, loads: Sequence[float] | None = None) -> list[int]:
    """Owner rank of each job by longest-processing-time-first: jobs by decreasing cost (ties by
    index), each to the least-loaded rank (ties by rank). Deterministic, so every rank computes the
    same list from the same costs; makespan within 4/3 of the optimum (Graham 1969).

    ``loads``: optional starting load of each rank (``world`` entries).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got world={world}")
    load = [0.0] * world if loads is None else [float(x) for x in loads]
    if len(load) != world:
        raise ValueError(f"loads must have world={world} entries, got {len(load)}")
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _is_dtensor(p: Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(p, cls)


def shard_kind(p: Tensor, model: nn.Module | None = None) -> str:
    """How ``p`` is stored: ``"dtensor"`` (FSDP2 / tensor parallel), ``"zero3"`` (DeepSpeed ZeRO-3
    partition: ``ds_id``, data of shape ``[0]``), ``"fsdp1"`` (a ``use_orig_params`` view into an
    FSDP1 flat parameter: 1-D or empty, flagged ``_fsdp_flattened``; with ``model``, also any
    non-2-D weight under a ``FullyShardedDataParallel`` module) or ``"replicated"`` (every rank
    holds the whole tensor: DDP, no wrapper, FSDP1 ``NO_SHARD`` or inside ``summon_full_params``).
    """
    if _is_dtensor(p):
        return "dtensor"
    if hasattr(p, "ds_id") and hasattr(p, "ds_tensor"):
        return "zero3"
    if p.dim() != 2:
        if getattr(p, "_fsdp_flattened", False):
            return "fsdp1"
        if model is not None and any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
            return "fsdp1"
    return "replicated"


def global_shape(p: Tensor, module: nn.Module | None = None) -> tuple[int, int]:
    """Shape of the whole 2-D weight ``p`` in its storage orientation, on any rank: the DTensor's
    global shape, ZeRO-3's ``ds_shape``, or for an FSDP1 view the owning ``module``'s
    ``(out_features, in_features)`` (``nn.Linear``) / ``(nx, nf)`` (HF ``Conv1D``)."""
    kind = shard_kind(p)
    if kind == "zero3":
        return tuple(p.ds_shape)
    if kind == "fsdp1":
        if isinstance(module, nn.Linear):
            return (module.out_features, module.in_features)
        if module is not None and hasattr(module, "nf") and hasattr(module, "nx"):
            return (module.nx, module.nf)
        raise BaseMismatchError(
            f"an FSDP1 view of shape {tuple(p.shape)} does not say its full shape; pass the nn.Linear/Conv1D module"
        )
    if p.dim() != 2:
        raise BaseMismatchError(f"expected a 2-D weight, got shape {tuple(p.shape)}")
    return (p.shape[0], p.shape[1])


def local_piece(p: Tensor) -> Tensor:
    """This rank's part of ``p`` as a plain tensor (no autograd): the DTensor's unpadded local shard,
    the valid (unpadded) part of a ZeRO-3 partition (1-D), the FSDP1 view (1-D), or ``p`` itself."""
    kind = shard_kind(p)
    if kind == "dtensor":
        return p.to_local().detach()
    if kind == "zero3":
        part = p.ds_tensor.detach()  # rank r holds flat[r * size : (r + 1) * size], the last one padded
        size = part.numel()
        start = size * dist.get_rank(p.ds_process_group)
        return part[: max(0, min(size, p.ds_numel - start))]
    return p.detach()


@dataclass(frozen=True, eq=False)
class DistLayer:
    """One monitored matrix under torch.distributed.

    ``param``: the live parameter as training holds it (DTensor, FSDP1 view, ZeRO-3 parameter or
    plain tensor); ``shape``: the whole weight's shape in storage orientation (:func:`global_shape`);
    ``transposed``: the canonical ``(out, in)`` matrix is the stored one transposed (HF ``Conv1D``).
    """

    name: str
    param: Tensor
    shape: tuple[int, int]
    transposed: bool = False

    @property
    def canonical_shape(self) -> tuple[int, int]:
        """``(m, n) = (out, in)``: the shape of the ``U``/``V`` the results refer to."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    @classmethod
    def from_spec(cls, spec: LayerSpec) -> DistLayer:
        """The dense layer of ``spec`` (not LoRA: its ΔW comes from the adapter factors)."""
        if spec.kind == "lora":
            raise BaseMismatchError(f"layer {spec.name!r} is a LoRA layer: decompose its factors, not W_t - W_0")
        p = spec.parameter()
        return cls(spec.name, p, global_shape(p, spec.module), spec.transposed)


def _shard_dim(layer: DistLayer) -> int | None:
    """Canonical dim along which ``layer`` is split on a 1-D mesh, or None (not such a DTensor)."""
    p = layer.param
    if not _is_dtensor(p) or p.device_mesh.ndim != 1:
        return None
    place = p.placements[0]
    if not (place.is_shard() and place.dim in (0, 1)):
        return None
    return place.dim ^ int(layer.transposed)


def _route(layer: DistLayer, kind: str, gather_max_numel: int) -> str:
    if kind == "replicated":
        return "local"
    m, n = layer.shape
    if kind == "dtensor" and _shard_dim(layer) is not None and m * n > gather_max_numel:
        return "sharded"
    return "gather"


def _local_owners(layers: Sequence[DistLayer], kinds: Sequence[str], world: int) -> dict[str, int]:
    """Owner of each replicated layer: LPT over their sizes (the rSVD cost is ``∝ m n`` at a fixed
    sketch width). A function of the layer list only, so the base snapshot and every measurement agree."""
    rep = [layer for layer, kind in zip(layers, kinds) if kind == "replicated"]
    owners = lpt_assign([float(layer.shape[0] * layer.shape[1]) for layer in rep], world)
    return {layer.name: o for layer, o in zip(rep, owners)}


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------------------------
# base store


class ShardedBase(BaseStore):
    """W_0 as each rank needs it: for sharded parameters this rank's piece (:func:`local_piece`:
    memory per rank ∝ 1/N), for replicated ones the whole matrix only on the layer's owner rank
    (so also about 1/N of them per rank). Tensors keep the parameter's storage orientation and dtype.
    """

    kind = "sharded"

    def __init__(self, tensors: dict[str, Tensor], owners: dict[str, int]) -> None:
        self._tensors = tensors
        self.owners = owners  # replicated layers' owner ranks

    @classmethod
    @torch.no_grad()
    def snapshot(
        cls,
        layers: Sequence[DistLayer],
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> ShardedBase:
        """Copy this rank's share of every layer's current weight (no collective). ``device``: where
        the copies live (default: the parameter's device; ``"cpu"`` keeps accelerator memory free)."""
        world, me = _group_info(group)
        kinds = [shard_kind(layer.param) for layer in layers]
        owners = _local_owners(layers, kinds, world)
        tensors = {}
        for layer, kind in zip(layers, kinds):
            if kind == "replicated" and owners[layer.name] != me:
                continue
            t = local_piece(layer.param)
            tensors[layer.name] = t.to(device if device is not None else t.device, copy=True)
        return cls(tensors, owners)

    def local(self, layer: DistLayer, device: torch.device) -> Tensor:
        """This rank's base piece of ``layer`` on ``device``."""
        try:
            return self._tensors[layer.name].to(device, non_blocking=True)
        except KeyError:
            raise BaseMismatchError(f"the sharded base holds no piece of layer {layer.name!r} on this rank") from None

    def get(self, spec: LayerSpec, device: torch.device) -> Tensor:
        return self._tensors[spec.name].to(device, non_blocking=True)

    @property
    def pieces(self) -> Mapping[str, Tensor]:
        """This rank's base pieces by layer name (read-only view; e.g. to persist them per rank)."""
        return MappingProxyType(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


# ----------------------------------------------------------------------------------------------
# guarded local work


class _Failures:
    """Errors of per-layer local work, by job index; the work's fallback keeps the collectives going."""

    def __init__(self) -> None:
        self.errors: dict[int, str] = {}

    def run(self, jobs: Sequence[int], fn: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        if any(j in self.errors for j in jobs):
            return fallback()  # already failed: skip the work, keep the shapes
        try:
            return fn()
        except Exception as exc:  # any local failure: recorded, never allowed to skip a collective
            msg = f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}"
            for j in jobs:
                self.errors.setdefault(j, msg)
            return fallback()


# ----------------------------------------------------------------------------------------------
# sharded randomized SVD


def _orth_factor(G: Tensor) -> Tensor:
    """``T: (*, l, l)`` float64 with ``Y T`` orthonormal, from the Gram matrix ``G = YᵀY`` (float64).

    Cholesky ``G = L Lᵀ`` gives ``T = L⁻ᵀ``; where it fails or its smallest pivot is below
    ``sqrt(l eps)`` of the largest, ``T = V Λ^{-1/2}`` over the eigenpairs of ``G`` above
    ``l eps λ_max``, zero columns for the rest (directions ``Y`` lacks). A non-finite ``G`` gives
    ``T = 0``. ``G`` is all-reduced, so every rank takes the same branch (and none holds a collective).
    """
    l = G.shape[-1]
    eps = torch.finfo(_F64).eps
    finite = torch.isfinite(G).all(-1).all(-1)[..., None, None]
    G = torch.where(finite, G, 0.0)
    eye = torch.eye(l, dtype=_F64, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    piv = L.diagonal(dim1=-2, dim2=-1)
    ok = ((info == 0) & (piv.amin(-1) > math.sqrt(l * eps) * piv.amax(-1)))[..., None, None]
    T = torch.linalg.solve_triangular(torch.where(ok, L, eye), eye, upper=False).mT
    if not bool(ok.all()):
        evals, V = torch.linalg.eigh(G)
        keep = evals > l * eps * evals[..., -1:].clamp_min(torch.finfo(_F64).tiny)
        T_eig = V * torch.where(keep, evals.clamp_min(torch.finfo(_F64).tiny).rsqrt(), 0.0).unsqueeze(-2)
        T = torch.where(ok, T, T_eig)
    return torch.where(finite, T, 0.0)


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    dist.all_reduce(t, group=group)
    return t


def _gather_rows(local: Tensor, counts: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """``(*, sum(counts), k)``: the ranks' ``(*, counts[i], k)`` blocks stacked in rank order (uneven
    blocks are padded to the largest for ``all_gather``)."""
    top = max(counts)
    pad = local.new_zeros(*local.shape[:-2], top, local.shape[-1])
    pad[..., : local.shape[-2], :] = local
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[..., :c, :] for p, c in zip(parts, counts)], dim=-2)


def _block_shapes(block: Tensor, group: dist.ProcessGroup | None) -> list[tuple[int, ...]]:
    """Every rank's ``block.shape`` (all ranks' blocks have as many dims), in rank order."""
    world, _ = _group_info(group)
    mine = torch.tensor(block.shape, dtype=torch.int64, device=block.device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [tuple(t.tolist()) for t in out]


class _RowShardedOps:
    """The products of a row-sharded batch ``D`` (b, rows, n), this rank's rows of ΔW, for the
    subspace iteration: each rank computes its part, collectives combine them; a local failure
    (recorded in ``fails`` under ``jobs``) contributes zeros so every rank still joins every collective."""

    def __init__(
        self,
        D: Tensor,
        fails: _Failures,
        jobs: Sequence[int],
        group: dist.ProcessGroup | None,
        *,
        n: int,
        l: int,
        dtype: torch.dtype,
    ) -> None:
        self.D, self.fails, self.jobs, self.group = D, fails, jobs, group
        self.b, self.rows = D.shape[0], D.shape[1]
        self.n, self.l, self.dtype, self.device = n, l, dtype, D.device

    def _zeros(self, *shape: int, dtype: torch.dtype) -> Tensor:
        return torch.zeros(self.b, *shape, dtype=dtype, device=self.device)

    def apply(self, X: Tensor) -> Tensor:
        """Local rows of ΔW X: (b, rows, k)."""
        D = self.D
        return self.fails.run(
            self.jobs,
            lambda: _mm(D, X.to(D.dtype), self.dtype),
            lambda: self._zeros(self.rows, X.shape[-1], dtype=self.dtype),
        )

    def apply_t(self, Y: Tensor) -> Tensor:
        """ΔWᵀ Y = Σ_ranks D_iᵀ Y_i: (b, n, k), replicated."""
        D = self.D
        part = self.fails.run(
            self.jobs,
            lambda: _mm(D.mT, Y.to(D.dtype), self.dtype),
            lambda: self._zeros(self.n, Y.shape[-1], dtype=self.dtype),
        )
        return _all_reduce(part, self.group)

    def gram(self, Y: Tensor) -> Tensor:
        """YᵀY over all ranks' rows: (b, l, l) float64."""

        def part() -> Tensor:
            Y64 = Y.to(_F64)
            return Y64.mT @ Y64

        return _all_reduce(self.fails.run(self.jobs, part, lambda: self._zeros(self.l, self.l, dtype=_F64)), self.group)

    def orth(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        """CholeskyQR2 of the row-sharded Y: local rows of Q = Y T1 T2, and T1 T2 (b, l, l)."""
        run, jobs = self.fails.run, self.jobs

        def zero() -> Tensor:
            return self._zeros(self.l, self.l, dtype=_F64)

        G1 = self.gram(Y)
        T1 = run(jobs, lambda: _orth_factor(G1), zero)
        Q1 = run(jobs, lambda: Y.to(_F64) @ T1, lambda: self._zeros(self.rows, self.l, dtype=_F64))
        G2 = self.gram(Q1)
        T2 = run(jobs, lambda: _orth_factor(G2), zero)
        return run(jobs, lambda: (Q1 @ T2).to(Y.dtype), lambda: torch.zeros_like(Y)), T1 @ T2


def _sharded_svd(
    local: Tensor,
    base: Tensor | None,
    rank: int,
    shape: tuple[int, int],
    dim: int,
    niter: int,
    oversample: int,
    init: Tensor | None,
    generator: torch.Generator | None,
    sketch_dtype: torch.dtype | None,
    group: dist.ProcessGroup | None,
    gather: bool,
    fails: _Failures,
    jobs: Sequence[int],
    nonfinite_fails: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sharded_randomized_svd` with local failures recorded in ``fails`` under ``jobs``; also
    returns ``‖ΔW‖_F²`` ``(*,)`` float64. Non-finite local rows are a failure with ``nonfinite_fails``,
    else they count as zero in the decomposition and ``‖ΔW‖_F²`` comes out NaN/Inf."""
    batched = local.dim() == 3
    if not batched:
        local = local[None]
        base = None if base is None else base[None]
        init = None if init is None else init[None]
    b = local.shape[0]
    device = local.device
    dtype = _working_dtype(local) if base is None else _working_dtype(local, base)
    if dim == 1:  # ΔWᵀ is row-sharded: decompose it and swap U and V at the end
        local = local.mT
        base = None if base is None else base.mT
        shape = (shape[1], shape[0])
    m, n = shape
    rows = local.shape[-2]
    blocks = _block_shapes(local, group)
    counts = [r for _, r, _ in blocks]
    if sum(counts) != m or any(bb != b or c != n for bb, _, c in blocks):  # the same verdict on every rank
        raise DistributedError(f"the ranks' local blocks {blocks} do not tile a batch of {b} {m}x{n} matrices by rows")
    lp = None if sketch_dtype in (None, dtype) else sketch_dtype
    pdt = lp or dtype

    def form() -> tuple[Tensor, Tensor]:
        D = local.to(dtype)
        if base is not None:
            if base.shape != local.shape:
                raise BaseMismatchError(f"base piece shape {tuple(base.shape)} vs weight piece {tuple(local.shape)}")
            D = D - base.to(dtype)
        fro = frobenius_sq(D).to(_F64)
        if not bool(torch.isfinite(fro).all()):  # a local branch: no collective depends on it
            if nonfinite_fails:
                raise NonFiniteError(f"NaN/Inf in the local block of matrices {torch.isfinite(fro).logical_not()}")
            D = torch.where(torch.isfinite(fro)[:, None, None], D, 0.0)
        return D.to(pdt), fro

    D, fro = fails.run(
        jobs,
        form,
        lambda: (torch.zeros(b, rows, n, dtype=pdt, device=device), torch.zeros(b, dtype=_F64, device=device)),
    )
    l = min(rank + oversample, m, n)

    ops = _RowShardedOps(D, fails, jobs, group, n=n, l=l, dtype=dtype)

    if dim == 1 and init is not None:
        # A warm start V (n x r0) of ΔW lives on ΔWᵀ's left side; ΔW V = (ΔWᵀ)ᵀ V is a start on its right.
        off = sum(counts[: dist.get_rank(group)])
        init = ops.apply_t(init[..., off : off + rows, :].to(device=device, dtype=dtype))
    U, S, V = _subspace_iteration(
        ops.apply, ops.apply_t, D, rank, niter, oversample, init, generator, dtype, lp, shape=(m, n), orth=ops.orth
    )
    if gather:
        U = _gather_rows(U, counts, group)
    fro = _all_reduce(fro, group)
    if dim == 1:
        U, V = V, U
    if not batched:
        U, S, V, fro = U[0], S[0], V[0], fro[0]
    return U, S, V, fro


@torch.no_grad()
def sharded_randomized_svd(
    local: Tensor,
    rank: int,
    *,
    shape: tuple[int, int],
    dim: int = 0,
    base: Tensor | None = None,
    niter: int = 2,
    oversample: int = 10,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    sketch_dtype: torch.dtype | None = None,
    group: dist.ProcessGroup | None = None,
    gather: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Top-``rank`` SVD of a matrix ``A`` (or ``A - base``) split over ``group`` by rows or columns.

    Collective: every rank of ``group`` calls it with the same ``rank``, ``shape``, ``dim``,
    ``niter``, ``oversample``, ``sketch_dtype``, batch size, warm start and an identically seeded
    ``generator``; rank ``i`` of the group holds the ``i``-th block (uneven blocks, even empty ones,
    are fine). Sharding and cost as in the module doc; the arithmetic is
    :func:`~spectral_monitor.functional.rsvd.randomized_svd`'s.

    Args:
        local: ``(*, m_i, n)`` this rank's rows of ``A`` (``dim=0``) or ``(*, m, n_i)`` its columns
            (``dim=1``), in ``A``'s orientation.
        rank, niter, oversample, generator, sketch_dtype: as for ``randomized_svd``.
        shape: the global ``(m, n)``.
        dim: the dim of ``A`` that is split.
        base: optional block of the base, ``local``'s shape; the SVD is of ``A - base``.
        init: optional ``(*, n, r0)`` warm start (the whole ``V`` of an earlier call), the same on every rank.
        group: the process group (default: the world).
        gather: all-gather the split factor (``U`` for ``dim=0``, ``V`` for ``dim=1``); else it is
            returned as this rank's block of rows ``(*, m_i, r)`` / ``(*, n_i, r)``.

    Returns:
        ``(U, S, V)``: ``U (*, m, r)``, ``S (*, r)`` descending, ``V (*, n, r)``, ``r = min(rank, m, n)``,
        float32 (float64 for float64 input), the same on every rank. Directions the matrix does not
        have (rank below the sketch width) give zero singular values with zero columns in ``U``/``V``.

    Raises:
        DistributedError: on every rank, when the blocks do not tile ``shape`` or local work
            (shapes, memory, NaN/Inf entries) failed on any rank; the message names the rank and the error.
    """
    if rank < 1 or niter < 0 or oversample < 0:
        raise ValueError(f"need rank >= 1, niter >= 0, oversample >= 0; got {rank}, {niter}, {oversample}")
    if dim not in (0, 1) or local.dim() not in (2, 3):
        raise ValueError(f"need dim in (0, 1) and local of shape (*, rows, cols); got dim={dim}, {tuple(local.shape)}")
    fails = _Failures()
    args = (rank, tuple(shape), dim, niter, oversample, init, generator, sketch_dtype, group, gather)
    U, S, V, _ = _sharded_svd(local, base, *args, fails, [0], nonfinite_fails=True)
    _raise_failures(fails, local.device, group)
    return U, S, V


def _raise_failures(fails: _Failures, device: torch.device, group: dist.ProcessGroup | None) -> None:
    """All-reduce "something failed"; if so, raise on every rank with every rank's messages."""
    flag = torch.tensor([float(bool(fails.errors))], device=device)
    if _all_reduce(flag, group).item() > 0:
        world, _ = _group_info(group)
        msgs: list[Any] = [None] * world
        dist.all_gather_object(msgs, sorted(set(fails.errors.values())), group=group)
        raise DistributedError("sharded randomized SVD failed: " + "; ".join(m for ms in msgs for m in ms))


# ----------------------------------------------------------------------------------------------
# every layer, every route


@dataclass
class LayerResult:
    """One layer's decomposition, the same on every rank.

    ``U (m, r)``, ``S (r,)``, ``V (n, r)``: top singular triplets of the canonical ``(out, in)`` ΔW
    (None on the other ranks for a layer decomposed by an owner when factors are not shared);
    ``fro``: ``‖ΔW‖_F²`` (float64 sum; NaN/Inf when the update is non-finite, then ``U, S, V`` are
    zeros); ``route``: ``local`` / ``gather`` / ``sharded``; ``owner``: the rank that decomposed it
    (None for ``sharded``: all did); ``error``: why it failed (then the tensors are meaningless).
    """

    name: str
    U: Tensor | None
    S: Tensor | None
    V: Tensor | None
    fro: float
    route: str
    owner: int | None
    error: str | None = field(default=None)

    @property
    def failed(self) -> bool:
        return self.error is not None


def _seed(seed: int, name: str) -> int:
    """Generator seed of one layer: independent of the layer's owner, the world size and the other layers."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def _check_plan(plan: list[Any], device: torch.device, group: dist.ProcessGroup | None) -> None:
    """Compare a fingerprint of ``plan`` across ranks (one all-reduce); raise on every rank if they differ."""
    text = repr(plan).encode()
    h = zlib.crc32(text) | (zlib.adler32(text) << 31)
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):  # max != min: seen the same way by every rank
        raise DistributedError(
            "ranks disagree on the layers to decompose (names, shapes, sharding, warm starts or settings); "
            f"this rank's plan starts {repr(plan)[:300]}"
        )


def _sharded_batches(layers: Sequence[DistLayer], idx: list[int], init: Mapping[str, Tensor]) -> list[list[int]]:
    """Same-shape sharded layers in batches (first-appearance order, bounded memory), from global data only."""
    groups: dict[Any, list[int]] = {}
    for i in idx:
        layer = layers[i]
        p = layer.param
        v = init.get(layer.name)
        key = (
            layer.canonical_shape,
            _shard_dim(layer),
            layer.transposed,
            p.dtype,
            tuple(p.device_mesh.mesh.flatten().tolist()),
            None if v is None else tuple(v.shape),
        )
        groups.setdefault(key, []).append(i)
    batches = []
    for key, members in groups.items():
        m, n = key[0]
        world = len(key[4])
        per_layer = (math.ceil(m / world) * n if key[1] == 0 else m * math.ceil(n / world)) * 4
        size = max(1, _BATCH_BYTES // max(1, per_layer))
        batches += [members[k : k + size] for k in range(0, len(members), size)]
    return batches


def _delta(piece: Tensor, b0: Tensor, device: torch.device, out: Tensor | None = None) -> Tensor:
    """``piece - b0`` on ``device`` in the working dtype (float32, or float64 for float64 weights),
    into ``out`` when given (upcast before the subtraction: a low-precision difference would round ΔW)."""
    if b0.shape != piece.shape:
        raise BaseMismatchError(f"base piece shape {tuple(b0.shape)} vs weight piece {tuple(piece.shape)}")
    dtype = _working_dtype(piece, b0)
    if out is None:
        return piece.to(device, dtype) - b0.to(device, dtype)
    if piece.dtype == b0.dtype == out.dtype and piece.device == b0.device == out.device:
        return torch.sub(piece, b0, out=out)  # one fused pass
    return out.copy_(piece).sub_(b0.to(device))


def _gather_flat(piece: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The ranks' 1-D pieces concatenated in rank order (FSDP1 views and ZeRO-3 partitions are
    consecutive ranges of the row-major flattened weight, in rank order)."""
    counts = [r for r, _ in _block_shapes(piece.reshape(-1, 1), group)]
    return _gather_rows(piece.reshape(-1, 1), counts, group).reshape(-1)


def _gather_full(
    layer: DistLayer, kind: str, D: Tensor, group: dist.ProcessGroup | None, fails: _Failures, i: int
) -> Tensor:
    """The whole stored-orientation ΔW on every rank from this rank's piece ``D`` (a collective)."""
    p = layer.param
    if kind == "dtensor":
        dt = type(p).from_local(D, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return dt.full_tensor()
    flat = _gather_flat(D, p.ds_process_group if kind == "zero3" else group)
    m, n = layer.shape
    return fails.run([i], lambda: flat.view(m, n), lambda: flat.new_zeros(m, n))


class _Measurement:
    """State of one :func:`distributed_update_svd` call on this rank (see there)."""

    def __init__(
        self,
        layers: Sequence[DistLayer],
        base: ShardedBase,
        device: torch.device,
        group: dist.ProcessGroup | None,
        settings: dict[str, Any],
    ) -> None:
        self.layers, self.base, self.device, self.group = layers, base, device, group
        self.rank, self.niter, self.oversample = settings["rank"], settings["niter"], settings["oversample"]
        self.seed, self.init, self.sketch_dtype = settings["seed"], settings["init"], settings["sketch_dtype"]
        self.fails = _Failures()
        self.found: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer index -> (U, S, V)
        self.fro = torch.zeros(len(layers), dtype=_F64, device=device)

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_seed(self.seed, name))

    def solve(self, i: int, D: Tensor) -> None:
        """Owner: decompose the whole canonical ``(m, n)`` ΔW of layer ``i``."""
        f = frobenius_sq(D).to(_F64)
        self.fro[i] = f
        if torch.isfinite(f):
            name = self.layers[i].name
            v = self.init.get(name)
            self.found[i] = randomized_svd(
                D,
                self.rank,
                niter=self.niter,
                oversample=self.oversample,
                init=None if v is None else v.to(self.device),
                generator=self.generator(name),
                sketch_dtype=self.sketch_dtype,
            )

    def sharded(self, batch: list[int]) -> None:
        """Every rank: one batch of same-shape sharded layers."""
        layers, device = self.layers, self.device
        first = layers[batch[0]]
        pieces = [local_piece(layers[i].param) for i in batch]
        dtype = _working_dtype(pieces[0])

        def stack() -> Tensor:
            buf = torch.empty(len(batch), *pieces[0].shape, dtype=dtype, device=device)
            for j, i in enumerate(batch):
                _delta(pieces[j], self.base.local(layers[i], device), device, out=buf[j])
            return buf

        D = self.fails.run(batch, stack, lambda: torch.zeros(len(batch), *pieces[0].shape, dtype=dtype, device=device))
        v = [self.init.get(layers[i].name) for i in batch]
        U, S, V, f = _sharded_svd(
            D.mT if first.transposed else D,
            None,
            self.rank,
            first.canonical_shape,
            _shard_dim(first),
            self.niter,
            self.oversample,
            None if v[0] is None else torch.stack([x.to(device, dtype) for x in v]),
            self.generator(first.name),
            self.sketch_dtype,
            first.param.device_mesh.get_group(0),
            True,
            self.fails,
            batch,
        )
        for j, i in enumerate(batch):
            bad = not math.isfinite(f[j])  # all-reduced: the same on every rank
            self.found[i] = tuple(torch.zeros_like(x) if bad else x for x in (U[j], S[j], V[j]))
            self.fro[i] = f[j]

    def gathered(self, i: int, kind: str, owner: int) -> None:
        """Every rank: gather layer ``i``'s ΔW; its owner decomposes it."""
        layer, device = self.layers[i], self.device
        piece = local_piece(layer.param)
        D = self.fails.run(
            [i],
            lambda: _delta(piece, self.base.local(layer, device), device),
            lambda: torch.zeros(piece.shape, dtype=_working_dtype(piece), device=device),
        )
        full = _gather_full(layer, kind, D, self.group, self.fails, i)
        if owner == dist.get_rank(self.group):
            self.fails.run([i], lambda: self.solve(i, full.mT if layer.transposed else full), lambda: None)

    def local(self, i: int) -> None:
        """Owner only: a replicated layer."""
        layer = self.layers[i]

        def work() -> None:
            D = _delta(layer.param.detach(), self.base.local(layer, self.device), self.device)
            self.solve(i, D.mT if layer.transposed else D)

        self.fails.run([i], work, lambda: None)

    def exchange(
        self, routes: list[str], owner: dict[int, int | None], dtype: torch.dtype, share: bool
    ) -> list[LayerResult]:
        """Owners' results to every rank: one packed all-reduce of ``U, S, V`` (owners write their slots,
        the rest zeros; skipped unless ``share``), one of ``[‖ΔW‖_F², failed]``, and the error texts
        only if something failed."""
        layers, device, group, me = self.layers, self.device, self.group, dist.get_rank(self.group)
        slots, total = {}, 0
        for i, layer in enumerate(layers):
            if routes[i] != "sharded":
                m, n = layer.canonical_shape
                r = min(self.rank, m, n)
                slots[i] = (total, m, n, r)
                total += (m + n + 1) * r
        payload = torch.zeros(total, dtype=dtype, device=device)
        stats = torch.zeros(len(layers), 2, dtype=_F64, device=device)
        for i, (off, m, n, r) in slots.items():
            if owner[i] != me:
                continue
            stats[i, 0] = self.fro[i]
            if i in self.found and i not in self.fails.errors:
                U, S, V = self.found[i]
                payload[off : off + m * r] = U.reshape(-1)
                payload[off + m * r : off + (m + 1) * r] = S
                payload[off + (m + 1) * r : off + (m + n + 1) * r] = V.reshape(-1)
        for i in self.fails.errors:
            stats[i, 1] = 1.0
        if share:
            _all_reduce(payload, group)
        _all_reduce(stats, group)
        failed = stats[:, 1].tolist()
        messages: dict[int, list[str]] = {}
        if any(failed):  # decided on all-reduced flags: every rank enters the gather, or none does
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.fails.errors, group=group)
            for errs in gathered:
                for i, msg in errs.items():
                    messages.setdefault(i, []).append(msg)
        fro = stats[:, 0].tolist()
        results = []
        for i, layer in enumerate(layers):
            if routes[i] == "sharded":
                U, S, V = self.found[i]
                f = float(self.fro[i])
            elif share or owner[i] == me:  # the owner's own slot holds its result either way
                off, m, n, r = slots[i]
                U = payload[off : off + m * r].view(m, r)
                S = payload[off + m * r : off + (m + 1) * r]
                V = payload[off + (m + 1) * r : off + (m + n + 1) * r].view(n, r)
                f = fro[i]
            else:
                U = S = V = None
                f = fro[i]
            error = "; ".join(messages.get(i, ["failed on another rank"])) if failed[i] else None
            results.append(LayerResult(layer.name, U, S, V, f, routes[i], owner[i], error))
        return results


@torch.no_grad()
def distributed_update_svd(
    layers: Sequence[DistLayer],
    base: ShardedBase,
    rank: int,
    *,
    niter: int = 2,
    oversample: int = 10,
    seed: int = 0,
    init: Mapping[str, Tensor] | None = None,
    gather_max_numel: int = DEFAULT_GATHER_MAX_NUMEL,
    sketch_dtype: torch.dtype | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    share_factors: bool = True,
) -> list[LayerResult]:
    """Top-``rank`` SVD of every layer's ΔW = W_t - W_0, the work split over the ranks of ``group``.

    Collective: every rank calls it with the same ``layers`` (same order) and settings. Routes,
    owners and failure handling as in the module doc; the order of work is: sharded batches, then
    gathered layers, then replicated ones, then the exchange.

    Args:
        layers: the monitored matrices (:class:`DistLayer`), identical on every rank.
        base: this rank's :class:`ShardedBase`, snapshot from the same ``layers``.
        rank, niter, oversample, sketch_dtype: as for ``randomized_svd``.
        seed: each layer's test matrix comes from a generator seeded with ``seed`` and the layer's
            name, so results do not depend on the owner or the world size (vary ``seed`` per step).
        init: optional warm starts by layer name: ``(n, r0)``, e.g. the previous ``V`` (the same on every rank).
        gather_max_numel: DTensors up to this many elements are gathered instead of decomposed in place.
        group: the process group (default: the world).
        device: where results and the exchange live (default: the first layer's local device; with
            NCCL this must be the rank's GPU).
        share_factors: send every owner-decomposed layer's ``U, S, V`` to every rank (one all-reduce
            of ``Σ (m + n + 1) r`` floats). False: only the owner has them (others get None); norms,
            failures and the sharded layers' factors still reach every rank. Owners are stable from
            call to call (LPT over the layer list), so an owner can keep its layers' warm starts.

    Returns:
        One :class:`LayerResult` per layer, in order, on ``device``, the same on every rank.

    Raises:
        DistributedError: on every rank, when the ranks' plans differ.
        BaseMismatchError: on every rank, when ``base`` was taken for another layer list.
    """
    world, _ = _group_info(group)
    init = dict(init or {})
    if device is None:
        device = local_piece(layers[0].param).device if layers else torch.device("cpu")
    device = torch.device(device)
    kinds = [shard_kind(layer.param) for layer in layers]
    routes = [_route(layer, kind, gather_max_numel) for layer, kind in zip(layers, kinds)]
    plan = [
        world, rank, niter, oversample, seed, gather_max_numel, str(sketch_dtype), share_factors,
        *[
            (layer.name, kind, route, layer.shape, layer.transposed, str(layer.param.dtype),
             None if layer.name not in init else tuple(init[layer.name].shape))
            for layer, kind, route in zip(layers, kinds, routes)
        ],
    ]  # fmt: skip
    _check_plan(plan, device, group)
    if not layers:
        return []
    local_owner = _local_owners(layers, kinds, world)
    if local_owner != base.owners:  # the same verdict on every rank: both derive from the layer list
        raise BaseMismatchError("the sharded base was snapshot for another layer list (replicated owners differ)")
    # gathered layers: LPT on top of the replicated layers' loads (sharded work is spread evenly)
    loads = [0.0] * world
    for layer in layers:
        if layer.name in local_owner:
            loads[local_owner[layer.name]] += layer.shape[0] * layer.shape[1]
    gather_idx = [i for i, r in enumerate(routes) if r == "gather"]
    owner: dict[int, int | None] = {i: local_owner.get(layer.name) for i, layer in enumerate(layers)}
    costs = [float(layers[i].shape[0] * layers[i].shape[1]) for i in gather_idx]
    owner.update(zip(gather_idx, lpt_assign(costs, world, loads)))

    settings = dict(rank=rank, niter=niter, oversample=oversample, seed=seed, init=init, sketch_dtype=sketch_dtype)
    run = _Measurement(layers, base, device, group, settings)
    for batch in _sharded_batches(layers, [i for i, r in enumerate(routes) if r == "sharded"], init):
        run.sharded(batch)
    for i in gather_idx:
        run.gathered(i, kinds[i], owner[i])
    for i, r in enumerate(routes):
        if r == "local" and owner[i] == dist.get_rank(group):
            run.local(i)
    out_dtype = _F64 if any(layer.param.dtype == _F64 for layer in layers) else torch.float32
    return run.exchange(routes, owner, out_dtype, share_factors)
