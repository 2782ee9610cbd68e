"""Producing ΔW = W_t − W_0 of a batch, ready to decompose — one class per way to get it.

* :class:`DenseUpdate`: b same-shape layers, ΔW formed in float32 in a reused buffer (rounded
  to the sketch dtype once), where its norm, sparsity and finiteness are taken;
* :class:`StreamedUpdate`: one layer over the memory budget; ΔW is never formed, every product
  streams row blocks of W_t and W_0;
* :class:`LoraUpdate`: one PEFT layer, ΔW = B·A from the adapter factors (exact, no base copy).

Each gives the decomposition stage the same four things: ‖ΔW‖_F² and finiteness per layer,
a top-k SVD of ΔW, W_t in place (for the intruder sketch), and W_0's top singular vectors
(cached by the caller after the first measurement).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from spectral_monitor.engine.plan import Batch
from spectral_monitor.errors import BaseMismatchError
from spectral_monitor.functional import frobenius_sq, full_singular_values, lora_svd, randomized_svd, sparsity
from spectral_monitor.layers import LayerSpec
from spectral_monitor.snapshot import BaseStore

__all__ = ["DenseUpdate", "LoraUpdate", "Prefetch", "StreamedUpdate", "Update", "Workspace"]

SVD = tuple[Tensor, Tensor, Tensor]


class Update(ABC):
    """ΔW of the ``b`` layers of a batch, on the compute device.

    ``fro``: ``(b,)`` ‖ΔW‖_F², float32 (0 where not finite); ``finite``: per layer; ``sparsity``:
    ``(b,)`` or None where it is not defined (LoRA); ``base_fro``: ``(b,)`` ‖W_0‖_F for the layers
    that asked for it (else 0); ``exact``: the SVD is the complete spectrum (no sketch).
    """

    fro: Tensor
    finite: list[bool]
    sparsity: Tensor | None = None
    base_fro: Tensor
    exact: bool = False

    @abstractmethod
    def svd(self, rank: int, *, niter: int, oversample: int, init: Tensor | None, generator: torch.Generator) -> SVD:
        """Top-``rank`` ``(U (b, m, k), S (b, k), V (b, n, k))`` of ΔW."""

    def spectrum(self) -> Tensor | None:
        """Every singular value ``(b, min(m, n))``, when this update can afford it (else None)."""
        return None

    @abstractmethod
    def weights(self) -> list[Tensor]:
        """W_t of each layer, canonical ``(m, n)``, in place (any dtype, possibly another device)."""

    @abstractmethod
    def base_basis(self, rank: int, *, niter: int, oversample: int, generator: torch.Generator) -> SVD:
        """W_0's top-``rank`` left and right singular vectors, ``(b, m, k)`` and ``(b, n, k)``."""


def check_shapes(spec: LayerSpec, W: Tensor, B0: Tensor) -> None:
    """Raise :class:`BaseMismatchError` unless W_t and W_0 both have the layer's canonical shape."""
    if W.shape != B0.shape or tuple(W.shape) != spec.shape:
        raise BaseMismatchError(
            f"layer {spec.name!r}: weight shape {tuple(W.shape)} vs base {tuple(B0.shape)} "
            f"(monitored as {spec.shape}); the layer changed shape or the base is from another model"
        )


def sampled_sparsity(delta: Tensor, W: Tensor, B0: Tensor, eta: float, samples: int = 1 << 14, run: int = 64) -> Tensor:
    """:func:`~spectral_monitor.functional.sparsity` on at most ``samples`` entries (all of a small
    layer): evenly spaced runs of ``run`` contiguous entries (cache-line friendly), the spacing
    coprime with the row length so the runs start in every column. A share, so 16,384 samples give
    it to about ±0.8 % (2 standard errors) when entries are independent."""
    total = delta.numel()
    tensors = (delta, W.to(delta.device), B0)
    if total <= samples or not all(t.is_contiguous() for t in tensors):
        stride = max(1, total // samples)
        return sparsity(*(t.reshape(1, -1)[:, ::stride] for t in tensors), eta=eta)
    runs = samples // run
    step = total // runs
    while step > run and math.gcd(step, delta.shape[-1]) != 1:
        step -= 1
    return sparsity(*(t.reshape(-1).as_strided((runs, run), (step, 1)) for t in tensors), eta=eta)


class Workspace:
    """The batches' m x n buffers, carved from one flat allocation per device that every batch
    reuses. On CPU it is also kept between measurements: the first touch of freshly allocated
    pages costs about as much as filling them. CUDA buffers go back to the caching allocator
    after each measurement (:meth:`release`)."""

    def __init__(self) -> None:
        self.flat: dict[torch.device, Tensor] = {}

    def take(self, device: torch.device, *layouts: tuple[tuple[int, ...], torch.dtype]) -> list[Tensor]:
        """One tensor per ``(shape, dtype)`` layout, 64-byte aligned views of the device's buffer."""
        sizes = [-(-math.prod(shape) * dtype.itemsize // 64) * 64 for shape, dtype in layouts]
        flat = self.flat.get(device)
        if flat is None or flat.numel() < sum(sizes):
            self.flat.pop(device, None)
            flat = self.flat[device] = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        out, offset = [], 0
        for (shape, dtype), size in zip(layouts, sizes):
            nbytes = math.prod(shape) * dtype.itemsize
            out.append(flat[offset : offset + nbytes].view(dtype).view(shape))
            offset += size
        return out

    def release(self) -> None:
        """End of a measurement: keep the CPU buffer, hand device buffers back."""
        self.flat = {d: t for d, t in self.flat.items() if d.type == "cpu"}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.flat.values())


class Prefetch:
    """Uploads the next batch's base weights (pinned CPU store) on a side CUDA stream, so the
    host-to-device copy overlaps the current batch's decomposition."""

    def __init__(self, store: BaseStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.stream = torch.cuda.Stream(device=device)
        self.pending: dict[str, tuple[Tensor, torch.cuda.Event]] = {}

    def start(self, specs: tuple[LayerSpec, ...]) -> None:
        with torch.cuda.stream(self.stream):
            for spec in specs:
                t = self.store.get(spec, self.device)
                event = torch.cuda.Event()
                event.record(self.stream)
                self.pending[spec.name] = (t, event)

    def get(self, spec: LayerSpec) -> Tensor:
        if spec.name not in self.pending:
            return self.store.get(spec, self.device)
        t, event = self.pending.pop(spec.name)
        torch.cuda.current_stream(self.device).wait_event(event)
        t.record_stream(torch.cuda.current_stream(self.device))
        return t


class DenseUpdate(Update):
    """ΔW of b same-shape dense layers in one workspace buffer of the batch's sketch dtype.

    ΔW is formed in float32 (in the buffer itself, or in a float32 scratch rounded into a bf16
    buffer), where its norm, sparsity and finiteness are taken. The buffer keeps the parameters'
    storage layout (HF Conv1D: ``(in, out)``), so filling it is contiguous; the decomposition
    works on its canonical ``(out, in)`` view. Non-finite layers are zeroed in the buffer.
    """

    def __init__(
        self,
        batch: Batch,
        store: BaseStore,
        workspace: Workspace,
        *,
        eta: float,
        need_base_fro: list[bool],
        full: bool,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.batch, self.store = batch, store
        specs, device, dtype = batch.specs, batch.device, batch.sketch_dtype
        m, n = batch.shape
        b = len(specs)
        layout = (n, m) if specs[0].transposed else (m, n)
        wanted = [((b, *layout), dtype)] + ([(layout, torch.float32)] if dtype != torch.float32 else [])
        buf, *rest = workspace.take(device, *wanted)
        scratch = rest[0] if rest else None
        fro = torch.empty(b, device=device) if scratch is not None else None  # else one call below
        self.sparsity = torch.empty(b, device=device)
        self.base_fro = torch.zeros(b, device=device)
        for i, spec in enumerate(specs):
            W = spec.parameter().detach()
            B0 = prefetch.get(spec) if prefetch is not None else store.get(spec, device)
            check_shapes(spec, spec.canonical(W), spec.canonical(B0))
            d = buf[i] if scratch is None else scratch
            if W.dtype == B0.dtype == torch.float32 and W.device == device:
                torch.sub(W, B0, out=d)  # one fused pass
            else:  # upcast first: a low-precision difference would round ΔW
                d.copy_(W)
                d.sub_(B0)
            self.sparsity[i] = sampled_sparsity(d, W, B0, eta)
            if scratch is not None:
                fro[i] = frobenius_sq(d)
                buf[i].copy_(scratch)
            if need_base_fro[i]:
                self.base_fro[i] = torch.linalg.vector_norm(B0, dtype=torch.float32)
        self.fro = frobenius_sq(buf) if fro is None else fro
        self.finite = torch.isfinite(self.fro).tolist()
        if not all(self.finite):
            bad = ~torch.isfinite(self.fro)
            buf[bad] = 0.0
            self.fro[bad] = 0.0
        self.matrix = buf.mT if specs[0].transposed else buf  # canonical (b, m, n)
        self.full = full

    def svd(self, rank: int, *, niter: int, oversample: int, init: Tensor | None, generator: torch.Generator) -> SVD:
        return randomized_svd(
            self.matrix,
            rank,
            niter=niter,
            oversample=oversample,
            init=init,
            generator=generator,
            sketch_dtype=self.batch.sketch_dtype,
        )

    def spectrum(self) -> Tensor | None:
        return full_singular_values(self.matrix) if self.full else None

    def weights(self) -> list[Tensor]:
        return [s.canonical(s.parameter().detach()) for s in self.batch.specs]

    def base_basis(self, rank: int, *, niter: int, oversample: int, generator: torch.Generator) -> SVD:
        dtype, device = self.batch.sketch_dtype, self.batch.device
        W0 = torch.stack([s.canonical(self.store.get(s, device)).to(dtype) for s in self.batch.specs])
        return randomized_svd(W0, rank, niter=niter, oversample=oversample, generator=generator, sketch_dtype=dtype)


class StreamedUpdate(Update):
    """One layer over the memory budget: ΔW is never formed. Its norm, ‖W_0‖_F, sparsity (exact)
    and finiteness come from one pass over row blocks; every product of the SVD streams the
    blocks again (``randomized_svd(..., block_rows=)``)."""

    def __init__(self, batch: Batch, store: BaseStore, *, eta: float, budget: int) -> None:
        (spec,) = batch.specs
        self.batch, device = batch, batch.device
        m, n = spec.shape
        self.W = spec.canonical(spec.parameter().detach())
        self.B0 = spec.canonical(store.get(spec, device))
        check_shapes(spec, self.W, self.B0)
        self.rows = max(1, budget // (n * 4 * 4))
        fro = torch.zeros((), dtype=torch.float64, device=device)
        base_sq = torch.zeros((), dtype=torch.float64, device=device)
        small = torch.zeros((), dtype=torch.float64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for r0 in range(0, m, self.rows):
            w, b0 = self.W[r0 : r0 + self.rows].to(device), self.B0[r0 : r0 + self.rows]
            d = w.float() - b0.float()
            fro += frobenius_sq(d).double()
            base_sq += frobenius_sq(b0).double()
            small += sparsity(d, w, b0, eta=eta).double() * d.numel()
            finite &= torch.isfinite(d).all() & torch.isfinite(w).all()
        self.finite = [bool(finite)]
        ok = self.finite[0]
        self.fro = (fro.float() if ok else torch.zeros((), device=device))[None]
        self.sparsity = ((small / (m * n)).float() if ok else torch.zeros((), device=device))[None]
        self.base_fro = base_sq.sqrt().float()[None]

    def svd(self, rank: int, *, niter: int, oversample: int, init: Tensor | None, generator: torch.Generator) -> SVD:
        U, S, V = randomized_svd(
            self.W,
            rank,
            niter=niter,
            oversample=oversample,
            base=self.B0,
            init=None if init is None else init[0],
            generator=generator,
            block_rows=self.rows,
            sketch_dtype=self.batch.sketch_dtype,
        )
        return U[None], S[None], V[None]

    def weights(self) -> list[Tensor]:
        return [self.W]

    def base_basis(self, rank: int, *, niter: int, oversample: int, generator: torch.Generator) -> SVD:
        U0, S0, V0 = randomized_svd(
            self.B0,
            rank,
            niter=niter,
            oversample=oversample,
            generator=generator,
            block_rows=self.rows,
            sketch_dtype=self.batch.sketch_dtype,
        )
        return U0[None], S0[None], V0[None]


class LoraUpdate(Update):
    """One PEFT layer: ΔW = Σ_a scale_a B_a A_a from its factors, decomposed exactly (QR of B and
    Aᵀ, the m x n product never formed); W_0 is the frozen base weight, so no store is needed.
    Decompose only finite factors."""

    exact = True

    def __init__(self, batch: Batch, factors: tuple[Tensor, Tensor]) -> None:
        (spec,) = batch.specs
        self.batch = batch
        self.B, self.A = factors
        self.W0 = spec.canonical(spec.parameter().detach()).float()
        self.finite = [bool(torch.isfinite(self.B).all() and torch.isfinite(self.A).all())]
        self._svd = lora_svd(self.B, self.A, 1.0) if self.finite[0] else None
        S = self._svd[1] if self._svd is not None else torch.zeros(1, device=self.B.device)
        self.fro = (S.double() ** 2).sum().float()[None]
        self.base_fro = torch.linalg.vector_norm(self.W0)[None]

    def svd(self, rank: int, *, niter: int, oversample: int, init: Tensor | None, generator: torch.Generator) -> SVD:
        U, S, V = self._svd
        return U[None], S[None], V[None]

    def spectrum(self) -> Tensor | None:
        return None if self._svd is None else self._svd[1][None]

    def weights(self) -> list[Tensor]:
        return [self.W0 + self.B @ self.A]

    def base_basis(self, rank: int, *, niter: int, oversample: int, generator: torch.Generator) -> SVD:
        dtype = self.batch.sketch_dtype
        U0, S0, V0 = randomized_svd(
            self.W0, rank, niter=niter, oversample=oversample, generator=generator, sketch_dtype=dtype
        )
        return U0[None], S0[None], V0[None]
